"""The signed context envelope: dumps()/loads() on PyJWT (HS256, typ, exp, iat)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import timedelta

import jwt
import pytest

from ctxvars_mw import (
    ConfigurationError,
    ExpiredTokenError,
    InvalidTokenError,
    ServiceUnavailableError,
    Tier,
    UserExecutionContext,
)
from ctxvars_mw.envelope import (
    ENVELOPE_TYP,
    InMemoryReplayStore,
    RedisReplayStore,
    dumps,
    loads,
)

SECRET = secrets.token_urlsafe(32)
OTHER = secrets.token_urlsafe(32)
CTX = UserExecutionContext(
    user_id="auth0|5f7c8ec7c33c6c004bbafe82",
    tier=Tier.ENTERPRISE,
    roles={"admin"},
    permissions={"agents:*", "threads:read"},
    features={"sso"},
    claims={"sub": "auth0|5f7c8ec7c33c6c004bbafe82", "scope": ["a", "b"], "n": 1.5},
    auth_method="jwt",
    session_id="sess_4f6a9c1e2b7d8a0c5e3f",
    agent_context={"model": "m", "nested": {"k": [1, 2]}},
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
).child("agent.plan", audit_metadata={"reason": "test run"})


def _forge(payload: dict[str, object], key: str = SECRET, typ: str = ENVELOPE_TYP) -> str:
    return jwt.encode(payload, key, algorithm="HS256", headers={"typ": typ})


def test_round_trip_is_lossless() -> None:
    """loads(dumps(ctx)) == ctx, every field but db_session included."""
    restored = loads(dumps(CTX, SECRET), SECRET)
    assert restored == CTX
    assert restored.to_dict() == CTX.to_dict()


def test_anonymous_context_round_trips() -> None:
    """The anonymous context travels too."""
    anonymous = UserExecutionContext.anonymous()
    assert loads(dumps(anonymous, SECRET), SECRET) == anonymous


def test_db_session_is_never_included() -> None:
    """A database session stays in the process that opened it."""
    token = dumps(CTX.with_db_session(object()), SECRET)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert "db_session" not in payload["ctx"]
    assert loads(token, SECRET).db_session is None


def test_envelope_is_a_typed_hs256_jwt_with_exp_and_iat() -> None:
    """The header names the algorithm and our typ; the claims carry iat and exp."""
    token = dumps(CTX, SECRET, expires_in=timedelta(minutes=5))
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": ENVELOPE_TYP}
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["exp"] - payload["iat"] == 300
    assert abs(payload["iat"] - time.time()) < 5


def test_wrong_secret_is_refused() -> None:
    """An envelope signed with another secret raises InvalidTokenError."""
    with pytest.raises(InvalidTokenError) as info:
        loads(dumps(CTX, OTHER), SECRET)
    assert not isinstance(info.value, ExpiredTokenError)


def test_tampered_payload_is_refused() -> None:
    """Changing one claim (upgrading the tier) breaks the signature."""
    header, payload, signature = dumps(CTX, SECRET).split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["ctx"]["tier"] = "internal"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidTokenError):
        loads(f"{header}.{forged}.{signature}", SECRET)


def test_expired_envelope_raises_expired_token_error() -> None:
    """Past exp (beyond the leeway) the envelope is refused as expired."""
    now = int(time.time())
    token = _forge({"ctx": CTX.to_dict(), "iat": now - 120, "exp": now - 60})
    with pytest.raises(ExpiredTokenError):
        loads(token, SECRET)
    with pytest.raises(InvalidTokenError):  # expired *and* wrong secret: the signature decides
        loads(_forge({"ctx": CTX.to_dict(), "iat": now - 120, "exp": now - 60}, OTHER), SECRET)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b.c",
        "x" * 70_000,
        _forge(
            {"ctx": CTX.to_dict(), "iat": int(time.time()), "exp": int(time.time()) + 60}, typ="JWT"
        ),
        _forge({"ctx": CTX.to_dict(), "iat": int(time.time())}),  # no exp
        _forge({"ctx": CTX.to_dict(), "exp": int(time.time()) + 60}),  # no iat
        _forge({"ctx": "nope", "iat": int(time.time()), "exp": int(time.time()) + 60}),
        _forge({"ctx": {"user_id": "test"}, "iat": int(time.time()), "exp": int(time.time()) + 60}),
        _forge({"ctx": CTX.to_dict(), "iat": "soon", "exp": int(time.time()) + 60}),
        _forge({"ctx": CTX.to_dict(), "iat": int(time.time()), "exp": "later"}),
    ],
    ids=[
        "empty",
        "not-a-jwt",
        "three-garbage-parts",
        "oversized",
        "wrong-typ",
        "no-exp",
        "no-iat",
        "ctx-not-a-mapping",
        "ctx-invalid",
        "iat-not-a-number",
        "exp-not-a-number",
    ],
)
def test_malformed_envelopes_raise_invalid_token_error(token: str) -> None:
    """Wrong typ, missing claims, odd claim types or a bad context: InvalidTokenError."""
    with pytest.raises(InvalidTokenError) as info:
        loads(token, SECRET)
    assert SECRET not in str(info.value)
    assert token[:40] not in str(info.value) or not token


def test_none_algorithm_is_refused() -> None:
    """An unsigned ('alg: none') envelope never verifies."""
    token = jwt.encode(
        {"ctx": CTX.to_dict(), "iat": 1, "exp": 2**31},
        None,
        algorithm="none",
        headers={"typ": ENVELOPE_TYP},
    )
    with pytest.raises(InvalidTokenError):
        loads(token, SECRET)


def test_rotation_accepts_any_listed_secret() -> None:
    """loads() takes several secrets, so old envelopes verify while the new secret rolls out."""
    assert loads(dumps(CTX, OTHER), [SECRET, OTHER]) == CTX
    with pytest.raises(InvalidTokenError):
        loads(dumps(CTX, OTHER), [SECRET])


@pytest.mark.parametrize("secret", ["short", b"x" * 31, 12345, [], None])
def test_weak_or_missing_secret_is_a_configuration_error(secret: object) -> None:
    """Secrets under 32 bytes (or not str/bytes) are refused before any signing."""
    with pytest.raises(ConfigurationError):
        loads("a.b.c", secret)  # type: ignore[arg-type]
    if not isinstance(secret, list):
        with pytest.raises(ConfigurationError):
            dumps(CTX, secret)  # type: ignore[arg-type]


@pytest.mark.parametrize("expires_in", [0, -1, float("inf"), True, "60"])
def test_expires_in_must_be_positive_seconds(expires_in: object) -> None:
    """Zero, negative, infinite or non-numeric lifetimes are refused."""
    with pytest.raises(ConfigurationError):
        dumps(CTX, SECRET, expires_in=expires_in)  # type: ignore[arg-type]


def test_dumps_takes_only_a_context() -> None:
    """A dict is not a context."""
    with pytest.raises(TypeError):
        dumps(CTX.to_dict(), SECRET)  # type: ignore[arg-type]


# -- one-time envelopes and the leeway ---------------------------------------------------------


def test_every_envelope_carries_its_own_random_id() -> None:
    """Two envelopes of the same context have different, url-safe jti claims."""
    ids = {jwt.decode(dumps(CTX, SECRET), SECRET, algorithms=["HS256"])["jti"] for _ in range(50)}
    assert len(ids) == 50
    assert all(len(jti) >= 16 and jti.replace("-", "").replace("_", "").isalnum() for jti in ids)


def test_replay_store_accepts_an_envelope_once() -> None:
    """With a replay store the second loads of one envelope is refused; another envelope is not."""
    store = InMemoryReplayStore()
    token = dumps(CTX, SECRET)
    assert loads(token, SECRET, replay_store=store) == CTX
    with pytest.raises(InvalidTokenError, match="already used") as info:
        loads(token, SECRET, replay_store=store)
    assert token not in str(info.value)
    assert loads(dumps(CTX, SECRET), SECRET, replay_store=store) == CTX
    assert loads(token, SECRET) == CTX  # without a store, envelopes stay reusable


def test_refused_envelopes_do_not_use_up_an_id() -> None:
    """A forged, expired or invalid envelope with a real envelope's jti leaves that jti usable."""
    store = InMemoryReplayStore()
    token = dumps(CTX, SECRET)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    now = int(time.time())
    bad_context = {**payload, "ctx": {**payload["ctx"], "user_id": "placeholder"}}
    for forged in (
        _forge(payload, OTHER),
        _forge({**payload, "iat": now - 120, "exp": now - 60}),
        _forge(bad_context),
    ):
        with pytest.raises(InvalidTokenError):
            loads(forged, SECRET, replay_store=store)
    assert len(store) == 0
    assert loads(token, SECRET, replay_store=store) == CTX


def test_envelope_without_an_id_is_refused_only_with_a_replay_store() -> None:
    """An envelope lacking jti (or with a malformed one) cannot be used once, so it is refused."""
    now = int(time.time())
    plain = {"ctx": CTX.to_dict(), "iat": now, "exp": now + 60}
    assert loads(_forge(plain), SECRET) == CTX
    for jti in (None, "short", "x" * 65, "bad jti with spaces!!"):
        token = _forge(plain if jti is None else {**plain, "jti": jti})
        with pytest.raises(InvalidTokenError, match="no valid id"):
            loads(token, SECRET, replay_store=InMemoryReplayStore())
    with pytest.raises(InvalidTokenError):  # PyJWT refuses a non-string jti itself
        loads(_forge({**plain, "jti": 7}), SECRET, replay_store=InMemoryReplayStore())


def test_in_memory_store_forgets_ids_once_their_envelope_expired() -> None:
    """An id is remembered for its ttl and dropped after, so memory does not grow forever."""
    now = [1000.0]
    store = InMemoryReplayStore(clock=lambda: now[0])
    assert store.claim("a" * 22, 10.0)
    assert not store.claim("a" * 22, 10.0)
    now[0] += 10.5
    assert store.claim("b" * 22, 10.0)
    assert len(store) == 1
    assert store.claim("a" * 22, 10.0)


def test_replay_store_keeps_the_id_for_the_envelopes_remaining_life() -> None:
    """The ttl handed to the store is exp + leeway - now."""
    seen: list[float] = []

    class Recording:
        def claim(self, jti: str, ttl: float) -> bool:
            seen.append(ttl)
            return True

    loads(dumps(CTX, SECRET, expires_in=30), SECRET, replay_store=Recording(), leeway=2)
    assert 30.0 <= seen[0] <= 32.0


def test_redis_replay_store_is_shared_between_verifiers(redis_url: str, key_prefix: str) -> None:
    """Two stores on one Redis (two processes): the second use is refused; the key expires."""
    import redis

    first = RedisReplayStore(redis_url, prefix=key_prefix)
    second = RedisReplayStore(redis.Redis.from_url(redis_url), prefix=key_prefix)
    token = dumps(CTX, SECRET, expires_in=20)
    jti = jwt.decode(token, SECRET, algorithms=["HS256"])["jti"]
    try:
        assert loads(token, SECRET, replay_store=first) == CTX
        with pytest.raises(InvalidTokenError, match="already used"):
            loads(token, SECRET, replay_store=second)
        client = redis.Redis.from_url(redis_url)
        ttl_ms = client.pttl(key_prefix + jti)
        client.delete(key_prefix + jti)
        client.close()
        assert 19_000 <= ttl_ms <= 25_000
    finally:
        first.close()
        second.close()


def test_redis_replay_store_fails_closed_when_redis_is_down() -> None:
    """An unreachable Redis refuses the envelope with ServiceUnavailableError (503)."""
    store = RedisReplayStore("redis://127.0.0.1:1/0", timeout=0.5)
    with pytest.raises(ServiceUnavailableError):
        loads(dumps(CTX, SECRET), SECRET, replay_store=store)
    store.close()


def test_leeway_is_configurable() -> None:
    """An envelope 3 s past exp passes the default 5 s leeway, fails with leeway=0."""
    now = int(time.time())
    token = _forge({"ctx": CTX.to_dict(), "iat": now - 63, "exp": now - 3})
    assert loads(token, SECRET) == CTX
    assert loads(token, SECRET, leeway=timedelta(seconds=10)) == CTX
    with pytest.raises(ExpiredTokenError):
        loads(token, SECRET, leeway=0)
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(ConfigurationError, match="leeway"):
            loads(token, SECRET, leeway=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="replay_store"):
        loads(token, SECRET, replay_store=object())  # type: ignore[arg-type]


def test_the_trace_and_its_flags_cross_in_the_envelope() -> None:
    """A worker that loads the envelope continues the same trace, flags included."""
    traced = CTX.replace(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", trace_flags=0x03)
    received = loads(dumps(traced, SECRET), SECRET)
    assert (received.trace_id, received.trace_flags) == (traced.trace_id, 0x03)
    assert received == traced


def test_the_request_metadata_crosses_the_envelope() -> None:
    """client_ip, user_agent, method and path travel with the context (signed), and a
    context stripped of them arrives without them."""
    described = CTX.replace(
        client_ip="2001:db8::7", user_agent="curl/8.5", method="POST", path="/jobs"
    )
    restored = loads(dumps(described, SECRET), SECRET)
    assert (restored.client_ip, restored.user_agent, restored.method, restored.path) == (
        "2001:db8::7",
        "curl/8.5",
        "POST",
        "/jobs",
    )
    stripped = described.replace(client_ip=None, user_agent=None)
    assert loads(dumps(stripped, SECRET), SECRET).client_ip is None


def test_an_envelope_with_forged_metadata_is_refused() -> None:
    """A signed envelope whose metadata the context would not accept (a raw, unparsable
    address) is refused as invalid, not loaded."""
    data = CTX.to_dict() | {"client_ip": "unknown\r\nX-Injected: 1"}
    now = int(time.time())
    token = _forge({"ctx": data, "iat": now, "exp": now + 60})
    with pytest.raises(InvalidTokenError):
        loads(token, SECRET)
