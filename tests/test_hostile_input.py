"""Hostile input: whatever a client sends, the middleware answers 200/400/401, never a 500.

Hypothesis drives the raw ASGI callable of a ``ContextMiddleware`` with a real
``JWTAuthenticator`` (HS256, a random 32-byte key) through random scopes and headers
(non-UTF-8 bytes, CR/LF, NUL, 64 KB values, thousands of headers), random and mutated
tokens, validly signed tokens with hostile claims, and random ``traceparent``/``baggage``.
Every example also checks that no attacker-supplied value that was refused appears in a
response header, a response body or a ``ctxvars_mw`` log record (captured at DEBUG).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ctxvars_mw import ContextMiddleware, get_context, get_context_or_none
from ctxvars_mw.auth.jwt import JWTAuthenticator
from tests.scopes import http_scope

KEY = secrets.token_bytes(32)
USER = "auth0|5f7c8ec7c33c6c004bbafe82"
QUERY_PARAM = "access_token"
# A marker embedded in hostile values: if a refused value leaks anywhere, so does this.
MARK = b"zq9EVILq"
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- independent oracles, written from the contract (API.md), not from the code ----------------

_ID_RE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def _words(text: str) -> list[str]:
    """The space-separated words of ``text``."""
    return text.split()


# The placeholder values and short-id prefixes API.md lists, and the prefixed ids it allows;
# "-" too, what the log filter prints outside a request.
_PLACEHOLDERS = frozenset(
    _words(
        "registry placeholder default temp none null undefined 0 1 xxx yyy example test demo "
        "sample template mock fake dummy anonymous -"
    )
)
_PREFIXES = tuple(
    _words(
        "placeholder_ registry_ temp_ example_ demo_ sample_ template_ mock_ fake_ default_ test_"
    )
)
_PREFIX_OK = frozenset(
    _words(
        "default_user default_admin default_system default_account default_service "
        "default_client default_guest"
    )
)
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-\S*)?")
_GENERATED_RE = re.compile(r"[0-9a-f]{24}")


def accepted_id(values: list[bytes]) -> str | None:
    """The id the contract says is accepted from these header values (None: generate one)."""
    if len(values) != 1 or _ID_RE.fullmatch(values[0]) is None:
        return None
    value = values[0].decode("ascii")
    low = value.lower()
    if low in _PLACEHOLDERS:
        return None
    if len(value) < 20 and low.startswith(_PREFIXES) and low not in _PREFIX_OK:
        return None
    return value


def expected_trace_id(values: list[bytes]) -> str | None:
    """The W3C trace id of the one valid ``traceparent`` among ``values``, else None."""
    if len(values) != 1:
        return None
    try:
        text = values[0].decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        return None
    match = _TRACEPARENT_RE.fullmatch(text)
    if match is None or len(values[0]) > 512:
        return None
    version, trace_id, parent_id, _, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if version == "00" and rest:
        return None
    return trace_id


# -- the app under test and how it is driven ---------------------------------------------------


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with what the context says (never with any header value)."""
    ctx = get_context()
    await asyncio.sleep(0)
    summary = {
        "user_id": ctx.user_id,
        "authenticated": ctx.is_authenticated,
        "request_id": ctx.request_id,
        "correlation_id": ctx.correlation_id,
        "trace_id": ctx.trace_id,
    }
    body = json.dumps(summary).encode()
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body.decode()})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"json")]}
    )
    await send({"type": "http.response.body", "body": body})


AUTHENTICATOR = JWTAuthenticator(key=KEY, algorithms=["HS256"])
OPEN_APP = ContextMiddleware(
    echo_app, authenticator=AUTHENTICATOR, websocket_token_query_param=QUERY_PARAM
)
TRUSTING_APP = ContextMiddleware(
    echo_app,
    authenticator=AUTHENTICATOR,
    websocket_token_query_param=QUERY_PARAM,
    trust_incoming_baggage=True,
)
STRICT_APP = ContextMiddleware(
    echo_app,
    authenticator=AUTHENTICATOR,
    require_authentication=True,
    exempt_paths=("/public/*",),
    websocket_token_query_param=QUERY_PARAM,
)


_CLOSE_STATUS = {
    "invalid_token": 401,
    "authentication_required": 401,
    "invalid_request": 400,
    "insufficient_scope": 403,
    "temporarily_unavailable": 503,
}


@dataclass
class Outcome:
    """What one call produced: the messages sent, and the log text written meanwhile."""

    messages: list[dict[str, Any]]
    logs: str
    exposed: bytes = field(init=False)

    def __post_init__(self) -> None:
        parts: list[bytes] = [self.logs.encode("utf-8", "surrogateescape")]
        for message in self.messages:
            for name, value in message.get("headers", ()):
                parts += [name, value]
            parts += [message.get("body", b""), str(message.get("reason", "")).encode()]
            parts.append(message.get("text", "").encode("utf-8", "surrogateescape"))
        self.exposed = b"\n".join(parts)

    @property
    def status(self) -> int:
        """The HTTP status (or a websocket denial's status; 101 for an accepted websocket)."""
        first = self.messages[0]
        if first["type"] == "websocket.accept":
            return 101
        if first["type"] == "websocket.close":
            return _CLOSE_STATUS[first.get("reason", "")]
        return int(first["status"])

    def header(self, name: bytes) -> str:
        """The single value of response header ``name``."""
        values = [v for k, v in self.messages[0].get("headers", ()) if k.lower() == name]
        assert len(values) == 1, (name, values)
        return values[0].decode("ascii")

    def summary(self) -> dict[str, Any]:
        """What the app saw (only when it answered)."""
        last = [m for m in self.messages if m.get("body") or m.get("text")][-1]
        return dict(json.loads(last.get("body") or last["text"]))


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.args!r} {record.exc_text or ''}")
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@contextmanager
def captured_logs() -> Iterator[_ListHandler]:
    """Every ``ctxvars_mw`` record at DEBUG and above, formatted with its arguments."""
    logger = logging.getLogger("ctxvars_mw")
    handler = _ListHandler()
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def call(app: Any, scope: dict[str, Any]) -> Outcome:
    """Run ``scope`` through ``app`` (the raw ASGI callable) on a fresh event loop."""
    http = scope["type"] == "http"
    inbox = [{"type": "http.request", "body": b""} if http else {"type": "websocket.connect"}]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop()
        return {"type": "http.disconnect"} if http else {"type": "websocket.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    with captured_logs() as logs:
        asyncio.run(app(scope, receive, send))
    assert get_context_or_none() is None
    return Outcome(messages, "\n".join(logs.lines))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed(payload: dict[str, Any]) -> str:
    """``payload`` as an HS256 JWT signed with KEY, by hand: PyJWT refuses odd claim types."""
    head = _b64url(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64url(json.dumps(payload).encode("utf-8"))
    mac = hmac.new(KEY, f"{head}.{body}".encode("ascii"), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(mac)}"


def token(claims: dict[str, Any] | None = None, key: bytes = KEY) -> str:
    """An HS256 JWT (PyJWT) for USER, expiring in 10 minutes, with ``claims`` merged in."""
    payload = {"sub": USER, "exp": int(time.time()) + 600, **(claims or {})}
    return jwt.encode(payload, key, algorithm="HS256")


# -- strategies ------------------------------------------------------------------------------

_SPECIAL = [b"\r\n", b"\n", b"\r", b"\x00", b"\xff\xfe", b"\xc3\x28", b" ", b"\t", b'"', b"%0d%0a"]
junk = st.one_of(st.binary(max_size=24), st.sampled_from(_SPECIAL))
marked = st.builds(lambda a, b: a + MARK + b, junk, junk)
huge = st.builds(
    lambda n, fill: MARK + fill * n,
    st.integers(100, 65_536),
    st.sampled_from([b"a", b"\xff", b"\r\n", b"\x00", b"-", b"9"]),
)
near_valid_id = st.from_regex(rb"[A-Za-z0-9._:-]{1,140}", fullmatch=True)
placeholder = st.sampled_from(sorted(_PLACEHOLDERS | {"test_user", "DEFAULT", "mock_1"})).map(
    str.encode
)
hostile_value = st.one_of(st.binary(max_size=300), marked, huge, near_valid_id, placeholder)
header_name = st.one_of(
    st.sampled_from(
        [
            b"x-request-id",
            b"x-correlation-id",
            b"traceparent",
            b"tracestate",
            b"baggage",
            b"authorization",
            b"sec-websocket-protocol",
            b"cookie",
            b"host",
        ]
    ),
    st.binary(max_size=30),
)
bearer_value = st.builds(
    lambda scheme, value: scheme + value,
    st.sampled_from([b"Bearer ", b"bearer ", b"BEARER  ", b"Bearer", b"Basic ", b"Bearer\t"]),
    hostile_value,
)
header_list = st.lists(
    st.one_of(
        st.tuples(header_name, hostile_value),
        st.tuples(st.just(b"authorization"), bearer_value),
    ),
    max_size=12,
)
filler_count = st.integers(0, 3000)


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of header ``name``, in order."""
    return [v for k, v in headers if k == name]


def _check_ids(out: Outcome, headers: list[tuple[bytes, bytes]]) -> None:
    """Refused ids are replaced (never echoed); accepted ones are used as they came."""
    rid = accepted_id(_values(headers, b"x-request-id"))
    cid = accepted_id(_values(headers, b"x-correlation-id"))
    got_rid, got_cid = out.header(b"x-request-id"), out.header(b"x-correlation-id")
    if rid is None:
        assert _GENERATED_RE.fullmatch(got_rid), got_rid
    else:
        assert got_rid == rid
    assert got_cid == (got_rid if cid is None else cid)
    accepted = {v.encode() for v in (rid, cid) if v is not None}
    if not any(MARK in value for value in accepted):
        assert MARK not in out.exposed


# -- the properties --------------------------------------------------------------------------


@FUZZ
@given(headers=header_list, fillers=filler_count, trusting=st.booleans())
@example(headers=[(b"x-request-id", MARK + b"a" * 65_536)], fillers=0, trusting=True)
@example(headers=[(b"x-request-id", b"abc\r\nset-cookie: s=" + MARK)], fillers=5_000, trusting=True)
@example(
    headers=[(b"x-correlation-id", b"\x00" + MARK), (b"x-request-id", b"\xff" + MARK)],
    fillers=0,
    trusting=False,
)
@example(
    headers=[(b"authorization", b"Bearer " + MARK + b"\r\n"), (b"baggage", MARK)],
    fillers=0,
    trusting=True,
)
@example(
    headers=[(b"x-request-id", b"req-1234567890abcdef"), (b"x-request-id", b"req-1")],
    fillers=0,
    trusting=False,
)
@example(
    headers=[(b"x-request-id", b"r" * 129), (b"x-correlation-id", b"test_user")],
    fillers=0,
    trusting=True,
)
@example(
    headers=[(b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")],
    fillers=0,
    trusting=True,
)
def test_hostile_headers_never_500_and_refused_ids_never_leak(
    headers: list[tuple[bytes, bytes]], fillers: int, trusting: bool
) -> None:
    """Any header soup gets the status the contract names; refused ids never leak.

    ``trusting``: the middleware also parses incoming baggage/tracestate into the context.
    """
    headers = headers + [(f"x-filler-{n}".encode(), b"v") for n in range(fillers)]
    out = call(TRUSTING_APP if trusting else OPEN_APP, http_scope("/", headers))
    auth = _values(headers, b"authorization")
    if len(auth) > 1:
        assert out.status == 400
    elif auth and auth[0].partition(b" ")[0].lower() == b"bearer":
        assert out.status == 401  # no random value is a token signed with KEY
    else:
        assert out.status == 200
        seen = out.summary()
        assert seen["authenticated"] is False
        assert seen["request_id"] == out.header(b"x-request-id")
        assert seen["trace_id"] == expected_trace_id(_values(headers, b"traceparent"))
    _check_ids(out, headers)


scope_text = st.text(max_size=40)


def _token_bytes() -> bytes:
    """A valid token, minted when drawn (so it has not expired)."""
    return token().encode()


@st.composite
def random_scopes(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed http/websocket scopes with random paths, queries, clients and headers."""
    kind = draw(st.sampled_from(["http", "websocket"]))
    path = draw(st.one_of(st.just("/public/x"), st.just("/private"), scope_text))
    query_token = draw(st.one_of(st.binary(max_size=60), marked, st.builds(_token_bytes)))
    query = draw(
        st.one_of(
            st.binary(max_size=80),
            st.just(QUERY_PARAM.encode() + b"=" + quote_from_bytes(query_token).encode()),
        )
    )
    scope = http_scope(path, draw(header_list), query=query)
    scope.update(
        type=kind,
        client=draw(st.one_of(st.none(), st.tuples(st.just("10.0.0.1"), st.integers(0, 65535)))),
        root_path=draw(st.sampled_from(["", "/api"])),
        http_version=draw(st.sampled_from(["1.0", "1.1", "2"])),
    )
    if kind == "http":
        scope["method"] = draw(st.sampled_from(["GET", "POST", "DELETE", "PATCH", "BREW"]))
    else:
        scope["scheme"] = "ws"
        scope["subprotocols"] = draw(st.lists(scope_text, max_size=3))
        if draw(st.booleans()):
            scope["extensions"] = {"websocket.http.response": {}}
        del scope["method"]
    return scope


def _ws_scope(query: bytes) -> dict[str, Any]:
    """A websocket handshake scope with ``query`` as its query string."""
    scope = http_scope("/ws", [(b"x-request-id", MARK)], query=query)
    scope.update(type="websocket", scheme="ws", subprotocols=[])
    del scope["method"]
    return scope


@FUZZ
@given(scope=random_scopes(), strict=st.booleans())
@example(scope=_ws_scope(b"access_token=%E2%82%AC" + MARK), strict=False)  # was a 500
@example(scope=_ws_scope(b"access_token=%FF%00%0D%0A"), strict=True)
def test_random_scopes_are_answered_without_a_500(scope: dict[str, Any], strict: bool) -> None:
    """Random http/websocket scopes: answered (or refused) with ids set, never a crash."""
    out = call(STRICT_APP if strict else OPEN_APP, scope)
    assert out.messages, "nothing was sent"
    allowed = {200, 400, 401} if scope["type"] == "http" else {101, 400, 401, 403}
    assert out.status in allowed
    if out.messages[0]["type"] == "websocket.close":  # a refusal carries no ids at all
        assert MARK not in out.exposed
    else:
        _check_ids(out, scope["headers"])


_ALG_NONE = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()


def _effective(mutated: str, way: str) -> str:
    """The token the middleware reads from ``mutated`` (it trims the separators around it)."""
    if way == "header":
        return mutated.strip(" ")
    if way == "subprotocol":
        return mutated.encode().strip().decode()
    return mutated


def _mutate(original: str, data: st.DataObject) -> str:
    """One random edit of ``original``: replace, insert, delete, truncate, swap, re-case."""
    n = len(original)
    i = data.draw(st.integers(0, n - 1))
    char = data.draw(st.sampled_from("AaZz09-_.=+/ \x00é"))
    head, payload, sig = original.split(".")
    edits = {
        "replace": original[:i] + char + original[i + 1 :],
        "insert": original[:i] + char + original[i:],
        "delete": original[:i] + original[i + 1 :],
        "truncate": original[:i],
        "swap_segments": f"{payload}.{head}.{sig}",
        "drop_signature": f"{head}.{payload}.",
        "alg_none": f"{_ALG_NONE}.{payload}.{sig}",
        "swap_case": original.swapcase(),
        "other_key": token(key=secrets.token_bytes(32)),
    }
    return edits[data.draw(st.sampled_from(sorted(edits)))]


@FUZZ
@given(data=st.data(), way=st.sampled_from(["header", "subprotocol", "query", "twice"]))
def test_mutated_tokens_never_authenticate_and_never_leak(data: st.DataObject, way: str) -> None:
    """A mutated JWT is a 401 (400 when sent twice); only the exact token authenticates."""
    original = token()
    mutated = original if data.draw(st.booleans()) else _mutate(original, data)
    raw = mutated.encode("utf-8")
    headers: list[tuple[bytes, bytes]] = []
    scope = http_scope("/", headers)
    if way in ("header", "twice"):
        headers.append((b"authorization", b"Bearer " + raw))
    if way == "twice":
        headers.append((b"authorization", b"Bearer " + raw))
    if way in ("subprotocol", "query"):
        scope.update(type="websocket", scheme="ws", subprotocols=[])
        del scope["method"]
        if way == "subprotocol":
            offered = b"bearer, " + raw
            headers.append((b"sec-websocket-protocol", offered))
            # What a server makes of the header (uvicorn: split on commas, blanks stripped).
            scope["subprotocols"] = [p.strip() for p in offered.decode("latin-1").split(",")]
        else:
            scope["query_string"] = QUERY_PARAM.encode() + b"=" + quote_from_bytes(raw).encode()
    out = call(OPEN_APP, scope)
    if way == "twice":
        assert out.status == 400
    elif _effective(mutated, way) == original:
        assert out.status in (200, 101)
        assert out.summary()["user_id"] == USER
    else:
        assert out.status == 401, mutated
    assert original.encode() not in out.exposed
    if len(raw) >= 16:  # shorter fragments may occur in any text by chance
        assert raw not in out.exposed


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
claim_name = st.one_of(
    st.sampled_from(
        ["sub", "exp", "nbf", "iat", "iss", "aud", "tier", "roles", "permissions", "scope", "sid"]
    ),
    st.text(max_size=12),
)


@FUZZ
@given(claims=st.dictionaries(claim_name, json_value, max_size=6))
def test_signed_tokens_with_hostile_claims_are_200_or_401(claims: dict[str, Any]) -> None:
    """Validly signed tokens with odd claim types and values: a 200 for a sane subject, else 401."""
    raw = signed({"sub": USER, "exp": int(time.time()) + 600, **claims})
    out = call(OPEN_APP, http_scope("/", [(b"authorization", f"Bearer {raw}".encode())]))
    assert out.status in (200, 401)
    if out.status == 200:
        seen = out.summary()
        assert seen["authenticated"] is True
        assert seen["user_id"] == claims.get("sub", USER)
        assert isinstance(claims.get("exp", 0), int | float)
    assert raw.encode() not in out.exposed


traceparent = st.one_of(
    st.from_regex(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", fullmatch=True),
    st.from_regex(r"[ \t]?[0-9a-fA-F]{2}-[0-9a-f0]{30,33}-[0-9a-f0]{15,17}-0[01](-.{0,6})?[ \t]?"),
    st.just("00-" + "0" * 32 + "-" + "1" * 16 + "-01"),
    st.just("ff-" + "a" * 32 + "-" + "b" * 16 + "-01"),
    st.just("01-" + "a" * 32 + "-" + "b" * 16 + "-01-future-extension"),
    st.text(max_size=80),
).map(lambda text: text.encode("utf-8"))
baggage = st.one_of(
    st.binary(max_size=200),
    marked,
    huge,
    st.lists(
        st.tuples(st.text(max_size=10), st.text(max_size=20)).map(lambda kv: "=".join(kv)),
        max_size=80,
    ).map(lambda items: ",".join(items).encode("utf-8")),
)


@FUZZ
@given(parents=st.lists(traceparent, max_size=2), baggages=st.lists(baggage, max_size=2))
def test_random_trace_headers_yield_a_valid_trace_id_or_none(
    parents: list[bytes], baggages: list[bytes]
) -> None:
    """Random traceparent/baggage: the trace id is that of one valid traceparent, else None."""
    headers = [(b"traceparent", p) for p in parents] + [(b"baggage", b) for b in baggages]
    out = call(OPEN_APP, http_scope("/", headers))
    assert out.status == 200
    assert out.summary()["trace_id"] == expected_trace_id(parents)
    if expected_trace_id(parents) is None:
        assert all(p not in out.exposed for p in parents if len(p) >= 16)
    assert MARK not in out.exposed


def test_an_app_error_is_a_500_without_the_exception_text() -> None:
    """Only the app raising gives a 500: a fixed body with the id headers, the error re-raised."""

    async def failing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError(f"secret detail {MARK.decode()}")

    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    app = ContextMiddleware(failing_app, authenticator=AUTHENTICATOR)
    with captured_logs() as logs, pytest.raises(RuntimeError):
        asyncio.run(app(http_scope("/", [(b"x-request-id", b"\r\nINJECTED")]), receive, send))
    out = Outcome(messages, "\n".join(logs.lines))
    assert out.status == 500
    assert MARK not in out.exposed
    assert b"INJECTED" not in out.exposed
    assert _GENERATED_RE.fullmatch(out.header(b"x-request-id"))
