"""EventBus with the in-process backend: routing, isolation, ids, threads, overflow, cleanup."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from ctxvars_mw import (
    AuthenticationRequiredError,
    ConfigurationError,
    ContextNotSetError,
    UserExecutionContext,
    get_context,
    use_context,
)
from ctxvars_mw.events import EventBus, LocalBackend, MalformedMessageError
from ctxvars_mw.events.codec import decode, encode, parse_event_id


class RecordingSocket:
    """A websocket stand-in that records what it was sent and the context it was sent in."""

    def __init__(self, *, gate: asyncio.Event | None = None, fail: bool = False) -> None:
        self.messages: list[dict[str, Any]] = []
        self.sent_in: list[str] = []
        self.gate = gate
        self.fail = fail
        self.arrived = asyncio.Event()

    async def send_json(self, data: Any) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionResetError("peer went away")
        self.sent_in.append(get_context().request_id)
        self.messages.append(data)
        self.arrived.set()

    async def wait_for(self, count: int, within: float = 2.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(within):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages


def user_ctx(user_id: str) -> UserExecutionContext:
    """A fresh authenticated context for ``user_id``."""
    return UserExecutionContext(user_id=user_id)


@pytest.fixture
async def bus() -> AsyncIterator[EventBus]:
    async with EventBus() as started:
        yield started


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    """Poll ``predicate`` (a library-owned flag with no event to await) until it holds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - nothing to await: polling a plain flag
            await asyncio.sleep(0.01)


async def settle() -> None:
    """Let every ready task run a few steps (so a wrongly routed event would have arrived)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_events_reach_only_their_own_users_among_many(bus: EventBus) -> None:
    """Each of 50 users, with two sockets each, receives exactly its own events, never another's."""
    users = [f"auth0|user{i:04d}a1b2c3d4e5" for i in range(50)]
    sockets: dict[str, list[RecordingSocket]] = {
        u: [RecordingSocket(), RecordingSocket()] for u in users
    }
    ready = asyncio.Event()
    done = asyncio.Event()

    async def hold(user: str, socket: RecordingSocket) -> None:
        with use_context(user_ctx(user)):
            async with bus.connect(socket):
                if bus.connection_count == 2 * len(users):
                    ready.set()
                await done.wait()

    tasks = [asyncio.create_task(hold(u, s)) for u in users for s in sockets[u]]
    await asyncio.wait_for(ready.wait(), 2)
    for user in users:
        await bus.publish(user, {"for": user})
    for user in users:
        for socket in sockets[user]:
            messages = await socket.wait_for(1)
            assert [m["user_id"] for m in messages] == [user]
            assert messages[0]["event"] == {"for": user}
    await settle()
    assert all(len(s.messages) == 1 for pair in sockets.values() for s in pair)
    done.set()
    await asyncio.gather(*tasks)
    assert bus.connection_count == 0
    assert bus.user_count == 0


async def test_routing_is_by_exact_user_id_not_prefix(bus: EventBus) -> None:
    """An event for user 'alice-1' does not reach 'alice-10' or 'alice-1 ' look-alikes."""
    near = ["alice-1", "alice-10", "alice-1x", "Alice-1"]
    sockets = {u: RecordingSocket() for u in near}
    contexts = {u: user_ctx(u) for u in near}
    registrations = []
    for user in near:
        with use_context(contexts[user]):
            cm = bus.connect(sockets[user])
            await cm.__aenter__()
            registrations.append(cm)
    await bus.publish("alice-1", {"n": 1})
    await sockets["alice-1"].wait_for(1)
    await settle()
    assert [len(sockets[u].messages) for u in near] == [1, 0, 0, 0]
    for cm in registrations:
        await cm.__aexit__(None, None, None)


async def test_message_carries_publisher_ids_and_sends_in_connection_context(
    bus: EventBus,
) -> None:
    """The message holds the publisher's ids; send_json runs in the receiver's own context."""
    receiver = user_ctx("google-oauth2|1234567890")
    publisher = UserExecutionContext(
        user_id="service-account-9f8e7d", correlation_id="corr-abcdef0123456789"
    )
    socket = RecordingSocket()
    with use_context(receiver):
        async with bus.connect(socket) as sub:
            assert sub.user_id == receiver.user_id
            with use_context(publisher):
                await asyncio.sleep(0)
                published = await bus.publish(receiver.user_id, {"kind": "token", "text": "hi"})
            [message] = await socket.wait_for(1)
    assert message == {
        "type": "event",
        "user_id": receiver.user_id,
        "event": {"kind": "token", "text": "hi"},
        "request_id": publisher.request_id,
        "correlation_id": "corr-abcdef0123456789",
        "id": published.id,
    }
    assert published.connections == 1
    assert socket.sent_in == [receiver.request_id]


async def test_publish_with_no_context_at_all_has_null_ids(bus: EventBus) -> None:
    """Published from a task whose context has no UserExecutionContext, both ids are None."""
    socket = RecordingSocket()
    with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
        async with bus.connect(socket):
            empty = contextvars.Context()
            await asyncio.get_running_loop().create_task(
                bus.publish("user_2hNqYf3kT9xWzL", {"a": 1}), context=empty
            )
            [message] = await socket.wait_for(1)
    assert message["request_id"] is None
    assert message["correlation_id"] is None


async def test_thread_events_reach_that_thread_and_user_wide_sockets_only(bus: EventBus) -> None:
    """publish_to_thread reaches the thread's socket and the user's thread-less socket only."""
    user, other = "auth0|5f7c8ec7c33c6c004bbafe82", "auth0|00000000c33c6c004bbafe99"
    on_a, on_b, whole, others = (RecordingSocket() for _ in range(4))
    with use_context(user_ctx(user)):
        async with (
            bus.connect(on_a, thread_id="thread-aaaaaaaaaaaa"),
            bus.connect(on_b, thread_id="thread-bbbbbbbbbbbb"),
            bus.connect(whole),
        ):
            with use_context(user_ctx(other)):
                async with bus.connect(others, thread_id="thread-aaaaaaaaaaaa"):
                    await bus.publish_to_thread(user, "thread-aaaaaaaaaaaa", {"n": 1})
                    await bus.publish(user, {"n": 2})
                    await on_a.wait_for(2)
                    await whole.wait_for(2)
                    await on_b.wait_for(1)
                    await settle()
    assert [m["event"]["n"] for m in on_a.messages] == [1, 2]
    assert on_a.messages[0]["thread_id"] == "thread-aaaaaaaaaaaa"
    assert "thread_id" not in on_a.messages[1]
    assert [m["event"]["n"] for m in whole.messages] == [1, 2]
    assert [m["event"]["n"] for m in on_b.messages] == [2]
    assert others.messages == []


async def test_full_queue_drops_oldest_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With queue_size=3 and a stalled socket, the oldest events go, counted and logged once."""
    gate = asyncio.Event()
    socket = RecordingSocket(gate=gate)
    async with EventBus(queue_size=3) as bus:
        with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
            async with bus.connect(socket) as sub:
                await bus.publish("user_2hNqYf3kT9xWzL", {"n": 0})
                await settle()  # the sender now holds event 0, blocked in send_json
                with caplog.at_level(logging.WARNING, logger="ctxvars_mw.events"):
                    for n in range(1, 10):
                        await bus.publish("user_2hNqYf3kT9xWzL", {"n": n})
                assert sub.pending == 3
                gate.set()
                messages = await socket.wait_for(4)
                assert sub.dropped == 6
                assert bus.dropped_count == 6
    assert [m["event"]["n"] for m in messages] == [0, 7, 8, 9]
    assert len([r for r in caplog.records if "full" in r.getMessage()]) == 1


async def test_thousand_connects_and_disconnects_leave_no_registrations(bus: EventBus) -> None:
    """1,000 sockets that connect, receive and leave leave zero registrations and no tasks."""
    users = [f"user-{i:03d}-k9f8e7d6c5" for i in range(100)]
    before = len(asyncio.all_tasks())

    async def visit(user: str) -> None:
        socket = RecordingSocket()
        with use_context(user_ctx(user)):
            async with bus.connect(socket):
                await bus.publish_to_current_user({"hello": user})
                await socket.wait_for(1)

    for _ in range(10):
        await asyncio.gather(*(visit(u) for u in users))
    assert bus.connection_count == 0
    assert bus.user_count == 0
    assert all(bus.connections_for(u) == 0 for u in users)
    await settle()
    assert len(asyncio.all_tasks()) == before


async def test_failed_send_unregisters_the_connection(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket whose send raises is unregistered; the error text is not logged."""
    broken, healthy = RecordingSocket(fail=True), RecordingSocket()
    with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
        async with bus.connect(broken) as sub, bus.connect(healthy):
            with caplog.at_level(logging.WARNING, logger="ctxvars_mw.events"):
                await bus.publish("user_2hNqYf3kT9xWzL", {"n": 1})
                await healthy.wait_for(1)
                await settle()
            assert not sub.active
            assert bus.connection_count == 1
    assert bus.connection_count == 0
    assert "ConnectionResetError" in caplog.text
    assert "peer went away" not in caplog.text


async def test_send_slower_than_timeout_unregisters_the_connection() -> None:
    """A send that hangs past send_timeout unregisters the connection."""
    socket = RecordingSocket(gate=asyncio.Event())
    async with EventBus(send_timeout=0.05) as bus:
        with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
            async with bus.connect(socket) as sub:
                await bus.publish("user_2hNqYf3kT9xWzL", {"n": 1})
                await eventually(lambda: not sub.active)
                assert bus.connection_count == 0


async def test_cancelled_or_failing_endpoint_unregisters(bus: EventBus) -> None:
    """Leaving connect() by cancellation or by an error removes the registration."""
    entered = asyncio.Event()

    async def endpoint() -> None:
        with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
            async with bus.connect(RecordingSocket()):
                entered.set()
                await asyncio.Event().wait()

    task = asyncio.create_task(endpoint())
    await entered.wait()
    assert bus.connection_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bus.connection_count == 0
    with pytest.raises(RuntimeError, match="boom"), use_context(user_ctx("user_2hNqYf3kT9xWzL")):
        async with bus.connect(RecordingSocket()):
            raise RuntimeError("boom")
    assert bus.connection_count == 0


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (["not", "a", "mapping"], TypeError),
        ({"when": object()}, TypeError),
        ({1: "int key"}, TypeError),
        ({"x": float("nan")}, ValueError),
        ({"blob": "x" * 70_000}, ValueError),
    ],
)
async def test_publish_rejects_bad_events(bus: EventBus, event: Any, error: type) -> None:
    """Non-mappings, non-JSON values, non-str keys, NaN and oversized events are refused."""
    with pytest.raises(error):
        await bus.publish("user_2hNqYf3kT9xWzL", event)


async def test_publish_rejects_a_cyclic_event(bus: EventBus) -> None:
    """An event that contains itself is a ValueError, not a crash."""
    event: dict[str, Any] = {}
    event["self"] = event
    with pytest.raises(ValueError):
        await bus.publish("user_2hNqYf3kT9xWzL", event)


@pytest.mark.parametrize("user_id", ["", "anonymous", "test", " padded ", "x" * 300])
async def test_publish_rejects_invalid_user_ids(bus: EventBus, user_id: str) -> None:
    """Empty, anonymous, placeholder, padded and over-long user ids are refused."""
    with pytest.raises(ValueError):
        await bus.publish(user_id, {"a": 1})


async def test_publish_rejects_non_string_user_id(bus: EventBus) -> None:
    """A user id that is not a string is a TypeError."""
    with pytest.raises(TypeError):
        await bus.publish(12345, {"a": 1})  # type: ignore[arg-type]


async def test_connect_needs_an_authenticated_context(bus: EventBus) -> None:
    """Anonymous users (who share one id) cannot register; outside a request neither."""
    with use_context(UserExecutionContext.anonymous()), pytest.raises(AuthenticationRequiredError):
        async with bus.connect(RecordingSocket()):
            pass
    with pytest.raises(ContextNotSetError):
        async with bus.connect(RecordingSocket()):
            pass
    with pytest.raises(TypeError):
        bus.connect(object())  # type: ignore[arg-type]
    assert bus.connection_count == 0


async def test_publish_to_current_user_needs_authentication(bus: EventBus) -> None:
    """publish_to_current_user refuses an anonymous context."""
    with use_context(UserExecutionContext.anonymous()), pytest.raises(AuthenticationRequiredError):
        await bus.publish_to_current_user({"a": 1})


async def test_publisher_mutating_its_event_later_changes_nothing(bus: EventBus) -> None:
    """The delivered event is a copy: mutating the published dict afterwards is invisible."""
    socket = RecordingSocket()
    event: dict[str, Any] = {"items": [1, 2]}
    with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
        async with bus.connect(socket):
            await bus.publish("user_2hNqYf3kT9xWzL", event)
            event["items"].append(3)
            [message] = await socket.wait_for(1)
    assert message["event"] == {"items": [1, 2]}


async def test_bus_must_be_started_and_stop_unregisters_everything() -> None:
    """Publishing before start() fails; stop() unregisters every connection."""
    bus = EventBus()
    with pytest.raises(RuntimeError, match="not started"):
        await bus.publish("user_2hNqYf3kT9xWzL", {"a": 1})
    await bus.start()
    with pytest.raises(RuntimeError, match="already started"):
        await bus.start()
    entered = asyncio.Event()

    async def endpoint() -> None:
        with use_context(user_ctx("user_2hNqYf3kT9xWzL")):
            async with bus.connect(RecordingSocket()) as sub:
                entered.set()
                await eventually(lambda: not sub.active)

    task = asyncio.create_task(endpoint())
    await entered.wait()
    await bus.stop()
    await asyncio.wait_for(task, 2)
    assert bus.connection_count == 0


def test_bad_options_are_configuration_errors() -> None:
    """Bad queue sizes, limits, timeouts and backends fail at construction."""
    for kwargs in (
        {"queue_size": 0},
        {"queue_size": True},
        {"max_message_bytes": 10},
        {"send_timeout": 0},
        {"send_timeout": float("inf")},
        {"backend": object()},
    ):
        with pytest.raises(ConfigurationError):
            EventBus(**kwargs)


async def test_local_backend_serves_one_bus_only() -> None:
    """One LocalBackend cannot be shared by two running buses."""
    backend = LocalBackend()
    async with EventBus(backend):
        with pytest.raises(RuntimeError):
            await EventBus(backend).start()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1, 2]",
        b"[" * 50_000 + b"]" * 50_000,
        b'{"type": "event"}',
        b'{"type":"other","user_id":"u-123456","event":{},"request_id":null,"correlation_id":null}',
        b'{"type":"event","user_id":"","event":{},"request_id":null,"correlation_id":null}',
        b'{"type":"event","user_id":"u-123456","event":[],"request_id":null,"correlation_id":null}',
        b'{"type":"event","user_id":"u-123456","event":{},"request_id":7,"correlation_id":null}',
        b"\xff\xfe",
    ],
)
def test_decode_rejects_malformed_messages(data: bytes) -> None:
    """Garbage, deep nesting, missing keys and wrong types raise MalformedMessageError."""
    with pytest.raises(MalformedMessageError):
        decode(data, 1_000_000)


def test_decode_rejects_oversized_messages_and_accepts_what_encode_makes() -> None:
    """decode() enforces the size limit and round-trips encode()'s output."""
    data = encode("user-123456", "thread-1234", {"a": [1, "é"]}, "req-1", None, 1000)
    assert decode(data, 1000)["event"] == {"a": [1, "é"]}
    with pytest.raises(MalformedMessageError):
        decode(data, len(data) - 1)


def test_importing_events_does_not_import_redis() -> None:
    """ctxvars_mw.events imports redis only when a RedisBackend is constructed."""
    import subprocess

    code = "import sys, ctxvars_mw.events; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_events_have_increasing_ids_and_publish_counts_connections(bus: EventBus) -> None:
    """Each message carries its event id (increasing); publish returns it and how many
    connections of this process it was queued on."""
    alice, bob = "user_2hNqYf3kT9xWzL", "user_8pQrSt5uV7wXyZ"
    sockets = [RecordingSocket() for _ in range(3)]
    async with AsyncExitStack() as stack:
        for socket in sockets[:2]:
            with use_context(user_ctx(alice)):
                await stack.enter_async_context(bus.connect(socket))
        with use_context(user_ctx(bob)):
            await stack.enter_async_context(bus.connect(sockets[2]))
        results = [await bus.publish(alice, {"n": n}) for n in range(3)]
        nobody = await bus.publish("user_0000000000000000000000", {"n": 9})
        await sockets[0].wait_for(3)
    assert [r.connections for r in results] == [2, 2, 2]
    assert nobody.connections == 0
    assert [m["id"] for m in sockets[0].messages] == [r.id for r in results]
    numbers = [parse_event_id(r.id) for r in results]
    assert numbers == sorted(set(numbers))
    assert sockets[2].messages == []


async def _replayed(bus: EventBus, user: str, last: str | None, **kw: Any) -> Any:
    socket = RecordingSocket()
    with use_context(user_ctx(user)):
        async with bus.connect(socket, last_event_id=last, **kw) as sub:
            await settle()
    return sub, socket.messages


async def test_reconnect_with_last_event_id_gets_only_its_own_missed_events(
    bus: EventBus,
) -> None:
    """Replay after the client's last id: alice's missed events, in order, once; never bob's,
    nor another thread's; recovered=True."""
    alice, bob = "user_2hNqYf3kT9xWzL", "user_8pQrSt5uV7wXyZ"
    seen = await bus.publish(alice, {"n": 0})
    await bus.publish(alice, {"n": 1})
    await bus.publish(bob, {"bob": "secret"})
    await bus.publish_to_thread(alice, "thread-aaaaaaaaaaaa", {"n": 2})
    await bus.publish_to_thread(alice, "thread-bbbbbbbbbbbb", {"other": "thread"})
    sub, messages = await _replayed(bus, alice, seen.id)
    assert sub.recovered is True
    assert [m["event"] for m in messages] == [{"n": 1}, {"n": 2}, {"other": "thread"}]
    sub, messages = await _replayed(bus, alice, seen.id, thread_id="thread-aaaaaaaaaaaa")
    assert [m["event"] for m in messages] == [{"n": 1}, {"n": 2}]
    sub, messages = await _replayed(bus, bob, seen.id)
    assert [m["event"] for m in messages] == [{"bob": "secret"}]
    fresh, nothing = await _replayed(bus, alice, None)
    assert (fresh.recovered, nothing) == (False, [])


async def test_live_events_during_replay_are_sent_after_it_once() -> None:
    """Events published while the missed ones are fetched follow them, in id order, once."""

    class SlowHistory(LocalBackend):
        async def history(self, user_id: str, after: str, limit: int) -> Any:
            found = await super().history(user_id, after, limit)
            await bus.publish(user_id, {"n": "live"})  # arrives while the replay is built
            return found

    user = "user_2hNqYf3kT9xWzL"
    async with EventBus(SlowHistory()) as bus:
        seen = await bus.publish(user, {"n": 0})
        await bus.publish(user, {"n": 1})
        sub, messages = await _replayed(bus, user, seen.id)
    assert [m["event"] for m in messages] == [{"n": 1}, {"n": "live"}]
    assert sub.recovered is True


async def test_replay_beyond_the_window_is_marked_incomplete() -> None:
    """Events that fell out of the history (count or age) are gone; recovered=False says so."""
    now = [1_000_000.0]
    user = "user_2hNqYf3kT9xWzL"
    backend = LocalBackend(history_max_events=3, history_seconds=60, clock=lambda: now[0])
    async with EventBus(backend) as bus:
        ids = [(await bus.publish(user, {"n": n})).id for n in range(6)]
        sub, messages = await _replayed(bus, user, ids[0])
        assert (sub.recovered, [m["event"]["n"] for m in messages]) == (False, [3, 4, 5])
        sub, messages = await _replayed(bus, user, ids[3])
        assert (sub.recovered, [m["event"]["n"] for m in messages]) == (True, [4, 5])
        now[0] += 61
        sub, messages = await _replayed(bus, user, ids[4])
        assert (sub.recovered, messages) == (False, [])


async def test_replay_of_more_than_the_queue_holds_keeps_the_newest() -> None:
    """A replay never exceeds queue_size; the oldest missed events are the ones left out."""
    user = "user_2hNqYf3kT9xWzL"
    async with EventBus(queue_size=4) as bus:
        first = await bus.publish(user, {"n": -1})
        for n in range(10):
            await bus.publish(user, {"n": n})
        sub, messages = await _replayed(bus, user, first.id)
    assert [m["event"]["n"] for m in messages] == [6, 7, 8, 9]
    assert sub.recovered is False


async def test_same_idempotency_key_publishes_once_per_user(bus: EventBus) -> None:
    """A second publish with the key returns the first id and sends nothing; keys are per user."""
    user, other = "user_2hNqYf3kT9xWzL", "user_8pQrSt5uV7wXyZ"
    socket = RecordingSocket()
    with use_context(user_ctx(user)):
        async with bus.connect(socket):
            first = await bus.publish(user, {"n": 1}, idempotency_key="job-7:done")
            again = await bus.publish(user, {"n": 1}, idempotency_key="job-7:done")
            elsewhere = await bus.publish(other, {"n": 1}, idempotency_key="job-7:done")
            await socket.wait_for(1)
            await settle()
    assert first.id == again.id != elsewhere.id
    assert (first.connections, again.connections) == (1, 0)
    assert len(socket.messages) == 1


@pytest.mark.parametrize("bad", ["", "12", "1-2-3", "abc-1", "1-x", " 1-0", "1" * 20 + "-0"])
async def test_malformed_last_event_id_is_a_value_error(bus: EventBus, bad: str) -> None:
    """connect() refuses a malformed last_event_id without quoting it."""
    with use_context(user_ctx("user_2hNqYf3kT9xWzL")), pytest.raises(ValueError) as info:
        bus.connect(RecordingSocket(), last_event_id=bad)
    assert str(info.value).startswith("not an event id")


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "new\nline", 7])
async def test_bad_idempotency_key_is_a_value_error(bus: EventBus, bad: Any) -> None:
    """publish() refuses an idempotency key outside [A-Za-z0-9._:-]{1,128}."""
    with pytest.raises(ValueError, match="idempotency_key"):
        await bus.publish("user_2hNqYf3kT9xWzL", {"n": 1}, idempotency_key=bad)
