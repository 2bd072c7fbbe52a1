"""examples/w3c_service.py under a real uvicorn, driven the way the W3C test suite drives it.

A small harness server (a thread in this process, on 127.0.0.1) receives the calls the
service makes and records their headers, as the suite's own harness does.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ctxvars_mw.w3c import parse_traceparent, parse_tracestate
from tests.servers import free_port, uvicorn_server

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"

Headers = list[tuple[str, str]]


class Harness:
    """Records the headers of every POST it receives, by path."""

    def __init__(self) -> None:
        self.received: dict[str, Headers] = {}
        harness = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                harness.received[self.path] = list(self.headers.items())
                body = b"null"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """The harness server, running in a thread."""
    harness = Harness()
    thread = threading.Thread(target=harness.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield harness
    finally:
        harness.server.shutdown()
        harness.server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    """The example service under uvicorn."""
    with uvicorn_server("examples.w3c_service:app") as url:
        yield url


def _calls(service: str, harness: Harness, headers: Headers, count: int = 1) -> list[Headers]:
    """Send ``headers`` to the service, asking it to call the harness ``count`` times; the
    headers of each call the harness received."""
    scope = uuid.uuid4().hex
    paths = [f"/{scope}.{i}" for i in range(count)]
    body = [{"url": harness.url + path, "arguments": []} for path in paths]
    response = httpx.post(f"{service}/test", headers=headers, json=body, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"statuses": [200] * count}
    return [harness.received.pop(path) for path in paths]


def _trace(headers: Headers) -> tuple[str, str, str]:
    """The one traceparent a call carried, parsed."""
    values = [value for name, value in headers if name.lower() == "traceparent"]
    assert len(values) == 1
    assert values[0].startswith("00-")
    parsed = parse_traceparent(values[0])
    assert parsed is not None
    return parsed


def _state(headers: Headers) -> str | None:
    values = [value for name, value in headers if name.lower() == "tracestate"]
    assert len(values) <= 1
    return parse_tracestate(values[0]) if values else None


def test_a_request_without_trace_context_gets_a_trace_of_its_own(
    service: str, harness: Harness
) -> None:
    """No traceparent: the call carries a valid new one, and no tracestate."""
    (call,) = _calls(service, harness, [])
    trace_id, _, flags = _trace(call)
    assert trace_id != TRACE
    assert flags == "00"
    assert _state(call) is None


@pytest.mark.parametrize("name", ["traceparent", "TraceParent", "TrAcEpArEnT", "TRACEPARENT"])
def test_the_incoming_trace_is_continued_whatever_the_header_case(
    service: str, harness: Harness, name: str
) -> None:
    """Same trace id, a new parent id, the sampled flag kept."""
    (call,) = _calls(service, harness, [(name, TRACEPARENT)])
    assert _trace(call)[0] == TRACE
    assert _trace(call)[1] != PARENT
    assert _trace(call)[2] == "01"


@pytest.mark.parametrize(
    "headers",
    [
        [("trace-parent", TRACEPARENT)],
        [("trace.parent", TRACEPARENT)],
        [("traceparent", f"00-{TRACE[:-1]}1-{PARENT}-01"), ("traceparent", TRACEPARENT)],
        [("traceparent", f"00-{TRACE}-{PARENT}-01-what-the-future-will-be-like")],
        [("traceparent", f"ff-{TRACE}-{PARENT}-01")],
        [("traceparent", f"00-{TRACE}-{'0' * 16}-01")],
        [("traceparent", f"00-{TRACE}-{PARENT}-001")],
    ],
)
def test_a_wrong_or_repeated_traceparent_starts_a_new_trace(
    service: str, harness: Harness, headers: Headers
) -> None:
    """A misnamed, repeated or invalid traceparent is not continued."""
    (call,) = _calls(service, harness, headers)
    assert _trace(call)[0] not in (TRACE, TRACE[:-1] + "1")


def test_a_future_version_is_continued(service: str, harness: Harness) -> None:
    """Version cc with extra fields: its trace id and flags go on, as version 00."""
    future = f"cc-{TRACE}-{PARENT}-03-what-the-future-will-be-like"
    (call,) = _calls(service, harness, [("traceparent", future)])
    assert _trace(call)[0] == TRACE
    assert _trace(call)[2] == "03"


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([("TrAcEsTaTe", "foo=1")], "foo=1"),
        (
            [("tracestate", "foo=1,bar=2"), ("tracestate", "rojo=1,congo=2")],
            "foo=1,bar=2,rojo=1,congo=2",
        ),
        ([("tracestate", "foo=1"), ("tracestate", "foo=2")], "foo=1"),
        ([("tracestate", "foo=1"), ("tracestate", "")], "foo=1"),
        ([("tracestate", "foo=1"), ("tracestate", "z" * 257 + "=1")], None),
        ([("trace-state", "foo=1")], None),
    ],
)
def test_the_tracestate_travels_with_its_trace(
    service: str, harness: Harness, states: Headers, expected: str | None
) -> None:
    """Combined across headers, repeats dropped, invalid lists and wrong names not forwarded."""
    headers = [("traceparent", f"00-{TRACE}-{PARENT}-00"), *states]
    (call,) = _calls(service, harness, headers)
    assert _state(call) == expected


def test_each_call_has_its_own_parent_id(service: str, harness: Harness) -> None:
    """Three calls for one request: one trace, three parent ids, with or without a trace."""
    for headers in ([("traceparent", TRACEPARENT)], []):
        calls = _calls(service, harness, headers, count=3)
        assert len({_trace(call)[0] for call in calls}) == 1
        assert len({_trace(call)[1] for call in calls}) == 3
    assert _trace(_calls(service, harness, [("traceparent", TRACEPARENT)])[0])[0] == TRACE


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"url": "http://127.0.0.1:1/"}',
        b'[{"url": "file:///etc/passwd"}]',
        b'[{"url": "http://127.0.0.1:1/", "arguments": "x"}]',
        json.dumps([{"url": "http://127.0.0.1:1/"}] * 17).encode(),
        b"[1]",
    ],
)
def test_bad_instructions_are_a_400(service: str, body: bytes) -> None:
    """A body that is not a short list of http(s) calls is refused, and nothing is called."""
    response = httpx.post(f"{service}/test", content=body, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
