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
    Tier,
    UserExecutionContext,
)
from ctxvars_mw.envelope import ENVELOPE_TYP, dumps, loads

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
