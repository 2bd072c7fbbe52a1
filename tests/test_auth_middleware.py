"""Authentication through the real ContextMiddleware and a Starlette app.

The bad-token corpus: every case is a 401 with ``WWW-Authenticate`` (400 where the
token came two ways), never a 500, and the raw token never reaches the logs or the body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from starlette.testclient import TestClient, WebSocketDenialResponse

from ctxvars_mw import (
    Connection,
    ContextMiddleware,
    Identity,
    IdRules,
    InMemorySessionStore,
    JWTAuthenticator,
    Policy,
    use_id_rules,
)
from tests.auth_helpers import (
    AUDIENCE,
    ISSUER,
    SECRET,
    USER,
    auth_server,
    bearer,
    claims,
    client_for,
    control,
    dumps,
    forge,
    make_app,
    public_jwk,
    rsa_key,
    sign,
)

__all__ = ["auth_server", "control"]  # fixtures used here

HOUR = 3600.0


class Clock:
    """A settable clock for session stores."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    """The apps under test and the tokens/sessions the corpus needs."""

    apps: dict[str, ContextMiddleware]
    sessions: dict[str, str] = field(default_factory=dict)


async def _sessions(store: InMemorySessionStore, clock: Clock) -> dict[str, str]:
    real = clock.now
    revoked = await store.create(USER)
    await store.revoke(revoked.id)
    clock.now = real - 40 * 60
    idle = await store.create(USER)
    clock.now = real - 8 * HOUR - 60
    absolute = await store.create(USER)
    for _ in range(23):
        clock.now += 20 * 60
        assert await store.touch(absolute.id) is not None
    clock.now = real - 120
    assert await store.touch(absolute.id) is not None
    clock.now = real
    active = await store.create(USER)
    return {"revoked": revoked.id, "idle": idle.id, "absolute": absolute.id, "active": active.id}


@pytest.fixture
async def env(auth_server: str, control: httpx.AsyncClient) -> Env:
    """An HS256 app, an RS256 app on the JWKS server, and a typ-checking app."""
    await control.post("/control/jwks", json={"keys": [public_jwk(rsa_key(), "k1", "RS256")]})
    clock = Clock()
    store = InMemorySessionStore(clock=clock)
    common: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE}
    hs = JWTAuthenticator(key=SECRET, algorithms=["HS256"], **common)
    rs = JWTAuthenticator(jwks_url=f"{auth_server}/jwks", algorithms=["RS256"], **common)
    typ = JWTAuthenticator(key=SECRET, algorithms=["HS256"], required_typ="at+jwt", **common)
    apps = {
        name: make_app(authenticator=auth, require_authentication=True, session_store=store)
        for name, auth in (("hs", hs), ("rs", rs), ("typ", typ))
    }
    return Env(apps, await _sessions(store, clock))


def _rs(**headers: Any) -> str:
    return sign(claims(), rsa_key(), "RS256", **headers)


def _pem() -> bytes:
    return (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


_H = dumps({"alg": "HS256", "typ": "JWT"})


def _p(extra: str = "") -> str:
    """Valid payload JSON text, with ``extra`` members appended verbatim."""
    text = dumps(claims())
    return text[:-1] + extra + "}"


def _twice() -> list[tuple[str, str | bytes]]:
    token = sign(claims())
    return [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")]


Headers = dict[str, str] | list[tuple[str, str | bytes]]
Case = tuple[str, Callable[[Env], Headers], int, str]
CASES: list[Case] = [
    ("no credentials", lambda e: {}, 401, "authentication_required"),
    (
        "basic scheme",
        lambda e: {"Authorization": "Basic dXNlcjpwYXNz"},
        401,
        "authentication_required",
    ),
    ("empty bearer", lambda e: {"Authorization": "Bearer "}, 401, "invalid_token"),
    ("alg none", lambda e: bearer(forge('{"alg":"none"}', _p())), 401, "invalid_token"),
    ("alg None", lambda e: bearer(forge('{"alg":"None"}', _p())), 401, "invalid_token"),
    ("alg NONE", lambda e: bearer(forge('{"alg":"NONE"}', _p())), 401, "invalid_token"),
    (
        "alg none unsigned",
        lambda e: bearer(forge('{"alg":"none"}', _p()).rsplit(".", 1)[0] + "."),
        401,
        "invalid_token",
    ),
    (
        "alg outside allow-list",
        lambda e: bearer(forge('{"alg":"HS512"}', _p())),
        401,
        "invalid_token",
    ),
    ("alg missing", lambda e: bearer(forge('{"typ":"JWT"}', _p())), 401, "invalid_token"),
    (
        "hs256 with rsa public key as secret",
        lambda e: bearer(forge(dumps({"alg": "HS256", "kid": "k1"}), _p(), _pem())),
        401,
        "rs",
    ),
    ("missing kid", lambda e: bearer(_rs()), 401, "rs"),
    ("unknown kid", lambda e: bearer(_rs(kid="k-unknown")), 401, "rs"),
    ("kid path traversal", lambda e: bearer(_rs(kid="../../../../etc/passwd")), 401, "rs"),
    ("kid sql", lambda e: bearer(_rs(kid="' OR '1'='1'; DROP TABLE keys; --")), 401, "rs"),
    (
        "kid not a string",
        lambda e: bearer(forge('{"alg":"RS256","kid":7}', _p(), rsa_key(), "RS256")),
        401,
        "rs",
    ),
    (
        "jku header",
        lambda e: bearer(sign(claims(), jku="https://evil.invalid/jwks")),
        401,
        "invalid_token",
    ),
    (
        "x5u header",
        lambda e: bearer(sign(claims(), x5u="https://evil.invalid/cert")),
        401,
        "invalid_token",
    ),
    (
        "jwk header",
        lambda e: bearer(sign(claims(), jwk={"kty": "oct", "k": "AAAA"})),
        401,
        "invalid_token",
    ),
    ("x5c header", lambda e: bearer(sign(claims(), x5c=["MIIB"])), 401, "invalid_token"),
    (
        "unknown crit",
        lambda e: bearer(forge('{"alg":"HS256","crit":["exp"],"exp":1}', _p())),
        401,
        "invalid_token",
    ),
    ("wrong typ", lambda e: bearer(sign(claims(), typ="JWT")), 401, "typ"),
    ("missing typ", lambda e: bearer(forge('{"alg":"HS256"}', _p())), 401, "typ"),
    (
        "two segments",
        lambda e: bearer(".".join(sign(claims()).split(".")[:2])),
        401,
        "invalid_token",
    ),
    ("four segments", lambda e: bearer(sign(claims()) + ".AAAA"), 401, "invalid_token"),
    ("bad base64", lambda e: bearer("e30.@@@.AAAA"), 401, "invalid_token"),
    ("non-canonical base64", lambda e: bearer(sign(claims())[:-1] + "Z"), 401, "invalid_token"),
    ("header not json", lambda e: bearer(forge("alg=HS256", _p())), 401, "invalid_token"),
    ("payload not json", lambda e: bearer(forge(_H, "sub=someone")), 401, "invalid_token"),
    ("payload a json list", lambda e: bearer(forge(_H, '["sub"]')), 401, "invalid_token"),
    (
        "header repeats alg",
        lambda e: bearer(forge('{"alg":"none","alg":"HS256"}', _p())),
        401,
        "invalid_token",
    ),
    (
        "payload repeats sub",
        lambda e: bearer(forge(_H, _p(',"sub":"admin-user-000000001"'))),
        401,
        "invalid_token",
    ),
    ("payload NaN", lambda e: bearer(forge(_H, _p(',"n":NaN'))), 401, "invalid_token"),
    (
        "stripped signature",
        lambda e: bearer(sign(claims()).rsplit(".", 1)[0] + "."),
        401,
        "invalid_token",
    ),
    (
        "signature of another key",
        lambda e: bearer(sign(claims(), b"x" * 32 + SECRET)),
        401,
        "invalid_token",
    ),
    (
        "rs signature of another key",
        lambda e: bearer(sign(claims(), rsa_key(1), "RS256", kid="k1")),
        401,
        "rs",
    ),
    ("exp past", lambda e: bearer(sign(claims(exp=int(time.time()) - 120))), 401, "invalid_token"),
    (
        "exp string",
        lambda e: bearer(sign(claims(exp=str(int(time.time()) + 600)))),
        401,
        "invalid_token",
    ),
    (
        "exp 1e400",
        lambda e: bearer(forge(_H, dumps(claims(exp=None))[:-1] + ',"exp":1e400}')),
        401,
        "invalid_token",
    ),
    ("exp list", lambda e: bearer(sign(claims(exp=[1]))), 401, "invalid_token"),
    ("exp bool", lambda e: bearer(sign(claims(exp=True))), 401, "invalid_token"),
    ("exp huge int", lambda e: bearer(sign(claims(exp=10**30))), 401, "invalid_token"),
    (
        "nbf future",
        lambda e: bearer(sign(claims(nbf=int(time.time()) + 300))),
        401,
        "invalid_token",
    ),
    (
        "iat future beyond leeway",
        lambda e: bearer(sign(claims(iat=int(time.time()) + 300))),
        401,
        "invalid_token",
    ),
    ("missing exp", lambda e: bearer(sign(claims(exp=None))), 401, "invalid_token"),
    ("missing sub", lambda e: bearer(sign(claims(sub=None))), 401, "invalid_token"),
    ("wrong iss", lambda e: bearer(sign(claims(iss="https://evil.invalid"))), 401, "invalid_token"),
    ("wrong aud", lambda e: bearer(sign(claims(aud="another-api"))), 401, "invalid_token"),
    (
        "aud list without ours",
        lambda e: bearer(sign(claims(aud=["a-api", "b-api"]))),
        401,
        "invalid_token",
    ),
    ("sub empty", lambda e: bearer(sign(claims(sub=""))), 401, "invalid_token"),
    ("sub placeholder", lambda e: bearer(sign(claims(sub="placeholder"))), 401, "invalid_token"),
    ("sub anonymous", lambda e: bearer(sign(claims(sub="anonymous"))), 401, "invalid_token"),
    ("sub test_ prefix", lambda e: bearer(sign(claims(sub="test_user"))), 401, "invalid_token"),
    ("sub not a string", lambda e: bearer(sign(claims(sub=12345))), 401, "invalid_token"),
    ("roles a string", lambda e: bearer(sign(claims(roles="admin"))), 401, "invalid_token"),
    ("roles numbers", lambda e: bearer(sign(claims(roles=[1, 2]))), 401, "invalid_token"),
    (
        "permissions nested",
        lambda e: bearer(sign(claims(permissions=[["*"]]))),
        401,
        "invalid_token",
    ),
    ("scope a number", lambda e: bearer(sign(claims(scope=7))), 401, "invalid_token"),
    ("unknown tier", lambda e: bearer(sign(claims(tier="platinum"))), 401, "invalid_token"),
    ("tier not a string", lambda e: bearer(sign(claims(tier=3))), 401, "invalid_token"),
    ("over size limit", lambda e: bearer(sign(claims(pad="a" * 9000))), 401, "invalid_token"),
    (
        "non-ascii token",
        lambda e: [("authorization", "Bearer t\u00f6ken".encode("latin-1"))],
        401,
        "invalid_token",
    ),
    ("revoked session", lambda e: bearer(sign(claims(sid=e.sessions["revoked"]))), 401, "revoked"),
    (
        "idle-expired session",
        lambda e: bearer(sign(claims(sid=e.sessions["idle"]))),
        401,
        "revoked",
    ),
    (
        "absolute-expired session",
        lambda e: bearer(sign(claims(sid=e.sessions["absolute"]))),
        401,
        "revoked",
    ),
    ("two authorization headers", lambda e: _twice(), 400, "invalid_request"),
]


REASONS: dict[str, str] = {  # a fragment of each case's error_description
    "no credentials": "required",
    "basic scheme": "required",
    "empty bearer": "malformed",
    "alg none": "algorithm",
    "alg None": "algorithm",
    "alg NONE": "algorithm",
    "alg none unsigned": "malformed",
    "alg outside allow-list": "algorithm",
    "alg missing": "algorithm",
    "hs256 with rsa public key as secret": "algorithm",
    "missing kid": "(kid)",
    "unknown kid": "key is unknown",
    "kid path traversal": "key is unknown",
    "kid sql": "key is unknown",
    "kid not a string": "key id",
    "jku header": "header",
    "x5u header": "header",
    "jwk header": "header",
    "x5c header": "header",
    "unknown crit": "header",
    "wrong typ": "type",
    "missing typ": "type",
    "two segments": "malformed",
    "four segments": "malformed",
    "bad base64": "malformed",
    "non-canonical base64": "malformed",
    "header not json": "malformed",
    "payload not json": "malformed",
    "payload a json list": "malformed",
    "header repeats alg": "repeats",
    "payload repeats sub": "repeats",
    "payload NaN": "malformed",
    "stripped signature": "malformed",
    "signature of another key": "signature",
    "rs signature of another key": "signature",
    "exp past": "expired",
    "exp string": "'exp'",
    "exp 1e400": "'exp'",
    "exp list": "'exp'",
    "exp bool": "'exp'",
    "exp huge int": "'exp'",
    "nbf future": "not valid yet",
    "iat future beyond leeway": "issued in the future",
    "missing exp": "'exp'",
    "missing sub": "'sub'",
    "wrong iss": "issuer",
    "wrong aud": "audience",
    "aud list without ours": "audience",
    "sub empty": "subject",
    "sub placeholder": "subject",
    "sub anonymous": "subject",
    "sub test_ prefix": "subject",
    "sub not a string": "subject",
    "roles a string": "'roles'",
    "roles numbers": "'roles'",
    "permissions nested": "'permissions'",
    "scope a number": "'scope'",
    "unknown tier": "tier",
    "tier not a string": "tier",
    "over size limit": "too large",
    "non-ascii token": "malformed",
    "revoked session": "expired or was revoked",
    "idle-expired session": "expired or was revoked",
    "absolute-expired session": "expired or was revoked",
    "two authorization headers": "more than once",
}


def _app_for(expect: str) -> str:
    return expect if expect in ("rs", "typ") else "hs"


@pytest.mark.parametrize(("name", "build", "status", "expect"), CASES, ids=[c[0] for c in CASES])
async def test_bad_token_corpus_is_refused(
    env: Env,
    caplog: pytest.LogCaptureFixture,
    name: str,
    build: Callable[[Env], Headers],
    status: int,
    expect: str,
) -> None:
    """Each bad credential gets its 401 (or 400) with WWW-Authenticate; no 500, no token in logs."""
    caplog.set_level(logging.DEBUG)
    headers = build(env)
    raw_headers = list(headers.items()) if isinstance(headers, dict) else headers
    async with client_for(env.apps[_app_for(expect)]) as client:
        response = await client.get("/whoami", headers=raw_headers)
    assert response.status_code == status, response.text
    body = response.json()
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
        expected_error = expect if expect.endswith("_required") else "invalid_token"
        assert body["error"] == expected_error
        if expected_error == "invalid_token":
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    else:
        assert body["error"] == "invalid_request"
    assert REASONS[name] in body["error_description"]  # refused for the right reason
    for _, value in raw_headers:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        token = text.partition(" ")[2]
        if len(token) > 8:
            assert token not in caplog.text
            assert token not in response.text
            for chunk in token.split("."):
                if len(chunk) > 8:
                    assert chunk not in caplog.text


async def test_corpus_valid_token_is_accepted_by_each_app(env: Env) -> None:
    """The corpus apps do accept a good token (so the refusals above are not vacuous)."""
    good = {
        "hs": sign(claims(sid=env.sessions["active"])),
        "rs": sign(claims(), rsa_key(), "RS256", kid="k1"),
        "typ": sign(claims(), typ="at+jwt"),
    }
    for name, token in good.items():
        async with client_for(env.apps[name]) as client:
            response = await client.get("/whoami", headers=bearer(token))
        assert response.status_code == 200, (name, response.text)
        assert response.json()["user_id"] == USER


async def test_claims_map_into_the_context() -> None:
    """tier, roles (through the policy), permissions, scopes and sid reach the context."""
    store = InMemorySessionStore()
    session = await store.create(USER)
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth, session_store=store, policy=Policy.default())
    token = sign(
        claims(
            tier="business",
            roles=["readonly"],
            permissions=["reports:export"],
            scope="invoices:read invoices:write",
            sid=session.id,
        )
    )
    async with client_for(app) as client:
        body = (await client.get("/whoami", headers=bearer(token))).json()
    assert body["user_id"] == USER
    assert body["authenticated"] is True
    assert body["tier"] == "business"
    assert body["roles"] == ["readonly"]
    assert body["permissions"] == sorted(
        {"threads:read", "agents:read", "reports:export", "invoices:read", "invoices:write"}
    )
    assert "api_access" in body["features"]
    assert body["session_id"] == session.id
    assert body["auth_method"] == "jwt"


async def test_no_token_is_anonymous_when_not_required() -> None:
    """Without credentials and without require_authentication the context is anonymous."""
    app = make_app(authenticator=JWTAuthenticator(key=SECRET, algorithms=["HS256"]))
    async with client_for(app) as client:
        body = (await client.get("/whoami")).json()
    assert body["authenticated"] is False
    assert body["user_id"] == "anonymous"


async def test_cached_identity_is_checked_against_the_id_rules_in_force() -> None:
    """A subject accepted (and memoised) under one IdRules is refused once the rules forbid it."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth)
    token = sign(claims())
    async with client_for(app) as client:
        assert (await client.get("/whoami", headers=bearer(token))).status_code == 200
        with use_id_rules(IdRules.default().forbidding(USER)):
            refused = await client.get("/whoami", headers=bearer(token))
        again = await client.get("/whoami", headers=bearer(token))
    assert refused.status_code == 401
    assert again.status_code == 200


async def test_a_jwt_authenticator_subclass_overriding_authenticate_is_always_called() -> None:
    """The middleware's cache fast path skips only JWTAuthenticator's own authenticate()."""
    seen: list[str | None] = []

    class Audited(JWTAuthenticator):
        async def authenticate(self, conn: Connection) -> Identity | None:
            seen.append(conn.token)
            if conn.token is not None and conn.token.endswith("x"):
                raise ValueError("a bug in the override")
            return await super().authenticate(conn)

    app = make_app(authenticator=Audited(key=SECRET, algorithms=["HS256"], audience=AUDIENCE))
    token = sign(claims())
    async with client_for(app) as client:
        first = await client.get("/whoami", headers=bearer(token))
        cached = await client.get("/whoami", headers=bearer(token))
        broken = await client.get("/whoami", headers=bearer(token + "x"))
    assert [first.status_code, cached.status_code, broken.status_code] == [200, 200, 401]
    assert cached.json()["user_id"] == USER
    assert seen == [token, token, token + "x"]


async def test_cached_and_uncached_jwt_requests_see_the_same_context() -> None:
    """A verified-token cache hit gives the same user, tier and permissions as the first use."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth, policy=Policy.default())
    token = sign(claims(tier="business", roles=["readonly"], scope="invoices:read"))
    async with client_for(app) as client:
        responses = [await client.get("/whoami", headers=bearer(token)) for _ in range(3)]
    bodies = [r.json() for r in responses]
    assert bodies[0]["user_id"] == USER
    assert bodies[0]["tier"] == "business"
    assert "invoices:read" in bodies[0]["permissions"]
    assert bodies[1] == bodies[0]
    assert bodies[2] == bodies[0]
    assert len({r.headers["x-request-id"] for r in responses}) == 3


def _ws_app(**options: Any) -> ContextMiddleware:
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    return make_app(authenticator=auth, require_authentication=True, **options)


def test_websocket_authenticates_with_the_authorization_header() -> None:
    """A websocket handshake with Authorization: Bearer gets the token's user."""
    with (
        TestClient(_ws_app()) as client,
        client.websocket_connect("/ws", headers=bearer(sign(claims()))) as ws,
    ):
        assert ws.receive_json() == {"user_id": USER, "authenticated": True}


def test_websocket_subprotocol_token_is_accepted_and_bearer_echoed() -> None:
    """``Sec-WebSocket-Protocol: bearer, <token>`` authenticates; ``bearer`` is echoed."""
    with (
        TestClient(_ws_app()) as client,
        client.websocket_connect("/ws", subprotocols=["bearer", sign(claims())]) as ws,
    ):
        assert ws.accepted_subprotocol == "bearer"
        assert ws.receive_json()["user_id"] == USER


def _denied(client: TestClient, url: str, **kwargs: Any) -> WebSocketDenialResponse:
    """The HTTP denial a websocket handshake to ``url`` gets."""
    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(url, **kwargs):
        pass
    return denied.value


def test_websocket_query_param_is_opt_in() -> None:
    """The query parameter carries a token only when configured."""
    token = sign(claims())
    app = _ws_app(websocket_token_query_param="access_token")
    with TestClient(app) as client, client.websocket_connect(f"/ws?access_token={token}") as ws:
        assert ws.receive_json()["user_id"] == USER
    with TestClient(_ws_app()) as client:
        assert _denied(client, f"/ws?access_token={token}").status_code == 401


@pytest.mark.parametrize(
    "query",
    ["access_token=%E2%98%83", "access_token=%FF%FE", "access_token=a%00b"],
    ids=["snowman", "invalid-utf8", "nul"],
)
def test_websocket_query_token_with_odd_characters_is_a_401(query: str) -> None:
    """A query token that is not ASCII is refused with 401, not a 500 (middleware fix)."""
    with TestClient(_ws_app(websocket_token_query_param="access_token")) as client:
        assert _denied(client, f"/ws?{query}").status_code == 401


def test_websocket_bad_token_is_refused_before_accept() -> None:
    """A bad token is denied with an HTTP 401 response; the endpoint never accepts."""
    with TestClient(_ws_app()) as client:
        denied = _denied(client, "/ws", subprotocols=["bearer", "not.a.jwt"])
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_websocket_without_denial_extension_closes_with_1008() -> None:
    """Where the server cannot send a denial response, the handshake is closed with 1008."""
    app = _ws_app()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer not.a.jwt")],
        "subprotocols": [],
    }
    asyncio.run(app(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "invalid_token"}]


def test_websocket_token_sent_two_ways_is_a_400() -> None:
    """Header plus subprotocol (or plus query parameter) is an invalid_request (400)."""
    token = sign(claims())
    with TestClient(_ws_app(websocket_token_query_param="access_token")) as client:
        for url, extra in (
            ("/ws", {"subprotocols": ["bearer", token]}),
            (f"/ws?access_token={token}", {}),
        ):
            denied = _denied(client, url, headers=bearer(token), **extra)
            assert denied.status_code == 400
            assert denied.json()["error"] == "invalid_request"


async def test_a_cached_token_is_accepted_only_for_its_exact_bytes() -> None:
    """The cache hit path keys on the token's digest: any change to a cached token is
    verified afresh (and fails); the scheme's case and extra spaces do not matter."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth)
    token = sign(claims())
    head, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    async with client_for(app) as client:
        first = await client.get("/whoami", headers=bearer(token))
        spaced = await client.get("/whoami", headers={"Authorization": f"bearer   {token}"})
        bad_sig = await client.get("/whoami", headers=bearer(f"{head}.{payload}.{flipped}"))
        bad_payload = await client.get("/whoami", headers=bearer(f"{head}.{payload}x.{signature}"))
        other = await client.get("/whoami", headers=[("Authorization", f"Bearer {token}")] * 2)
    assert [first.status_code, spaced.status_code] == [200, 200]
    assert spaced.json()["user_id"] == USER
    assert [bad_sig.status_code, bad_payload.status_code, other.status_code] == [401, 401, 400]


async def test_a_cached_token_whose_session_is_revoked_is_refused() -> None:
    """A verified-token cache hit still checks the token's session on every request."""
    store = InMemorySessionStore()
    session = await store.create(USER)
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth, session_store=store)
    token = sign(claims(sid=session.id))
    async with client_for(app) as client:
        first = await client.get("/whoami", headers=bearer(token))
        await store.revoke(session.id)
        after = await client.get("/whoami", headers=bearer(token))
    assert first.status_code == 200
    assert after.status_code == 401
    assert "revoked" in after.json()["error_description"]


async def test_a_token_verified_through_the_middleware_is_cached_under_its_digest() -> None:
    """A cache miss is verified with the digest the fast path computed from the header's
    bytes: the entry is the one JWTAuthenticator.authenticate() would look up."""
    from ctxvars_mw.auth.cache import token_digest

    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth)
    token = sign(claims())
    async with client_for(app) as client:
        response = await client.get("/whoami", headers={"Authorization": f"bearer  {token}"})
    assert response.status_code == 200
    cached = auth._cache.get(token_digest(token, auth.max_token_bytes))
    assert cached is not None
    assert cached.user_id == USER
    assert len(auth._cache) == 1


def test_two_tokens_in_one_websocket_protocol_header_are_a_400() -> None:
    """``bearer, A, bearer, B`` offers two tokens: a 400, as every other two-token case."""
    first, second = sign(claims()), sign(claims(sub="user_2hNqYf3kT9xWzL"))
    with TestClient(_ws_app()) as client:
        denied = _denied(client, "/ws", subprotocols=["bearer", first, "bearer", second])
    assert denied.status_code == 400
    assert denied.json()["error"] == "invalid_request"


def test_websocket_bearer_subprotocol_is_echoed_as_offered() -> None:
    """The accepted subprotocol is the client's own spelling of the bearer marker."""
    with (
        TestClient(_ws_app()) as client,
        client.websocket_connect("/ws", subprotocols=["Bearer", sign(claims())]) as ws,
    ):
        assert ws.accepted_subprotocol == "Bearer"
        assert ws.receive_json()["user_id"] == USER


@pytest.mark.parametrize(
    "subject",
    ["-", "\u0430nonymous", "\uff41\uff4e\uff4f\uff4e\uff59\uff4d\uff4f\uff55\uff53", "T\u0395ST"],
    ids=["dash", "cyrillic-a", "fullwidth", "greek-epsilon"],
)
def test_subjects_that_read_as_reserved_names_are_refused(subject: str) -> None:
    """``-`` and look-alikes of placeholder names (other scripts, fullwidth) are a 401."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE)
    with TestClient(make_app(authenticator=auth)) as client:
        response = client.get("/whoami", headers=bearer(sign(claims(sub=subject))))
    assert response.status_code == 401
    assert subject not in response.text


def test_refusals_are_logged_with_the_requests_ids(caplog: pytest.LogCaptureFixture) -> None:
    """A refusal's log line carries the request id and correlation id the response names."""
    from ctxvars_mw.logging import ContextLogFilter

    caplog.set_level(logging.INFO, logger="ctxvars_mw")
    caplog.handler.addFilter(ContextLogFilter())
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE)
    app = make_app(authenticator=auth, require_authentication=True)
    with TestClient(app) as client:
        response = client.get("/whoami", headers={"X-Correlation-ID": "flow-7f3a9c2e41d84b06"})
    assert response.status_code == 401
    refused = [r for r in caplog.records if "request refused" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].request_id == response.headers["x-request-id"]
    assert refused[0].correlation_id == "flow-7f3a9c2e41d84b06"
