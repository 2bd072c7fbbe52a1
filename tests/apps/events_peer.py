"""One side of the cross-process event tests, run as ``python -m tests.apps.events_peer``.

``subscribe URL PREFIX USER``: an EventBus on a RedisBackend with one connection for USER;
prints ``ready`` once registered, then one JSON line per event received, and exits after an
event ``{"done": true}``.

``publish URL PREFIX USER COUNT OTHER``: publishes ``{"n": i}`` to USER for i in range(COUNT),
each with the idempotency key ``n-<i>``, retrying a publish that failed with the same key until
it succeeds, and ``{"other": i}`` to OTHER after each; prints ``published <i> <attempts>`` per
event, then publishes ``{"done": true}`` to USER.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from ctxvars_mw import ServiceUnavailableError, UserExecutionContext, use_context
from ctxvars_mw.events import EventBus, RedisBackend


class _Print:
    def __init__(self) -> None:
        self.done = asyncio.Event()

    async def send_json(self, data: Any) -> None:
        print(json.dumps(data), flush=True)
        if data["event"].get("done"):
            self.done.set()


def _backend(url: str, prefix: str) -> RedisBackend:
    return RedisBackend(url, channel_prefix=prefix, timeout=0.5, keepalive=1.0, backoff_max=0.2)


async def subscribe(url: str, prefix: str, user: str) -> None:
    sink = _Print()
    async with EventBus(_backend(url, prefix)) as bus:
        with use_context(UserExecutionContext(user_id=user)):
            async with bus.connect(sink):
                print("ready", flush=True)
                async with asyncio.timeout(120):
                    await sink.done.wait()


async def _publish_until_stored(bus: EventBus, user: str, event: dict[str, Any], key: str) -> int:
    attempts = 0
    while True:
        attempts += 1
        try:
            await bus.publish(user, event, idempotency_key=key)
            return attempts
        except ServiceUnavailableError:
            await asyncio.sleep(0.02)


async def publish(url: str, prefix: str, user: str, count: int, other: str) -> None:
    async with EventBus(_backend(url, prefix)) as bus:
        for i in range(count):
            attempts = await _publish_until_stored(bus, user, {"n": i}, f"n-{i}")
            await _publish_until_stored(bus, other, {"other": i}, f"other-{i}")
            print(f"published {i} {attempts}", flush=True)
            await asyncio.sleep(0.005)
        await _publish_until_stored(bus, user, {"done": True}, "done")


def main(argv: list[str]) -> None:
    command, url, prefix, user, *rest = argv
    if command == "subscribe":
        asyncio.run(subscribe(url, prefix, user))
    else:
        asyncio.run(publish(url, prefix, user, int(rest[0]), rest[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
