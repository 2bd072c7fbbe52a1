"""Outgoing propagation: outgoing_headers() and the httpx transports, against a real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxvars_mw import (
    ConfigurationError,
    ContextMiddleware,
    Tier,
    UserExecutionContext,
    use_context,
)
from ctxvars_mw.propagation import (
    DEFAULT_BAGGAGE_KEYS,
    AsyncContextTransport,
    ContextTransport,
    outgoing_headers,
)
from ctxvars_mw.types import Receive, Scope, Send
from ctxvars_mw.w3c import parse_baggage, parse_traceparent
from tests.servers import uvicorn_server

ALICE = UserExecutionContext(
    user_id="auth0|5f7c8ec7c33c6c004bbafe82", tier=Tier.BUSINESS, roles={"user"}
)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACED = ALICE.replace(trace_id=TRACE)
# Baggage keys that name context fields or can never be forwarded.
RESERVED = {"user_id", "thread_id", "run_id", "tier", "operation", "auth_method"}
RESERVED |= {"session_id", "claims", "db_session", "authorization", "token"}


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    """A real uvicorn server that echoes the headers (and downstream context) it receives."""
    with uvicorn_server("tests.integrations.echo_app:routed") as url:
        yield url


def test_outgoing_headers_are_empty_outside_a_context() -> None:
    """Outside a request there is nothing to propagate."""
    assert outgoing_headers() == {}


def test_outgoing_headers_carry_the_current_ids() -> None:
    """X-Request-ID and X-Correlation-ID are the current context's ids."""
    child = ALICE.child("agent.plan")
    with use_context(child):
        headers = outgoing_headers()
    assert headers["X-Request-ID"] == child.request_id
    assert headers["X-Correlation-ID"] == ALICE.request_id == child.correlation_id


def test_traceparent_keeps_the_trace_id_with_a_new_parent_id_per_call() -> None:
    """Each call gets a fresh parent id under the context's trace id; without flags, 00."""
    first = parse_traceparent(outgoing_headers(TRACED)["traceparent"])
    second = parse_traceparent(outgoing_headers(TRACED)["traceparent"])
    assert first is not None
    assert second is not None
    assert first[0] == second[0] == TRACE
    assert first[1] != second[1]
    assert first[2] == "00"


def test_trace_id_without_incoming_trace_is_derived_from_the_correlation_id() -> None:
    """Without a trace id, every call made for one correlated request shares one trace."""
    parent = parse_traceparent(outgoing_headers(ALICE)["traceparent"])
    child = parse_traceparent(outgoing_headers(ALICE.child("tool.call"))["traceparent"])
    other = parse_traceparent(
        outgoing_headers(UserExecutionContext(user_id="user_2hNqYf3kT9xWzL"))["traceparent"]
    )
    assert parent is not None
    assert child is not None
    assert other is not None
    assert parent[0] == child[0]
    assert parent[0] != other[0]


def test_default_baggage_forwards_the_tier_only() -> None:
    """By default baggage carries the tier, never the user id or session id."""
    ctx = ALICE.replace(session_id="sess_4f6a9c1e2b7d8a0c5e3f")
    assert DEFAULT_BAGGAGE_KEYS == ("tier",)
    baggage = parse_baggage(outgoing_headers(ctx)["baggage"])
    assert baggage == {"tier": "business"}


def test_allow_listed_baggage_is_percent_encoded_and_round_trips() -> None:
    """Opted-in keys are encoded so that any value survives the W3C format."""
    tricky = "ünïcode, with; commas=and \\ backslash %20"
    ctx = ALICE.replace(audit_metadata={"baggage": {"tenant": tricky, "other": "x"}})
    header = outgoing_headers(ctx, baggage_keys=("user_id", "tenant"))["baggage"]
    assert " " not in header
    assert ";" not in header
    assert "\\" not in header
    assert parse_baggage(header) == {"user_id": ALICE.user_id, "tenant": tricky}


def test_baggage_stays_within_the_w3c_limits() -> None:
    """At most 64 members and 8,192 bytes are sent; oversized members are left out whole."""
    many = {f"k{i}": "v" * 100 for i in range(100)}
    ctx = ALICE.replace(audit_metadata={"baggage": many})
    header = outgoing_headers(ctx, baggage_keys=tuple(many))["baggage"]
    members = header.split(",")
    assert len(header.encode()) <= 8192
    assert all(m.endswith("v" * 100) for m in members)
    few = {f"k{i}": "v" for i in range(100)}
    header = outgoing_headers(
        ALICE.replace(audit_metadata={"baggage": few}), baggage_keys=tuple(few)
    )["baggage"]
    assert len(header.split(",")) == 64


@pytest.mark.parametrize(
    "key",
    ["session_id", "claims", "Authorization", "bad key", "", "client_ip", "User_Agent", "path"],
)
def test_baggage_keys_that_must_never_be_forwarded_are_refused(key: str) -> None:
    """Session ids, claims, credentials, the request's metadata and non-token keys cannot be
    allow-listed."""
    with pytest.raises(ConfigurationError):
        outgoing_headers(ALICE, baggage_keys=(key,))
    with pytest.raises(ConfigurationError):
        ContextTransport(baggage_keys=(key,))


def test_tracestate_is_forwarded_only_with_the_trace_it_came_with() -> None:
    """A trusted tracestate goes out next to its own trace id, never next to a derived one."""
    state = {"tracestate": "rojo=00f067aa0ba902b7"}
    assert (
        outgoing_headers(TRACED.replace(audit_metadata=state))["tracestate"] == state["tracestate"]
    )
    assert "tracestate" not in outgoing_headers(ALICE.replace(audit_metadata=state))


def test_transport_options_are_checked_at_construction() -> None:
    """A wrong wrapped transport or bearer token is a ConfigurationError, not a request error."""
    with pytest.raises(ConfigurationError):
        ContextTransport(httpx.AsyncHTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        AsyncContextTransport(httpx.HTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ContextTransport(bearer_token="two words")
    with pytest.raises(ConfigurationError):
        ContextTransport(baggage_keys="tier")
    with pytest.raises(ConfigurationError):
        outgoing_headers(ALICE, baggage_keys="tier")


def test_sync_transport_adds_headers_a_real_server_receives(echo_url: str) -> None:
    """A real uvicorn server sees our ids, traceparent and baggage — and no Authorization."""
    with httpx.Client(transport=ContextTransport(), base_url=echo_url) as client:
        with use_context(TRACED):
            got = client.get("/headers").json()
        outside = client.get("/headers").json()
    assert got["x-request-id"] == TRACED.request_id
    assert got["x-correlation-id"] == TRACED.correlation_id
    parsed = parse_traceparent(got["traceparent"])
    assert parsed is not None
    assert parsed[0] == TRACE
    assert got["baggage"] == "tier=business"
    assert "authorization" not in got
    assert not {"x-request-id", "traceparent", "baggage"} & set(outside)


def test_transport_never_overrides_headers_the_caller_set(echo_url: str) -> None:
    """An explicit header on the request wins over the context's."""
    mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with (
        httpx.Client(transport=ContextTransport(), base_url=echo_url) as client,
        use_context(ALICE),
    ):
        got = client.get(
            "/headers", headers={"traceparent": mine, "X-Request-ID": "req-mine-123"}
        ).json()
    assert got["traceparent"] == mine
    assert got["x-request-id"] == "req-mine-123"
    assert got["x-correlation-id"] == ALICE.correlation_id


def test_bearer_token_is_sent_only_when_configured(echo_url: str) -> None:
    """bearer_token (a str or a callable) is the only way an Authorization header is added."""
    tokens = iter(["on-behalf-of-token-1", None])
    transport = ContextTransport(bearer_token=lambda: next(tokens))
    with httpx.Client(transport=transport, base_url=echo_url) as client, use_context(ALICE):
        first = client.get("/headers").json()
        second = client.get("/headers").json()
        explicit = client.get("/headers", headers={"Authorization": "Basic abc"}).json()
    assert first["authorization"] == "Bearer on-behalf-of-token-1"
    assert "authorization" not in second
    assert explicit["authorization"] == "Basic abc"
    with httpx.Client(
        transport=ContextTransport(bearer_token="svc-token"), base_url=echo_url
    ) as client:
        assert client.get("/headers").json()["authorization"] == "Bearer svc-token"


async def test_async_transport_keeps_concurrent_requests_apart(echo_url: str) -> None:
    """Concurrent tasks, each in its own context, send their own ids through one client."""
    users = [UserExecutionContext(user_id=f"user_{i:02d}_5f7c8ec7c33c6c00") for i in range(20)]
    async with httpx.AsyncClient(transport=AsyncContextTransport(), base_url=echo_url) as client:

        async def call(ctx: UserExecutionContext) -> tuple[str, str]:
            async with use_context(ctx):
                await asyncio.sleep(0.001)
                got = (await client.get("/headers")).json()
                return ctx.request_id, got["x-request-id"]

        pairs = await asyncio.gather(*(call(u) for u in users))
    assert all(sent == seen for sent, seen in pairs)
    assert len({seen for _, seen in pairs}) == 20


async def test_downstream_service_continues_the_trace_and_correlation(echo_url: str) -> None:
    """A downstream ContextMiddleware adopts our trace and correlation ids and, trusting
    baggage, records it in audit_metadata."""
    ctx = ALICE.replace(trace_id=TRACE, audit_metadata={"tracestate": "congo=t61rcWkgMzE"})
    client = httpx.AsyncClient(transport=AsyncContextTransport(), base_url=echo_url)
    async with client, use_context(ctx):
        await asyncio.sleep(0)
        down = (await client.get("/context")).json()
    assert down["trace_id"] == TRACE
    assert down["correlation_id"] == ctx.correlation_id
    assert down["request_id"] == ctx.request_id
    assert down["user_id"] == "anonymous"
    assert down["audit_metadata"] == {
        "baggage": {"tier": "business"},
        "tracestate": "congo=t61rcWkgMzE",
    }


def test_id_header_names_can_follow_the_downstream_middleware() -> None:
    """request_id_header/correlation_id_header rename the two id headers, checked like the
    middleware's options."""
    with use_context(ALICE):
        headers = outgoing_headers(
            request_id_header="X-Amzn-Request-Id", correlation_id_header="Request-Chain"
        )
    assert headers["X-Amzn-Request-Id"] == ALICE.request_id
    assert headers["Request-Chain"] == ALICE.correlation_id
    assert "X-Request-ID" not in headers
    assert "X-Correlation-ID" not in headers
    for bad in (
        {"request_id_header": "X Request"},
        {"request_id_header": "traceparent"},
        {"correlation_id_header": "Baggage"},
        {"request_id_header": "A", "correlation_id_header": "a"},
    ):
        with pytest.raises(ConfigurationError):
            outgoing_headers(ALICE, **bad)
        with pytest.raises(ConfigurationError):
            AsyncContextTransport(**bad)


async def test_a_downstream_service_with_other_id_headers_keeps_the_correlation(
    echo_url: str,
) -> None:
    """A transport naming the downstream middleware's headers carries the ids into it."""
    transport = AsyncContextTransport(
        request_id_header="X-Amzn-Request-Id", correlation_id_header="Request-Chain"
    )
    async with httpx.AsyncClient(transport=transport, base_url=echo_url) as client:
        with use_context(TRACED):
            await asyncio.sleep(0)
            down = (await client.get("/custom/context")).json()
            default = (await client.get("/context")).json()
    assert down["correlation_id"] == TRACED.correlation_id
    assert down["request_id"] == TRACED.request_id
    assert down["trace_id"] == TRACE
    assert default["correlation_id"] != TRACED.correlation_id  # it reads X-Correlation-ID


def test_non_mapping_baggage_metadata_is_ignored() -> None:
    """audit_metadata["baggage"] set by hand to a non-mapping never breaks a call."""
    ctx = ALICE.replace(audit_metadata={"baggage": "tenant=acme"})
    assert outgoing_headers(ctx, baggage_keys=("tier", "tenant"))["baggage"] == "tier=business"


@given(
    st.sampled_from(list(Tier)),
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True).filter(lambda k: k not in RESERVED),
        st.text(max_size=30),
        max_size=8,
    ),
    st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_outgoing_headers_are_always_well_formed(
    tier: Tier, trusted: dict[str, str], traced: bool
) -> None:
    """For any tier and trusted baggage: a valid traceparent, and baggage that parses back to
    exactly the allow-listed values."""
    ctx = UserExecutionContext(
        user_id="auth0|5f7c8ec7c33c6c004bbafe82",
        tier=tier,
        audit_metadata={"baggage": trusted},
        trace_id=TRACE if traced else None,
    )
    headers = outgoing_headers(ctx, baggage_keys=("tier", *trusted))
    parsed = parse_traceparent(headers["traceparent"])
    assert parsed is not None
    assert (parsed[0] == TRACE) is traced
    assert parse_baggage(headers["baggage"]) == {"tier": tier.value, **trusted}


# -- incoming trace context, as a service forwards it ---------------------------------------
# The checks of the W3C Trace Context test suite, made through ContextMiddleware: the headers
# a request brings, and the trace context of the calls the service then makes.

SUITE_TRACE = "12345678901234567890123456789012"
SUITE_PARENT = "1234567890123456"


async def _forwarding_app(scope: Scope, receive: Receive, send: Send) -> None:
    body = json.dumps(outgoing_headers()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def _forwarded(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The headers a service behind ContextMiddleware sends on, for a request with
    ``headers``."""
    app = ContextMiddleware(_forwarding_app, trust_incoming_baggage=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        response = await client.get("/", headers=headers)
    assert response.status_code == 200
    forwarded: dict[str, str] = response.json()
    return forwarded


def _traceparent(headers: dict[str, str]) -> tuple[str, str, str]:
    parsed = parse_traceparent(headers["traceparent"])
    assert parsed is not None
    assert headers["traceparent"].startswith("00-")
    return parsed


@pytest.mark.parametrize(
    ("flags", "sent"), [("00", "00"), ("01", "01"), ("02", "02"), ("03", "03"), ("ff", "03")]
)
async def test_incoming_trace_flags_go_out_with_the_trace(flags: str, sent: str) -> None:
    """The sampled and random-trace-id flags travel on; undefined flag bits do not."""
    out = await _forwarded([("traceparent", f"00-{SUITE_TRACE}-{SUITE_PARENT}-{flags}")])
    assert _traceparent(out) == (SUITE_TRACE, _traceparent(out)[1], sent)
    assert _traceparent(out)[1] != SUITE_PARENT


async def test_future_traceparent_version_is_continued_as_version_00() -> None:
    """A later version's trace id and flags are kept, its extra fields dropped."""
    future = f"cc-{SUITE_TRACE}-{SUITE_PARENT}-01-what-the-future-will-be-like"
    trace_id, _, flags = _traceparent(await _forwarded([("traceparent", future)]))
    assert (trace_id, flags) == (SUITE_TRACE, "01")


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("traceparent", f"00-{'0' * 32}-{SUITE_PARENT}-01")],
        [("traceparent", f"00-{SUITE_TRACE}-{'0' * 16}-01")],
        [("traceparent", f"ff-{SUITE_TRACE}-{SUITE_PARENT}-01")],
        [("traceparent", f"00-{SUITE_TRACE}-{SUITE_PARENT}-01.")],
        [("trace-parent", f"00-{SUITE_TRACE}-{SUITE_PARENT}-01")],
        [
            ("traceparent", f"00-{SUITE_TRACE[:-1]}1-{SUITE_PARENT}-01"),
            ("traceparent", f"00-{SUITE_TRACE}-{SUITE_PARENT}-01"),
        ],
    ],
)
async def test_a_missing_invalid_or_repeated_traceparent_starts_a_new_trace(
    headers: list[tuple[str, str]],
) -> None:
    """Without one valid traceparent the service sends a trace of its own, flags 00."""
    trace_id, _, flags = _traceparent(await _forwarded(headers))
    assert trace_id not in (SUITE_TRACE, SUITE_TRACE[:-1] + "1", "0" * 32)
    assert flags == "00"


async def test_tracestate_headers_are_combined_in_order() -> None:
    """Several tracestate headers are one list; empty ones add nothing."""
    out = await _forwarded(
        [
            ("traceparent", f"00-{SUITE_TRACE}-{SUITE_PARENT}-00"),
            ("tracestate", "foo=1,bar=2"),
            ("tracestate", ""),
            ("tracestate", "rojo=1,congo=2"),
            ("tracestate", "baz=3"),
        ]
    )
    assert out["tracestate"] == "foo=1,bar=2,rojo=1,congo=2,baz=3"


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["foo=1", "foo=2"], "foo=1"),  # a key repeated across headers keeps its first value
        (["foo=1,foo=1"], "foo=1"),
        (["foo=1", "z" * 256 + "=1"], "foo=1," + "z" * 256 + "=1"),
        (["foo=1", "z" * 257 + "=1"], None),  # one invalid member: nothing is forwarded
        (["foo=1", "t@" + "v" * 15 + "=1"], None),
        (["foo@=1,bar=2"], None),
        ([""], None),
    ],
)
async def test_tracestate_is_forwarded_as_the_spec_says(
    states: list[str], expected: str | None
) -> None:
    """Repeated keys are dropped, an invalid list is not forwarded at all."""
    headers = [("traceparent", f"00-{SUITE_TRACE}-{SUITE_PARENT}-00")]
    out = await _forwarded(headers + [("tracestate", state) for state in states])
    assert out.get("tracestate") == expected


async def test_tracestate_without_a_valid_traceparent_is_not_forwarded() -> None:
    """A tracestate belongs to the trace it came with; without that trace it is dropped."""
    for headers in (
        [("tracestate", "foo=1,bar=2")],
        [("traceparent", f"00-{SUITE_TRACE}-{'0' * 16}-00"), ("tracestate", "foo=1")],
    ):
        assert "tracestate" not in await _forwarded(headers)


async def test_every_call_of_a_request_has_its_own_parent_id() -> None:
    """Three calls for one request: one trace, three parent ids."""
    app_calls: list[dict[str, str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        app_calls.extend(outgoing_headers() for _ in range(3))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    service = ContextMiddleware(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(service), base_url="http://t") as c:
        await c.get("/", headers={"traceparent": f"00-{SUITE_TRACE}-{SUITE_PARENT}-01"})
        await c.get("/")
    traced, untraced = app_calls[:3], app_calls[3:]
    assert {_traceparent(h)[0] for h in traced} == {SUITE_TRACE}
    assert len({_traceparent(h)[1] for h in traced}) == 3
    assert len({_traceparent(h)[0] for h in untraced}) == 1
    assert len({_traceparent(h)[1] for h in untraced}) == 3


def test_the_request_metadata_never_leaves_in_outgoing_headers() -> None:
    """A context that describes its request sends neither its client's address nor its
    user agent or path downstream."""
    ctx = ALICE.replace(
        client_ip="198.51.100.23", user_agent="agent-zz/9", method="PATCH", path="/p/xyz"
    )
    headers = outgoing_headers(ctx, baggage_keys=("tier", "user_id"))
    sent = json.dumps(headers)
    for value in ("198.51.100.23", "agent-zz", "PATCH", "/p/xyz"):
        assert value not in sent
