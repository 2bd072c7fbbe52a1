"""Out of process: uvicorn (httptools, uvloop, 1 worker) on 127.0.0.1 driven by ``wrk``.

All servers run at once (idle ones cost nothing); each round runs ``wrk`` against every app
in a rotated order. Besides requests/s (which on a shared machine also measures who else was
running), the server's own CPU time per request is read from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import ExitStack
from typing import Any

from tests.servers import free_port, uvicorn_server

from . import tokens
from .driver import CORRELATION_ID

#: name → ``module:attribute`` uvicorn serves.
APPS = {
    "bare": "bench.apps:bare",
    "floor": "bench.apps:floor",
    "ctxvars": "bench.apps:ctxvars",
    "correlation": "bench.apps:correlation",
}
LABELS = {
    "bare": "bare Starlette",
    "floor": "floor: pure ASGI, one ContextVar",
    "ctxvars": "ctxvars_mw anonymous",
    "correlation": "asgi-correlation-id",
    "ctxvars_jwt": "ctxvars_mw JWT HS256, cached",
}
_RPS_RE = re.compile(r"Requests/sec:\s+([0-9.]+)")
_TOTAL_RE = re.compile(r"(\d+) requests in")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _server_pid(port: int) -> int | None:
    """The pid of the uvicorn started on ``port`` (found by its command line)."""
    wanted = ["--port", str(port)]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "uvicorn" in args and any(args[i : i + 2] == wanted for i in range(len(args))):
            return int(entry)
    return None


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _wrk(url: str, seconds: float, connections: int, token: str) -> tuple[float, int]:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "-H", "Accept: application/json",
        "-H", "User-Agent: ctxvars-bench/1.0",
        "-H", f"Authorization: Bearer {token}",
        "-H", "X-Request-ID: 4c8b2f0e-6a1d-4e5b-9f3a-2d7c1e8b6a90",
        "-H", f"X-Correlation-ID: {CORRELATION_ID.decode()}",
        "-H", "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        url + "/",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30)
    rps, total = _RPS_RE.search(out.stdout), _TOTAL_RE.search(out.stdout)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out.stdout}\n{out.stderr}")
    return float(rps.group(1)), int(total.group(1))


def available() -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (apt-get install -y wrk)"
    return None


def run(*, rounds: int, seconds: float, connections: int, warmup: float) -> dict[str, Any]:
    """requests/s and server CPU µs per request of every app, ``rounds`` interleaved rounds."""
    apps = dict(APPS)
    if tokens.jwt_authenticator("HS256") is not None:
        apps["ctxvars_jwt"] = "bench.apps:ctxvars_jwt"
    loop = "uvloop" if _has_uvloop() else "asyncio"
    extra = ("--http", "httptools", "--workers", "1", "--no-access-log", "--loop", loop)
    token = tokens.mint("HS256", unique=False)
    results: dict[str, Any] = {n: {"label": LABELS[n], "rps": [], "cpu_us": []} for n in apps}
    with ExitStack() as stack:
        urls, pids = {}, {}
        for name, target in apps.items():
            port = free_port()
            urls[name] = stack.enter_context(uvicorn_server(target, port=port, extra_args=extra))
            pids[name] = _server_pid(port)
            _wrk(urls[name], warmup, connections, token)
        names = list(apps)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cpu0 = _cpu_seconds(pids[name])
                rps, total = _wrk(urls[name], seconds, connections, token)
                cpu = _cpu_seconds(pids[name]) - cpu0
                results[name]["rps"].append(rps)
                results[name]["cpu_us"].append(cpu / max(total, 1) * 1e6)
    config: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "connections": connections}
    config["server"] = "uvicorn " + " ".join(extra)
    return {"config": config, "apps": results}


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
