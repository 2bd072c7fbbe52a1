"""W3C Trace Context and Baggage: strict parsing (the W3C test suite's checks), formatting,
baggage that OpenTelemetry reads alike, and the middleware's trust option."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator

from ctxvars_mw import ConfigurationError, ContextMiddleware, get_context, w3c
from ctxvars_mw.auth.admission import REPEATED
from ctxvars_mw.types import Receive, Scope, Send
from ctxvars_mw.w3c import (
    NO_TRACE,
    RANDOM_TRACE_ID,
    SAMPLED,
    format_baggage,
    format_traceparent,
    incoming_metadata,
    is_trace_id,
    parse_baggage,
    parse_traceparent,
    parse_tracestate,
    trace_id_of,
    trace_of,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


# Every character the tracestate grammar allows in a key and in a value.
ALL_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
ALL_VALUE_CHARS = "".join(
    chr(c) for c in [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("rojo=00f067aa0ba902b7", "rojo=00f067aa0ba902b7"),
        (" rojo=1 ,, congo=t61rcWkgMzE\t", "rojo=1,congo=t61rcWkgMzE"),
        ("foo=1 \t , \t bar=2, \t baz=3", "foo=1,bar=2,baz=3"),
        ("foo=1\t \t,\t \tbar=2,\t \tbaz=3", "foo=1,bar=2,baz=3"),
        ("\t foo=1 \t", "foo=1"),
        ("tenant1@vendor=x y", "tenant1@vendor=x y"),
        (b"a/b*c_d-e=v", "a/b*c_d-e=v"),
        ("z" * 256 + "=1", "z" * 256 + "=1"),  # the longest simple key
        ("t" * 241 + "@" + "v" * 14 + "=1", "t" * 241 + "@" + "v" * 14 + "=1"),
        ("0tenant@v=1", "0tenant@v=1"),  # a tenant id may start with a digit
        (f"{ALL_KEY_CHARS}={ALL_VALUE_CHARS}", f"{ALL_KEY_CHARS}={ALL_VALUE_CHARS}"),
        (
            f"{ALL_KEY_CHARS}@a-z0-9_-*/={ALL_VALUE_CHARS}",
            f"{ALL_KEY_CHARS}@a-z0-9_-*/={ALL_VALUE_CHARS}",
        ),
        ("rojo=" + "x" * 256, "rojo=" + "x" * 256),  # the longest value
    ],
)
def test_valid_tracestate_is_normalized(raw: str | bytes, expected: str) -> None:
    """Valid members are kept in order, optional whitespace and empty members dropped."""
    assert parse_tracestate(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " , \t,",
        "Rojo=1",  # keys are lowercase
        "FOO=1",
        "foo =1",  # no blank between key and "="
        "foo.bar=1",  # "." is not a key character
        "rojo",  # no value
        "rojo=a=b",  # '=' is not allowed in a value
        "foo=bar=baz",
        "foo=,bar=3",  # an empty value
        "rojo=a\x01b",  # no control characters
        "rojo=ends-in-blank \x00",
        "1abc=x",  # simple keys start with a letter
        "t@Vendor=x",  # system ids are lowercase
        "foo@=1,bar=2",  # an empty system id
        "@foo=1,bar=2",  # an empty tenant id
        "foo@@bar=1,bar=2",
        "foo@bar@baz=1,bar=2",
        "t@1system=1",  # system ids start with a letter
        "foo=1," + "z" * 257 + "=1",  # simple key longer than 256
        "foo=1," + "t" * 242 + "@v=1",  # tenant id longer than 241
        "foo=1,t@" + "v" * 15 + "=1",  # system id longer than 14
        ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
        "rojo=" + "x" * 257,  # value longer than 256
        "rojo=caf\u00e9",
        b"rojo=\xff",
    ],
)
def test_invalid_tracestate_is_ignored_whole(raw: str | bytes) -> None:
    """Any invalid member makes the whole header invalid: it is ignored, never an error."""
    assert parse_tracestate(raw) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("foo=1,foo=1", "foo=1"),
        ("foo=1,foo=2", "foo=1"),
        ("foo=1,bar=2,foo=3,baz=4", "foo=1,bar=2,baz=4"),
        ("a@x=1,a@x=2,a@y=3", "a@x=1,a@y=3"),
    ],
)
def test_repeated_tracestate_keys_keep_their_first_member(raw: str, expected: str) -> None:
    """A duplicated key is dropped, not the header: the first member of each key is kept."""
    assert parse_tracestate(raw) == expected


def test_tracestate_holds_at_most_32_distinct_members() -> None:
    """32 members are kept; a 33rd invalidates the header; repeats do not count twice."""
    members = [f"bar{i:02d}={i:02d}" for i in range(1, 33)]
    assert parse_tracestate(",".join(members)) == ",".join(members)
    assert parse_tracestate(",".join([*members, "bar33=33"])) is None
    assert parse_tracestate(",".join([*members, "bar01=again"])) == ",".join(members)


def test_tracestate_over_512_characters_drops_long_members_then_the_last() -> None:
    """Past 512 characters, members over 128 characters go first, then members from the end."""
    long = "big=" + "x" * 200
    short = [f"k{i:02d}=" + "v" * 40 for i in range(12)]  # 44 characters each
    state = parse_tracestate(",".join([short[0], long, *short[1:]]))
    assert state is not None
    assert len(state) <= 512
    assert long not in state
    assert state == ",".join(short[:11])  # 11 fit in 512, the 12th (the last) is dropped
    assert parse_tracestate(",".join([long, *short[:6]])) == ",".join([long, *short[:6]])


def test_baggage_members_are_decoded_and_invalid_ones_skipped() -> None:
    """Properties are dropped, values percent-decoded, bad members skipped, first key wins."""
    raw = 'a=1;prop=2;flag, b = x%20y ,c=,bad key=1,q="quoted",d=%E2%82%AC,e=%FF,a=2'
    assert parse_baggage(raw) == {"a": "1", "b": "x y", "c": "", "d": "\u20ac", "e": "\ufffd"}


def test_baggage_over_the_limits_is_ignored_or_capped() -> None:
    """A header over 8,192 bytes is ignored; at most 64 members are kept."""
    assert parse_baggage("k=" + "v" * 8200) == {}
    assert len(parse_baggage(",".join(f"k{i}=v" for i in range(100)))) == 64
    assert parse_baggage(b"k=\xff\xfe") == {}
    assert parse_baggage(None) == {}


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True), st.text(max_size=40), max_size=20
    )
)
def test_formatted_baggage_parses_back_to_the_same_items(items: dict[str, str]) -> None:
    """format_baggage then parse_baggage is the identity (within the limits)."""
    assert parse_baggage(format_baggage(items.items())) == items


@given(st.text(max_size=300))
def test_parsers_never_raise_on_arbitrary_input(raw: str) -> None:
    """Whatever a caller sends, parsing returns a value and never raises."""
    assert isinstance(parse_baggage(raw), dict)
    assert parse_tracestate(raw) is None or isinstance(parse_tracestate(raw), str)


async def _context_app(scope: Scope, receive: Receive, send: Send) -> None:
    body = json.dumps(get_context().to_dict()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def _get(trust: bool, headers: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    app = ContextMiddleware(_context_app, trust_incoming_baggage=trust)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        response = await client.get("/", headers=headers)
    return response.status_code, response.json()


async def test_incoming_baggage_is_ignored_by_default() -> None:
    """Without trust_incoming_baggage, baggage and tracestate never enter the context."""
    status, ctx = await _get(
        False, [("baggage", "tenant=acme"), ("traceparent", TRACEPARENT), ("tracestate", "rojo=1")]
    )
    assert status == 200
    assert ctx["audit_metadata"] == {}
    assert ctx["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_trusted_baggage_and_tracestate_go_to_audit_metadata() -> None:
    """When trusted, repeated baggage headers are combined and tracestate kept with its trace."""
    headers = [
        ("baggage", "tenant=acme%20corp"),
        ("baggage", "region=eu"),
        ("traceparent", TRACEPARENT),
        ("tracestate", "rojo=00f067aa0ba902b7"),
    ]
    status, ctx = await _get(True, headers)
    assert status == 200
    assert ctx["audit_metadata"] == {
        "baggage": {"tenant": "acme corp", "region": "eu"},
        "tracestate": "rojo=00f067aa0ba902b7",
    }


def test_remembered_baggage_is_per_header_value_and_bounded() -> None:
    """Repeated baggage reuses its parsed form; other values get their own; invalid baggage
    is remembered as empty; the memo stays within its bound."""
    acme = incoming_metadata([(b"baggage", b"tenant=acme")], None)
    again = incoming_metadata([(b"baggage", b"tenant=acme")], None)
    other = incoming_metadata([(b"baggage", b"tenant=globex")], None)
    split = incoming_metadata([(b"baggage", b"tenant=acme"), (b"baggage", b"region=eu")], None)
    assert acme["baggage"] == {"tenant": "acme"}
    assert again["baggage"] is acme["baggage"]
    assert other["baggage"] == {"tenant": "globex"}
    assert split["baggage"] == {"tenant": "acme", "region": "eu"}
    for _ in range(2):
        assert incoming_metadata([(b"baggage", b"bad key=1")], None) == {}
    for i in range(w3c._PARSED_BAGGAGE_MAX + 20):
        assert incoming_metadata([(b"baggage", b"n=%d" % i)], None)["baggage"] == {"n": str(i)}
    assert len(w3c._parsed_baggage) <= w3c._PARSED_BAGGAGE_MAX


@pytest.mark.parametrize(
    "headers",
    [
        [("tracestate", "rojo=1")],  # no traceparent: tracestate means nothing
        [
            ("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            ("tracestate", "rojo=1"),
        ],
        [("traceparent", TRACEPARENT), ("tracestate", "Bad=1")],
        [("baggage", "=novalue,bad key=1,\x7f=1")],
        [("baggage", "k=" + "v" * 9000)],
    ],
)
async def test_invalid_trace_headers_are_ignored_never_a_500(
    headers: list[tuple[str, str]],
) -> None:
    """Invalid tracestate/baggage (or a tracestate without a valid traceparent) is dropped."""
    status, ctx = await _get(True, headers)
    assert status == 200
    assert ctx["audit_metadata"] == {}


def test_trust_incoming_baggage_must_be_a_bool() -> None:
    """A truthy non-bool is a configuration mistake, caught at construction."""
    with pytest.raises(ConfigurationError):
        ContextMiddleware(_context_app, trust_incoming_baggage="yes")  # type: ignore[arg-type]


async def test_trusted_baggage_keeps_the_authenticated_identity() -> None:
    """Adding baggage to an authenticated context changes nothing else about it."""
    from tests.integrations.helpers import ALICE, TokenTableAuthenticator, bearer

    app = ContextMiddleware(
        _context_app, authenticator=TokenTableAuthenticator(), trust_incoming_baggage=True
    )
    headers = {**bearer("tok-alice-business-user"), "baggage": "tenant=acme"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        ctx = (await client.get("/", headers=headers)).json()
    assert ctx["user_id"] == ALICE
    assert ctx["tier"] == "business"
    assert ctx["auth_method"] == "api_key"
    assert "threads:write" in ctx["permissions"]
    assert ctx["audit_metadata"] == {"baggage": {"tenant": "acme"}}


@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.sampled_from([TRACEPARENT.encode(), b"00-bad", b""]),
)
@settings(max_examples=60, deadline=None)
def test_trusting_middleware_never_fails_on_arbitrary_trace_headers(
    baggage: bytes, tracestate: bytes, traceparent: bytes
) -> None:
    """Whatever bytes arrive in baggage/tracestate, the request is served (never a 500)."""
    import asyncio

    app = ContextMiddleware(_context_app, trust_incoming_baggage=True)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"baggage", baggage), (b"tracestate", tracestate), (b"traceparent", traceparent)]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert isinstance(json.loads(sent[1]["body"])["audit_metadata"], dict)


def test_parse_traceparent_valid() -> None:
    """A valid traceparent gives (trace_id, parent_id, flags), from str or bytes."""
    value = f"00-{TRACE_ID}-{SPAN_ID}-01"
    assert parse_traceparent(value) == (TRACE_ID, SPAN_ID, "01")
    assert parse_traceparent(value.encode()) == (TRACE_ID, SPAN_ID, "01")
    assert parse_traceparent(f" {value}\t") == (TRACE_ID, SPAN_ID, "01")


def test_parse_traceparent_future_version_may_carry_more_fields() -> None:
    """A version above 00 may append ``-…`` fields, which are ignored."""
    assert parse_traceparent(f"01-{TRACE_ID}-{SPAN_ID}-00-more") == (TRACE_ID, SPAN_ID, "00")
    assert parse_traceparent(f"cc-{TRACE_ID}-{SPAN_ID}-01") == (TRACE_ID, SPAN_ID, "01")
    future = f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-will-be-like"
    assert parse_traceparent(future) == (TRACE_ID, SPAN_ID, "01")


@pytest.mark.parametrize("blanks", [(" ", ""), ("\t", ""), ("", " "), ("", "\t"), ("\t ", " \t")])
def test_parse_traceparent_allows_optional_whitespace_around_it(
    blanks: tuple[str, str],
) -> None:
    """Spaces and tabs around the value (HTTP's OWS) are not part of it."""
    before, after = blanks
    value = f"{before}00-{TRACE_ID}-{SPAN_ID}-01{after}"
    assert parse_traceparent(value) == (TRACE_ID, SPAN_ID, "01")
    assert trace_of(value.encode()) == (TRACE_ID, 0x01)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"00-{TRACE_ID}-{SPAN_ID}-00".encode(), (TRACE_ID, 0x00)),
        (f"00-{TRACE_ID}-{SPAN_ID}-01".encode(), (TRACE_ID, 0x01)),
        (f"00-{TRACE_ID}-{SPAN_ID}-03".encode(), (TRACE_ID, 0x03)),
        (f"00-{TRACE_ID}-{SPAN_ID}-ff".encode(), (TRACE_ID, 0xFF)),
        (f"cc-{TRACE_ID}-{SPAN_ID}-02-more".encode(), (TRACE_ID, 0x02)),
        (f"00-{TRACE_ID}-{SPAN_ID}-0A".encode(), NO_TRACE),
        (REPEATED, NO_TRACE),  # two traceparent headers: neither is trusted
        (None, NO_TRACE),
    ],
)
def test_trace_of_gives_the_trace_id_and_flags(
    raw: bytes | None, expected: tuple[str | None, int]
) -> None:
    """trace_of reads the trace id and the flags byte; an invalid header gives NO_TRACE."""
    assert trace_of(raw) == expected


def test_formatted_traceparent_is_version_00_with_only_the_known_flags() -> None:
    """Outgoing flags keep sampled and random-trace-id; undefined bits are sent as zero."""
    assert format_traceparent(TRACE_ID, SPAN_ID, 0x00) == f"00-{TRACE_ID}-{SPAN_ID}-00"
    assert format_traceparent(TRACE_ID, SPAN_ID, SAMPLED) == f"00-{TRACE_ID}-{SPAN_ID}-01"
    assert format_traceparent(TRACE_ID, SPAN_ID, RANDOM_TRACE_ID) == f"00-{TRACE_ID}-{SPAN_ID}-02"
    assert format_traceparent(TRACE_ID, SPAN_ID, 0xFF) == f"00-{TRACE_ID}-{SPAN_ID}-03"
    assert format_traceparent(TRACE_ID, SPAN_ID, 0x08) == f"00-{TRACE_ID}-{SPAN_ID}-00"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"ff-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{'0' * 32}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID[:31]}-{SPAN_ID}-01",
        f"00-{TRACE_ID}0-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID[:15]}-01",
        f"00-{TRACE_ID}-{SPAN_ID}-001",
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",
        f"0A-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID}-01-extra",
        f"00-{TRACE_ID}-{SPAN_ID}-01x",
        f"01-{TRACE_ID}-{SPAN_ID}-01x",
        f"00_{TRACE_ID}_{SPAN_ID}_01",
        b"\xff\xfe",
        "00-" + "a" * 600,
        # The checks of the W3C test suite, one per way a traceparent can be wrong.
        f"00-{TRACE_ID}-{SPAN_ID}-01.",
        f"00-{TRACE_ID}-{SPAN_ID}-01-what-the-future-will-be-like",
        f"cc-{TRACE_ID}-{SPAN_ID}-01.what-the-future-will-be-like",
        f".0-{TRACE_ID}-{SPAN_ID}-01",
        f"0.-{TRACE_ID}-{SPAN_ID}-01",
        f"000-{TRACE_ID}-{SPAN_ID}-01",
        f"0000-{TRACE_ID}-{SPAN_ID}-01",
        f"0-{TRACE_ID}-{SPAN_ID}-01",
        f"00-.{TRACE_ID[1:]}-{SPAN_ID}-01",
        f"00-{TRACE_ID[:-1]}.-{SPAN_ID}-01",
        f"00-{TRACE_ID}3-{SPAN_ID}-01",
        f"00-{TRACE_ID}-.{SPAN_ID[1:]}-01",
        f"00-{TRACE_ID}-{SPAN_ID[:-1]}.-01",
        f"00-{TRACE_ID}-{SPAN_ID}7-01",
        f"00-{TRACE_ID}-{SPAN_ID}-.0",
        f"00-{TRACE_ID}-{SPAN_ID}-0.",
        f"00-{TRACE_ID}-{SPAN_ID}-1",
        f"00-{TRACE_ID}-{SPAN_ID}-0A",
        f"00-{TRACE_ID}-{SPAN_ID}-01\n",
    ],
)
def test_parse_traceparent_invalid(value: str | bytes | None) -> None:
    """Version ff, zero ids, wrong lengths, uppercase hex, trailing data on 00: None."""
    assert parse_traceparent(value) is None


@pytest.mark.parametrize(
    "raw",
    [
        f"00-{TRACE_ID}-{SPAN_ID}-01".encode(),
        f" 00-{TRACE_ID}-{SPAN_ID}-01".encode(),
        f"01-{TRACE_ID}-{SPAN_ID}-00-more".encode(),
        f"00-{'0' * 32}-{SPAN_ID}-01".encode(),
        f"00-{TRACE_ID}-{'0' * 16}-01".encode(),
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01".encode(),
        f"ff-{TRACE_ID}-{SPAN_ID}-01".encode(),
        b"\xff\xfe",
        b"",
    ],
)
def test_trace_id_of_a_header_agrees_with_parse_traceparent(raw: bytes) -> None:
    """The request path's trace id is parse_traceparent's, for valid and invalid headers."""
    parsed = parse_traceparent(raw)
    assert trace_id_of(raw) == (None if parsed is None else parsed[0])


def test_is_trace_id_takes_32_lowercase_hex_not_all_zero() -> None:
    """A trace id is 32 lowercase hex characters and not all zero."""
    assert is_trace_id(TRACE_ID)
    for bad in ("0" * 32, TRACE_ID.upper(), TRACE_ID[:31], TRACE_ID + "0", "g" * 32, None, 5):
        assert not is_trace_id(bad)


# -- baggage between this library and OpenTelemetry ------------------------------------------
# OpenTelemetry's W3CBaggagePropagator writes values with quote_plus (a space as "+") and reads
# them with unquote_plus; values cross in both directions unchanged.

INTEROP_VALUES = [
    "acme corp",
    "a+b",
    "1 + 1 = 2",
    "100%",
    "50%25 off",
    "x,y",
    "k;v",
    "a=b==",
    "caf\u00e9 \u2615",
    "\u65e5\u672c",
    'quote " and \\ backslash',
    "tab\tinside",
    "%2B",
    "",
]


@pytest.mark.parametrize("value", INTEROP_VALUES)
def test_baggage_written_by_opentelemetry_reads_the_same_here(value: str) -> None:
    """OpenTelemetry's header decodes to the value OpenTelemetry was given."""
    carrier: dict[str, str] = {}
    W3CBaggagePropagator().inject(carrier, context=baggage.set_baggage("tenant", value))
    assert parse_baggage(carrier["baggage"]) == {"tenant": value}


@pytest.mark.parametrize("value", INTEROP_VALUES)
def test_baggage_written_here_reads_the_same_in_opentelemetry(value: str) -> None:
    """Our header decodes, in OpenTelemetry, to the value we were given."""
    header = format_baggage([("tenant", value), ("tier", "business")])
    extracted = W3CBaggagePropagator().extract({"baggage": header})
    assert baggage.get_all(extracted) == {"tenant": value, "tier": "business"}


@given(st.text(max_size=40).filter(lambda v: v == v.strip()))
@settings(max_examples=200)
def test_any_baggage_value_crosses_to_and_from_opentelemetry(value: str) -> None:
    """For any value without surrounding blanks (OpenTelemetry strips those), both directions
    give the value back."""
    propagator = W3CBaggagePropagator()
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=baggage.set_baggage("k", value))
    assert parse_baggage(carrier["baggage"]) == {"k": value}
    extracted = propagator.extract({"baggage": format_baggage([("k", value)])})
    assert baggage.get_baggage("k", extracted) == value


def test_plus_is_written_as_percent_2b_and_read_as_a_space() -> None:
    """'+' never goes out literally (it would read as a space); an incoming '+' is a space."""
    assert format_baggage([("tenant", "a+b c")]) == "tenant=a%2Bb%20c"
    assert parse_baggage("tenant=acme+corp,plus=a%2Bb") == {"tenant": "acme corp", "plus": "a+b"}


async def test_middleware_reads_opentelemetry_baggage_as_sent() -> None:
    """A trusted caller instrumented with OpenTelemetry: its baggage arrives unchanged."""
    carrier: dict[str, str] = {}
    W3CBaggagePropagator().inject(carrier, context=baggage.set_baggage("tenant", "acme corp"))
    status, ctx = await _get(True, [("baggage", carrier["baggage"])])
    assert status == 200
    assert ctx["audit_metadata"] == {"baggage": {"tenant": "acme corp"}}
