"""In-process ASGI driver: every variant called directly with realistic scopes, interleaved.

Each repeat times every variant once sequentially (one request after another in one task)
and once concurrently (batches of ``batch`` tasks, each task with its own copy of the
context), rotating the order of the variants from one repeat to the next so that drift of
the machine spreads evenly. Per-request times are CPU time of the event-loop thread (the
machine is shared) and wall time; PyJWT's own ``jwt.decode`` is timed in the same repeats.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from . import tokens
from .apps import Variant, variants
from .stats import cpu_ns, wall_ns

CORRELATION_ID = b"9d3e7a1c-2b4f-4c6d-8e0a-5f1b3c7d9e2a"
MODES = ("sequential", "concurrent")
_REQUEST_MESSAGE = {"type": "http.request", "body": b"", "more_body": False}


def _id_pool(size: int) -> list[list[tuple[bytes, bytes]]]:
    """Per-request headers: a new ``x-request-id`` (a uuid4) and ``traceparent`` each time."""
    pool = []
    for _ in range(size):
        rid = str(uuid.UUID(bytes=os.urandom(16), version=4)).encode("ascii")
        trace = b"00-" + os.urandom(16).hex().encode() + b"-" + os.urandom(8).hex().encode()
        pool.append([(b"x-request-id", rid), (b"traceparent", trace + b"-01")])
    return pool


# Real clients send a new request id and trace per request; the pool is larger than any id
# cache, so no variant sees the same id again before its cache has forgotten it.
_ID_POOL = _id_pool(20011)
_cursor = 0


def http_scope(
    token: str, path: str = "/", extra: tuple[tuple[bytes, bytes], ...] = ()
) -> dict[str, Any]:
    """An HTTP scope as uvicorn builds it, with 6 of its 8 headers (bearer token included)
    and the ``extra`` ones; ``x-request-id`` and ``traceparent`` are added per request (see
    :func:`_fresh`)."""
    headers = [
        *extra,
        (b"host", b"api.example.org"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) ctxvars-bench/1.0"),
        (b"accept", b"application/json"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"authorization", b"Bearer " + token.encode("ascii")),
        (b"x-correlation-id", CORRELATION_ID),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 51234),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return _REQUEST_MESSAGE


async def _discard(message: dict[str, Any]) -> None:
    return None


def _fresh(template: dict[str, Any], i: int) -> dict[str, Any]:
    # Frameworks write into the scope (and some middleware into its header list): a new
    # copy per request, with its own ids, the same cost for every variant.
    scope = template.copy()
    scope["headers"] = template["headers"] + _ID_POOL[i % len(_ID_POOL)]
    scope["state"] = {}
    return scope


def _advance(n: int) -> int:
    global _cursor
    start, _cursor = _cursor, _cursor + n
    return start


async def sequential(app: Any, templates: list[dict[str, Any]], n: int) -> tuple[float, float]:
    """µs per request (CPU, wall) for ``n`` requests one after another in this task."""
    k = len(templates)
    first = _advance(n)
    gc.collect()
    cpu0, wall0 = cpu_ns(), wall_ns()
    for i in range(n):
        await app(_fresh(templates[i % k], first + i), _receive, _discard)
    return (cpu_ns() - cpu0) / n / 1e3, (wall_ns() - wall0) / n / 1e3


async def concurrent(
    app: Any, templates: list[dict[str, Any]], n: int, batch: int
) -> tuple[float, float]:
    """µs per request (CPU, wall) for ``n`` requests in batches of ``batch`` concurrent tasks."""
    k = len(templates)
    first = _advance(n)
    create = asyncio.get_running_loop().create_task
    gc.collect()
    cpu0, wall0 = cpu_ns(), wall_ns()
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        tasks = [
            create(app(_fresh(templates[i % k], first + i), _receive, _discard))
            for i in range(start, stop)
        ]
        await asyncio.gather(*tasks)
    return (cpu_ns() - cpu0) / n / 1e3, (wall_ns() - wall0) / n / 1e3


async def probe(app: Any, template: dict[str, Any]) -> dict[str, Any]:
    """One ``/whoami`` request: status, the id headers sent back, and who the app saw."""
    sent: list[dict[str, Any]] = []

    async def capture(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _fresh(template, _advance(1))
    scope["path"], scope["raw_path"] = "/whoami", b"/whoami"
    await app(scope, _receive, capture)
    start = next(m for m in sent if m["type"] == "http.response.start")
    names = sorted({k.decode().lower() for k, _ in start.get("headers", [])} & _ID_HEADERS)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start["status"], "id_headers": names, "sees": body.decode()}


_ID_HEADERS = {"x-request-id", "x-correlation-id"}


def uncached_strategy() -> str:
    """``"cache_size=0"`` when JWTAuthenticator accepts it, else ``"fresh"`` (token per request)."""
    try:
        auth = tokens.jwt_authenticator("HS256", cache_size=0)
    except Exception:  # any refusal means: defeat the cache with new tokens
        return "fresh"
    return "fresh" if auth is None else "cache_size=0"


def _templates(variant: Variant, count: int) -> list[dict[str, Any]]:
    if variant.fresh_tokens:
        minted = tokens.mint_many(variant.token_alg, count)
        return [http_scope(t, extra=variant.headers) for t in minted]
    return [http_scope(tokens.mint(variant.token_alg, unique=False), extra=variant.headers)]


def _time_decode(decode: Callable[[str], Any], token: str, n: int) -> float:
    gc.collect()
    cpu0 = cpu_ns()
    for _ in range(n):
        decode(token)
    return (cpu_ns() - cpu0) / n / 1e3


class _Feed:
    """The scopes a variant's requests use: one shared token, or a new token per request."""

    def __init__(self, variant: Variant, n: int, calls: int) -> None:
        self.n = min(n, FRESH_MAX) if variant.fresh_tokens else n
        count = self.n * calls if variant.fresh_tokens else 1
        self._all = _templates(variant, count)
        self._fresh = variant.fresh_tokens
        self._next = 0

    def take(self) -> list[dict[str, Any]]:
        """The templates for the next timed call (never reusing a fresh token)."""
        if not self._fresh:
            return self._all
        start, self._next = self._next, self._next + self.n
        return self._all[start : self._next]


#: With fresh tokens (no cache_size=0), each timed call is capped: RS256 signing is slow.
FRESH_MAX = 300


async def run_asgi(*, n: int, repeats: int, batch: int, warmup: int) -> dict[str, Any]:
    """Time every variant ``repeats`` times in both modes, interleaved; PyJWT alongside."""
    strategy = uncached_strategy()
    chosen = variants(strategy)
    apps = {v.name: v.build() for v in chosen}
    feeds = {v.name: _Feed(v, n, 2 * repeats + 1) for v in chosen}
    rows: dict[str, Any] = {}
    for v in chosen:
        template = feeds[v.name].take()
        rows[v.name] = {"label": v.label, "probe": await probe(apps[v.name], template[0])}
        await sequential(apps[v.name], template, min(warmup, feeds[v.name].n))
        rows[v.name].update({m: {"cpu": [], "wall": []} for m in MODES})
        rows[v.name]["n"] = feeds[v.name].n
    decoders = {alg: tokens.pyjwt_decoder(alg) for alg in ("HS256", "RS256")}
    samples = {alg: tokens.mint(alg, unique=False) for alg in decoders}
    pyjwt: dict[str, list[float]] = {alg: [] for alg in decoders}
    for r in range(repeats):
        order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
        for mode in MODES:
            for v in order:
                feed = feeds[v.name]
                if mode == "sequential":
                    cpu, wall = await sequential(apps[v.name], feed.take(), feed.n)
                else:
                    cpu, wall = await concurrent(apps[v.name], feed.take(), feed.n, batch)
                rows[v.name][mode]["cpu"].append(cpu)
                rows[v.name][mode]["wall"].append(wall)
        for alg, decode in decoders.items():
            pyjwt[alg].append(_time_decode(decode, samples[alg], max(50, n // 4)))
    config: dict[str, Any] = {"n": n, "repeats": repeats, "batch": batch, "warmup": warmup}
    config["uncached_jwt"] = strategy
    config["loop"] = type(asyncio.get_running_loop()).__module__
    return {"config": config, "rows": rows, "pyjwt_decode_us": pyjwt}


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (what uvicorn uses), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(*, n: int, repeats: int, batch: int = 100, warmup: int = 200) -> dict[str, Any]:
    """Run :func:`run_asgi` in a fresh event loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(run_asgi(n=n, repeats=repeats, batch=batch, warmup=warmup))


def complete(coro: Any) -> Any:
    """Run a coroutine that never suspends (a cache hit, an in-memory check) to its result,
    without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the coroutine suspended")


def redis_answers() -> bool:
    """True when a Redis answers on 127.0.0.1:6379."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        return False
    return True
