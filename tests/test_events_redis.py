"""EventBus over a real Redis: cross-instance delivery, isolation, bad messages, reconnection."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import pytest

from ctxvars_mw import (
    ConfigurationError,
    ServiceUnavailableError,
    UserExecutionContext,
    use_context,
)
from ctxvars_mw.events import EventBus, RedisBackend
from ctxvars_mw.events.codec import encode
from tests.servers import free_port, wait_for_port

from .test_events import RecordingSocket, settle

ALICE = "auth0|5f7c8ec7c33c6c004bbafe82"
BOB = "auth0|5f7c8ec7c33c6c004bbafe83"


@pytest.fixture
async def buses(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[EventBus, EventBus]]:
    """Two buses (as two processes would have) on one Redis, under this test's prefix."""
    async with (
        EventBus(RedisBackend(redis_url, channel_prefix=key_prefix)) as one,
        EventBus(RedisBackend(redis_url, channel_prefix=key_prefix)) as two,
    ):
        yield one, two


async def connect(stack: AsyncExitStack, bus: EventBus, user: str, **kw: Any) -> RecordingSocket:
    """Register a new socket for ``user`` on ``bus`` until ``stack`` closes."""
    socket = RecordingSocket()
    with use_context(UserExecutionContext(user_id=user)):
        await stack.enter_async_context(bus.connect(socket, **kw))
    return socket


async def test_events_cross_instances_and_stay_with_their_user(
    buses: tuple[EventBus, EventBus],
) -> None:
    """A publish on bus one reaches the user's sockets on both buses and no one else's."""
    one, two = buses
    async with AsyncExitStack() as stack:
        alice_one = await connect(stack, one, ALICE)
        alice_two = await connect(stack, two, ALICE)
        bob_two = await connect(stack, two, BOB)
        publisher = UserExecutionContext(user_id="svc-agent-runner-01")
        with use_context(publisher):
            await asyncio.sleep(0)
            await one.publish(ALICE, {"text": "for alice"})
        for socket in (alice_one, alice_two):
            [message] = await socket.wait_for(1)
            assert message == {
                "type": "event",
                "user_id": ALICE,
                "event": {"text": "for alice"},
                "request_id": publisher.request_id,
                "correlation_id": publisher.correlation_id,
            }
        await one.publish(BOB, {"text": "for bob"})
        [message] = await bob_two.wait_for(1)
        assert message["event"] == {"text": "for bob"}
        await settle()
        assert len(alice_one.messages) == len(alice_two.messages) == 1


async def test_thread_events_cross_instances_to_that_thread_only(
    buses: tuple[EventBus, EventBus],
) -> None:
    """publish_to_thread on one bus reaches the thread's socket on the other, not a sibling."""
    one, two = buses
    async with AsyncExitStack() as stack:
        thread_a = await connect(stack, two, ALICE, thread_id="thread-aaaaaaaaaaaa")
        thread_b = await connect(stack, two, ALICE, thread_id="thread-bbbbbbbbbbbb")
        await one.publish_to_thread(ALICE, "thread-bbbbbbbbbbbb", {"n": 1})
        await one.publish_to_thread(ALICE, "thread-aaaaaaaaaaaa", {"n": 2})
        [message] = await thread_a.wait_for(1)
        assert message["event"] == {"n": 2}
        assert message["thread_id"] == "thread-aaaaaaaaaaaa"
        [message] = await thread_b.wait_for(1)
        assert message["event"] == {"n": 1}


async def test_last_disconnect_unsubscribes_the_users_channel(
    buses: tuple[EventBus, EventBus], redis_client: Any
) -> None:
    """A user's channel is subscribed while they have a socket here, and only then."""
    one, _ = buses
    backend = one.backend
    assert isinstance(backend, RedisBackend)
    channel = backend.channel(ALICE)

    async def subscribers() -> int:
        return int(dict(await redis_client.pubsub_numsub(channel))[channel.encode()])

    async with AsyncExitStack() as stack:
        await connect(stack, one, ALICE)
        await connect(stack, one, ALICE)
        assert await subscribers() == 1
    async with asyncio.timeout(2):
        while await subscribers():  # noqa: ASYNC110 - polling Redis, nothing to await
            await asyncio.sleep(0.01)
    assert one.connection_count == 0


def test_channels_hash_user_ids() -> None:
    """Channel names are fixed-length hashes under the prefix: no id can mimic another's."""
    backend = RedisBackend("redis://127.0.0.1:6379/0", channel_prefix="app:")
    names = {backend.channel(u) for u in ("a", "a:", "a*", "a\nb", "A", "é")}
    assert len(names) == 6
    assert all(n.startswith("app:u:") and len(n) == len("app:u:") + 32 for n in names)


async def test_malformed_and_misrouted_messages_are_rejected_and_listening_goes_on(
    buses: tuple[EventBus, EventBus], redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, oversized and wrong-channel messages are counted and logged without content."""
    one, _ = buses
    backend = one.backend
    assert isinstance(backend, RedisBackend)
    channel = backend.channel(ALICE)
    for_bob = encode(BOB, None, {"secret": "bob-only"}, None, None, 65536)
    async with AsyncExitStack() as stack:
        alice = await connect(stack, one, ALICE)
        with caplog.at_level(logging.WARNING, logger="ctxvars_mw.events"):
            await redis_client.publish(channel, b"SECRET-GARBAGE{")
            await redis_client.publish(channel, b'{"pad": "' + b"x" * 70_000 + b'"}')
            await redis_client.publish(channel, for_bob)
            await one.publish(ALICE, {"still": "listening"})
            [message] = await alice.wait_for(1)
    assert message["event"] == {"still": "listening"}
    assert backend.rejected_count == 3
    assert "SECRET" not in caplog.text
    assert "bob-only" not in caplog.text


async def test_resubscribes_after_the_pubsub_connection_is_killed(
    redis_url: str, key_prefix: str, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """After CLIENT KILL of its pub/sub connection the bus resubscribes; one warning logged."""
    name = "ctxvars-" + key_prefix.split(":")[1]
    url = f"{redis_url}?client_name={name}"
    async with (
        EventBus(RedisBackend(url, channel_prefix=key_prefix)) as bus,
        AsyncExitStack() as stack,
    ):
        alice = await connect(stack, bus, ALICE)
        with caplog.at_level(logging.INFO, logger="ctxvars_mw.events"):
            clients = await redis_client.client_list(_type="pubsub")
            ids = [c["id"] for c in clients if c.get("name") == name]
            assert len(ids) == 1
            await redis_client.execute_command("CLIENT", "KILL", "ID", ids[0])
            await _publish_until_delivered(bus, alice)
    assert bus.backend.outage_count == 1  # type: ignore[attr-defined]
    assert [r.levelname for r in caplog.records] == ["WARNING"]


@contextmanager
def redis_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A private redis-server on 127.0.0.1:``port`` (stopped afterwards)."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 10)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_outage_with_restart_logs_once_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down for several backoff rounds: one warning, then events flow again."""
    port = free_port()
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0", backoff_initial=0.02, backoff_max=0.1)
    bus = EventBus(backend)
    async with AsyncExitStack() as stack:
        with redis_server(port):
            await bus.start()
            alice = await connect(stack, bus, ALICE)
            caplog.set_level(logging.INFO, logger="ctxvars_mw.events")
        await asyncio.sleep(0.6)  # Redis is down: several failed reconnection attempts
        with pytest.raises(ServiceUnavailableError):
            await bus.publish(ALICE, {"lost": True})
        with redis_server(port):
            await _publish_until_delivered(bus, alice)
            assert [r.levelname for r in caplog.records] == ["WARNING"]
            assert backend.outage_count == 1
            await stack.aclose()
            await bus.stop()


class SilencingProxy:
    """A TCP proxy to Redis whose open connections can be made to go silent.

    ``silence()`` stops forwarding on every connection open at that moment without closing
    it (no FIN, no RST), as a network partition or a lost NAT entry would; connections made
    afterwards are forwarded normally.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._silenced: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SilencingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    def silence(self) -> None:
        self._silenced |= self._open

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with suppress(OSError):
                while data := await src.read(65536):
                    if dst in self._silenced or writer in self._silenced:
                        continue  # swallowed: the peer hears nothing, and nothing closes
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open -= {writer, up_writer}


async def test_a_silently_dead_pubsub_connection_is_caught_by_the_keepalive(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No FIN, no RST: the unanswered keepalive PING counts as an outage; events come back."""
    url = urlsplit(redis_url)
    async with SilencingProxy((url.hostname or "127.0.0.1", url.port or 6379)) as proxy:
        backend = RedisBackend(
            f"redis://127.0.0.1:{proxy.port}/0",
            channel_prefix=key_prefix,
            keepalive=0.2,
            backoff_initial=0.02,
            backoff_max=0.1,
        )
        async with (
            EventBus(backend) as bus,
            EventBus(RedisBackend(redis_url, channel_prefix=key_prefix)) as publisher,
            AsyncExitStack() as stack,
        ):
            alice = await connect(stack, bus, ALICE)
            caplog.set_level(logging.INFO, logger="ctxvars_mw.events")
            proxy.silence()
            await publisher.publish(ALICE, {"lost": True})
            with pytest.raises(TimeoutError):
                await alice.wait_for(1, within=0.1)
            await _publish_until_delivered(publisher, alice)
    assert backend.outage_count == 1
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert alice.messages[0]["event"] == {"after": "outage"}


async def test_keepalive_pings_on_an_idle_healthy_connection_are_not_outages(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle for many keepalive periods: PINGs are answered, nothing is logged, events flow."""
    backend = RedisBackend(redis_url, channel_prefix=key_prefix, keepalive=0.03)
    caplog.set_level(logging.INFO, logger="ctxvars_mw.events")
    async with EventBus(backend) as bus, AsyncExitStack() as stack:
        alice = await connect(stack, bus, ALICE)
        await asyncio.sleep(0.4)  # more than ten keepalive rounds
        await bus.publish(ALICE, {"n": 1})
        [message] = await alice.wait_for(1)
    assert message["event"] == {"n": 1}
    assert backend.outage_count == 0
    assert caplog.records == []


async def test_start_fails_cleanly_when_redis_is_unreachable() -> None:
    """start() against a closed port raises ServiceUnavailableError."""
    bus = EventBus(RedisBackend(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(ServiceUnavailableError):
        await bus.start()


def test_bad_redis_options_are_configuration_errors() -> None:
    """Bad clients, URLs, prefixes and backoff values fail at construction."""
    for args, kwargs in (
        ((42,), {}),
        (("not a url",), {}),
        (("redis://127.0.0.1",), {"channel_prefix": "has space"}),
        (("redis://127.0.0.1",), {"backoff_initial": 2, "backoff_max": 1}),
        (("redis://127.0.0.1",), {"timeout": 0}),
        (("redis://127.0.0.1",), {"keepalive": -1}),
        (("redis://127.0.0.1",), {"keepalive": True}),
    ):
        with pytest.raises(ConfigurationError):
            RedisBackend(*args, **kwargs)


async def _publish_until_delivered(bus: EventBus, socket: RecordingSocket) -> None:
    """Publish until one arrives: pub/sub drops what is sent while resubscribing."""
    async with asyncio.timeout(10):
        while not socket.messages:
            with suppress(ServiceUnavailableError):
                await bus.publish(ALICE, {"after": "outage"})
            try:
                await socket.wait_for(1, within=0.1)
            except TimeoutError:
                continue
    assert socket.messages[-1]["event"] == {"after": "outage"}
