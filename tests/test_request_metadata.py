"""The request metadata in the context: client_ip, user_agent, method and path.

Real Starlette apps through their TestClient (http and websocket), the raw ASGI callable
where a scope must be shaped by hand, and one real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ctxvars_mw import (
    ConfigurationError,
    ContextMiddleware,
    UserExecutionContext,
    get_context,
    requires_role,
)
from ctxvars_mw.integrations.starlette import install_exception_handlers
from ctxvars_mw.logging import ContextLogFilter
from ctxvars_mw.proxies import TrustedProxies
from ctxvars_mw.request_metadata import (
    MAX_METHOD_LENGTH,
    MAX_PATH_LENGTH,
    MAX_USER_AGENT_LENGTH,
    REQUEST_METADATA_FIELDS,
    MetadataReader,
    check_metadata_names,
    clean_text,
)
from ctxvars_mw.types import Receive, Scope, Send
from tests.apps.metadata_app import starlette_app
from tests.scopes import call, http_scope
from tests.servers import uvicorn_server

PEER = ("203.0.113.7", 51234)
PROXY = ("10.0.0.5", 40000)
UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0"


def client_for(app: Any, peer: tuple[str, int] = PEER) -> TestClient:
    """A TestClient whose requests come from ``peer``."""
    return TestClient(app, client=peer)


def seen(app: Any, path: str = "/", peer: tuple[str, int] = PEER, **kwargs: Any) -> Any:
    """The metadata the app's context held for one GET request."""
    with client_for(app, peer) as client:
        return client.get(path, **kwargs).json()


# -- what is recorded ----------------------------------------------------------------------


def test_an_http_request_records_its_client_user_agent_method_and_path() -> None:
    """By default the context holds the peer's address, the user agent, method and path;
    the query string is never part of the path."""
    app = ContextMiddleware(starlette_app())
    with client_for(app) as client:
        got = client.post("/reports/42?token=secret&x=1", headers={"User-Agent": UA}).json()
    assert got == {"client_ip": PEER[0], "user_agent": UA, "method": "POST", "path": "/reports/42"}


def test_a_websocket_records_no_method() -> None:
    """A websocket handshake has a client, user agent and path, but no HTTP method."""
    app = ContextMiddleware(starlette_app())
    with (
        client_for(app) as client,
        client.websocket_connect("/ws", headers={"User-Agent": UA}) as ws,
    ):
        got = ws.receive_json()
    assert got == {"client_ip": PEER[0], "user_agent": UA, "method": None, "path": "/ws"}


def test_an_absent_user_agent_and_a_peer_without_an_address_are_none() -> None:
    """No User-Agent header → None; a peer that is not an IP address (Starlette's
    ``testclient``, a unix socket) → None."""
    app = ContextMiddleware(starlette_app())
    with TestClient(app) as client:  # its peer is ("testclient", 50000)
        client.headers.pop("user-agent")
        got = client.get("/").json()
    assert got["client_ip"] is None
    assert got["user_agent"] is None


async def test_a_scope_without_a_client_records_none() -> None:
    """``scope["client"]`` may be None (a unix socket), or hold no address: unknown."""
    assert (await context_of({"client": None})).client_ip is None
    assert (await context_of({"client": ["unix:/run/app.sock", 0]})).client_ip is None
    assert (await context_of({"client": ["203.0.113.9", 1]})).client_ip == "203.0.113.9"


@pytest.mark.parametrize("client", [7, object(), {"host": "203.0.113.9"}, ("203.0.113.9",)])
async def test_a_scope_client_that_is_not_a_pair_records_none_when_read(client: object) -> None:
    """A server that puts something else than ``[host, port]`` in ``scope["client"]`` gives
    an unknown client (or the host, when it comes first), never an error on first read."""
    ctx = await context_of({"client": client})
    assert ctx.client_ip == ("203.0.113.9" if type(client) is tuple else None)
    assert ctx.path == "/"


async def test_values_that_are_not_asgi_ones_record_none_when_read() -> None:
    """A server or middleware that puts text where ASGI has bytes (a header value) or a list
    where it has text (the method) gives no value for those fields, never an error on their
    first read; a forwarded header that is not bytes is ignored (the peer is the client)."""
    found: list[UserExecutionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        found.append(get_context())
        await PlainTextResponse("ok")(scope, receive, send)

    headers: Any = ((b"user-agent", "curl/8"), (b"x-forwarded-for", "198.51.100.4"))
    scope = http_scope("/", headers, client=PEER)
    scope["method"] = ["GET"]
    await call(ContextMiddleware(app, trusted_proxies=["*"]), scope)
    ctx = found[0]
    assert (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path) == (PEER[0], None, None, "/")


def test_an_ipv6_peer_is_recorded_in_canonical_form() -> None:
    """An IPv6 peer is recorded compressed and lowercase; an IPv4-mapped one as its IPv4."""
    app = ContextMiddleware(starlette_app())
    assert seen(app, peer=("2001:DB8:0:0::17", 1))["client_ip"] == "2001:db8::17"
    assert seen(app, peer=("::ffff:198.51.100.4", 1))["client_ip"] == "198.51.100.4"


# -- proxies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "198.51.100.99"},
        {"Forwarded": "for=198.51.100.99"},
        {"X-Forwarded-For": "198.51.100.99, 10.0.0.1", "Forwarded": 'for="[2001:db8::9]"'},
        {"X-Real-IP": "198.51.100.99"},
    ],
)
def test_forwarded_headers_from_an_untrusted_peer_are_ignored(headers: dict[str, str]) -> None:
    """Without trusted proxies (the default), or from a peer that is not one, a client
    cannot choose its own address."""
    untrusting = ContextMiddleware(starlette_app())
    elsewhere = ContextMiddleware(starlette_app(), trusted_proxies=["10.0.0.0/8"])
    for app in (untrusting, elsewhere):
        assert seen(app, headers=headers)["client_ip"] == PEER[0]


def test_a_trusted_proxy_names_the_client_in_x_forwarded_for() -> None:
    """From a trusted peer the X-Forwarded-For chain is walked from the right past the
    trusted proxies; an address the client put on the left is not believed."""
    app = ContextMiddleware(starlette_app(), trusted_proxies=["10.0.0.0/8"])
    chain = {"X-Forwarded-For": "198.51.100.99, 203.0.113.50, 10.0.0.9"}
    assert seen(app, peer=PROXY, headers=chain)["client_ip"] == "203.0.113.50"
    ipv6 = {"X-Forwarded-For": "[2001:db8::1]:4711"}
    assert seen(app, peer=PROXY, headers=ipv6)["client_ip"] == "2001:db8::1"


def test_an_ipv6_proxy_network_is_trusted() -> None:
    """Trusted proxies may be IPv6 networks."""
    app = ContextMiddleware(starlette_app(), trusted_proxies=["2001:db8:ffff::/48"])
    got = seen(app, peer=("2001:db8:ffff::2", 1), headers={"X-Forwarded-For": "192.0.2.60"})
    assert got["client_ip"] == "192.0.2.60"


def test_a_trusted_proxy_names_the_client_in_forwarded() -> None:
    """With ``forwarded_header="Forwarded"`` the RFC 7239 ``for=`` parameters are read, and
    X-Forwarded-For (which the proxy does not write) is ignored."""
    app = ContextMiddleware(
        starlette_app(), trusted_proxies=["10.0.0.0/8"], forwarded_header="Forwarded"
    )
    headers = {
        "Forwarded": 'for=198.51.100.99, for="[2001:db8:cafe::17]:4711";proto=https',
        "X-Forwarded-For": "192.0.2.1",
    }
    assert seen(app, peer=PROXY, headers=headers)["client_ip"] == "2001:db8:cafe::17"
    assert seen(app, peer=PROXY, headers={"X-Forwarded-For": "192.0.2.1"})["client_ip"] == PROXY[0]


def test_x_forwarded_for_sent_twice_is_read_as_one_list() -> None:
    """A proxy that adds a header line of its own (HAProxy) does not let the client's line win."""
    app = ContextMiddleware(starlette_app(), trusted_proxies=["10.0.0.0/8"])
    lines = [(b"x-forwarded-for", b"198.51.100.99"), (b"x-forwarded-for", b"203.0.113.50")]
    with client_for(app, PROXY) as client:
        got = client.get("/", headers=httpx.Headers(lines)).json()
    assert got["client_ip"] == "203.0.113.50"


@pytest.mark.parametrize(
    "forwarded",
    ["unknown", "_hidden", "<script>alert(1)</script>", "198.51.100.1\r\nX: y", "x" * 5000],
)
def test_an_obfuscated_or_garbage_forwarded_value_is_never_recorded(
    forwarded: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry that is no address falls back to the last trusted hop; the value is not
    recorded, logged or sent back."""
    caplog.set_level(logging.DEBUG)
    app = ContextMiddleware(starlette_app(), trusted_proxies=["10.0.0.0/8"])
    with client_for(app, PROXY) as client:
        response = client.get("/", headers={"X-Forwarded-For": forwarded.replace("\r\n", " ")})
    assert response.json()["client_ip"] == PROXY[0]
    assert forwarded[:20] not in caplog.text
    assert all(forwarded[:20] not in v for v in response.headers.values())


def test_trusting_every_peer_takes_the_leftmost_address() -> None:
    """``trusted_proxies=["*"]`` believes any peer, as uvicorn's ``forwarded_allow_ips="*"``."""
    app = ContextMiddleware(starlette_app(), trusted_proxies=["*"])
    headers = {"X-Forwarded-For": "198.51.100.99, 203.0.113.50"}
    assert seen(app, headers=headers)["client_ip"] == "198.51.100.99"


def test_no_forwarded_header_keeps_the_trusted_peer() -> None:
    """A trusted proxy that forwarded nothing is itself the client."""
    app = ContextMiddleware(starlette_app(), trusted_proxies=["10.0.0.0/8"])
    assert seen(app, peer=PROXY)["client_ip"] == PROXY[0]


# -- sanitising ----------------------------------------------------------------------------


async def context_of(
    changes: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> UserExecutionContext:
    """The context a request with this scope (``changes`` to a plain one) gets."""
    found: list[UserExecutionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        found.append(get_context())
        await PlainTextResponse("ok")(scope, receive, send)

    scope = http_scope("/", headers, client=PEER)
    scope.update(changes)
    await call(ContextMiddleware(app), scope)
    return found[0]


EVIL_UA = "curl/8\r\n\x1b[31mroot logged in\x1b[0m\u202eevil\x00"


async def test_control_characters_are_replaced_and_long_values_cut() -> None:
    """Newlines, escapes, NUL and bidi overrides become U+FFFD; values are bounded."""
    ctx = await context_of(
        {"path": "/a\n\x1b[2Jb" + "c" * 10_000, "method": "PURGE\x00" + "X" * 100},
        ((b"user-agent", EVIL_UA.encode("utf-8") + b"\xff\xfe" + b"u" * 100_000),),
    )
    assert ctx.user_agent is not None
    assert ctx.path is not None
    assert ctx.method is not None
    assert ctx.user_agent.startswith("curl/8\ufffd\ufffd\ufffd[31mroot")
    for text, limit in (
        (ctx.user_agent, MAX_USER_AGENT_LENGTH),
        (ctx.path, MAX_PATH_LENGTH),
        (ctx.method, MAX_METHOD_LENGTH),
    ):
        assert len(text) == limit
        assert text.isprintable()
    assert ctx.path.startswith("/a\ufffd\ufffd[2Jb")
    assert ctx.method.startswith("PURGE\ufffd")


async def test_a_non_utf8_user_agent_is_decoded_safely() -> None:
    """Bytes that are not UTF-8 are replaced, never raised on."""
    ctx = await context_of({}, ((b"user-agent", b"Agent/\xff\xc0 1.0"),))
    assert ctx.user_agent == "Agent/\ufffd\ufffd 1.0"


async def test_a_repeated_user_agent_is_not_recorded() -> None:
    """Two User-Agent headers are ambiguous: none is recorded (and no marker leaks)."""
    ctx = await context_of({}, ((b"user-agent", b"a/1"), (b"user-agent", b"b/2")))
    assert ctx.user_agent is None


async def test_an_empty_or_odd_path_or_method_is_none() -> None:
    """A scope without a usable path or method records None for it."""
    ctx = await context_of({"path": "", "method": b"GET"})
    assert ctx.path is None
    assert ctx.method is None


def test_garbage_is_never_echoed_in_a_refusal_or_its_log(caplog: pytest.LogCaptureFixture) -> None:
    """A request refused at the door (an invalid id) with a hostile user agent and path:
    the 400 and the library's log lines carry neither."""
    caplog.set_level(logging.DEBUG)
    app = ContextMiddleware(starlette_app(), reject_invalid_ids=True)
    with client_for(app) as client:
        response = client.get(
            "/%1B[2Jdrop-table",
            headers={"User-Agent": "evil-agent-<script>", "X-Request-ID": "bad id!"},
        )
    assert response.status_code == 400
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("ctxvars_mw"))
    assert "refused" in ours
    for raw in ("evil-agent", "<script>", "drop-table", "bad id!"):
        assert raw not in response.text
        assert raw not in ours


@given(st.text(max_size=3000), st.integers(min_value=1, max_value=2048))
def test_clean_text_is_bounded_printable_and_accepted_by_the_context(
    value: str, limit: int
) -> None:
    """Whatever comes in, clean_text gives None or a printable text of at most ``limit``
    characters that the context's constructor accepts back."""
    cleaned = clean_text(value, limit)
    if cleaned is None:
        assert value == ""
        return
    assert 0 < len(cleaned) <= limit
    assert cleaned.isprintable()
    if limit <= MAX_PATH_LENGTH:
        assert UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", path=cleaned).path == cleaned


@given(st.binary(max_size=2000))
def test_any_user_agent_bytes_give_a_context_that_survives_its_envelope(raw: bytes) -> None:
    """Any User-Agent bytes are recorded so that to_dict/from_dict (the envelope) accept them."""
    reader = MetadataReader(["user_agent"], TrustedProxies(()))
    captured = reader.capture({"type": "http", "headers": []}, {b"user-agent": raw})
    _, user_agent, _, _ = reader.clean(captured)
    ctx = UserExecutionContext(user_id="user_2hNqYf3kT9xWzL").replace(user_agent=user_agent)
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx


# -- choosing the fields -------------------------------------------------------------------


def test_fields_can_be_turned_off_one_by_one() -> None:
    """``request_metadata`` names the fields recorded; the others stay None."""
    only_path = ContextMiddleware(starlette_app(), request_metadata=("path",))
    got = seen(only_path, "/x", headers={"User-Agent": UA})
    assert got == {"client_ip": None, "user_agent": None, "method": None, "path": "/x"}
    nothing = ContextMiddleware(starlette_app(), request_metadata=())
    assert set(seen(nothing, "/x", headers={"User-Agent": UA}).values()) == {None}


def test_a_field_that_is_off_costs_no_header_lookup() -> None:
    """Disabled fields add nothing to the headers the middleware looks for, and the
    forwarded header is looked for only when a proxy is trusted."""
    default = ContextMiddleware(starlette_app()).settings
    assert b"user-agent" in default.wanted
    assert b"x-forwarded-for" not in default.wanted
    off = ContextMiddleware(starlette_app(), request_metadata=()).settings
    assert off.metadata is None
    assert b"user-agent" not in off.wanted
    proxied = ContextMiddleware(starlette_app(), trusted_proxies=["10.0.0.1"]).settings
    assert b"x-forwarded-for" in proxied.wanted
    no_ip = ContextMiddleware(
        starlette_app(), trusted_proxies=["10.0.0.1"], request_metadata=["path"]
    ).settings
    assert b"x-forwarded-for" not in no_ip.wanted


@pytest.mark.parametrize(
    "options",
    [
        {"request_metadata": "path"},
        {"request_metadata": ["path", "referer"]},
        {"request_metadata": None},
        {"trusted_proxies": "10.0.0.1"},
        {"trusted_proxies": ["10.0.0.1/8"]},
        {"trusted_proxies": ["proxy.internal"]},
        {"forwarded_header": "X-Real-IP"},
    ],
)
def test_bad_metadata_options_are_configuration_errors(options: dict[str, Any]) -> None:
    """A single string, an unknown field, a bad proxy or header name fail at construction."""
    with pytest.raises(ConfigurationError):
        ContextMiddleware(starlette_app(), **options)


def test_the_chosen_names_come_back_in_field_order() -> None:
    """check_metadata_names keeps the declared order and drops repeats."""
    assert check_metadata_names("x", ["path", "client_ip", "path"]) == ("client_ip", "path")
    assert check_metadata_names("x", REQUEST_METADATA_FIELDS) == REQUEST_METADATA_FIELDS
    assert check_metadata_names("x", ()) == ()


# -- where the metadata shows --------------------------------------------------------------


def test_children_keep_the_requests_metadata() -> None:
    """A child context derived in a handler describes the same request."""

    async def endpoint(request: Request) -> JSONResponse:
        child = get_context().child("tool.search").child("tool.fetch")
        return JSONResponse([child.client_ip, child.user_agent, child.method, child.path])

    app = ContextMiddleware(Starlette(routes=[Route("/c", endpoint)]))
    with client_for(app) as client:
        assert client.get("/c", headers={"User-Agent": UA}).json() == [PEER[0], UA, "GET", "/c"]


def test_log_records_of_a_request_show_the_metadata_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A filter with ``request_metadata`` puts the fields on the records made in a request."""
    log = logging.getLogger("tests.metadata.app")

    async def endpoint(request: Request) -> PlainTextResponse:
        log.info("served")
        return PlainTextResponse("ok")

    handler = caplog.handler
    handler.addFilter(ContextLogFilter(request_metadata=["client_ip", "method", "path"]))
    caplog.set_level(logging.INFO, logger="tests.metadata.app")
    app = ContextMiddleware(Starlette(routes=[Route("/served", endpoint)]))
    with client_for(app) as client:
        client.get("/served?secret=1", headers={"User-Agent": UA})
    [record] = [r for r in caplog.records if r.name == "tests.metadata.app"]
    assert (record.client_ip, record.method, record.path) == (PEER[0], "GET", "/served")  # type: ignore[attr-defined]
    assert not hasattr(record, "user_agent")


def test_an_audit_record_of_a_denied_request_names_client_and_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ``ctxvars_mw.audit`` record of a 401 says where the request came from and what
    it asked for, as the context recorded it (sanitised)."""

    @requires_role("admin")
    async def admin(request: Request) -> PlainTextResponse:
        return PlainTextResponse("never")

    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    inner = Starlette(routes=[Route("/admin/{rest:path}", admin)])
    install_exception_handlers(inner)
    app = ContextMiddleware(inner)
    with client_for(app) as client:
        response = client.get("/admin/x%1B[2J", headers={"User-Agent": "scanner/1\x07"})
    assert response.status_code == 401
    [record] = [r for r in caplog.records if r.name == "ctxvars_mw.audit"]
    fields = {k: getattr(record, k) for k in REQUEST_METADATA_FIELDS}
    assert fields == {
        "client_ip": PEER[0],
        "user_agent": "scanner/1\ufffd",
        "method": "GET",
        "path": "/admin/x\ufffd[2J",
    }
    assert "\x1b" not in json.dumps(record.__dict__, default=str)


# -- a real server -------------------------------------------------------------------------


def test_a_real_uvicorn_records_the_real_client_address() -> None:
    """Over TCP to a real uvicorn the peer is 127.0.0.1; its X-Forwarded-For is ignored
    unless 127.0.0.1 is a trusted proxy, and then the forwarded client is recorded."""
    spoof = {"X-Forwarded-For": "198.51.100.99", "User-Agent": "real-client/1.0"}
    # uvicorn's own proxy handling is off, so the scope's client is the socket's peer.
    args = ("--no-proxy-headers",)
    with uvicorn_server("tests.apps.metadata_app:app", extra_args=args) as url:
        got = httpx.get(f"{url}/over/tcp?q=1", headers=spoof, timeout=10).json()
    assert got == {
        "client_ip": "127.0.0.1",
        "user_agent": "real-client/1.0",
        "method": "GET",
        "path": "/over/tcp",
    }
    with uvicorn_server("tests.apps.metadata_app:proxied", extra_args=args) as url:
        got = httpx.get(f"{url}/", headers=spoof, timeout=10).json()
    assert got["client_ip"] == "198.51.100.99"
