"""Real servers for tests: uvicorn in a subprocess on 127.0.0.1, and free ports."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.Random()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the ephemeral range.

    A port the kernel hands out for binding to port 0 lies in the ephemeral range, which
    outgoing connections use as their source ports: while a test's server is down (a Redis
    restart), any connection attempt, even the client's own reconnect to that very port,
    may take it, and the restarted server then cannot bind it. Ports below the range are
    only ever taken by an explicit bind.
    """
    high = max(_ephemeral_start(), 20000)
    for _ in range(200):
        port = _PORTS.randrange(15000, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@contextmanager
def serve_process(
    command: list[str],
    port: int,
    *,
    cwd: Path | str = ROOT,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> Iterator[str]:
    """Run ``command`` (a server that listens on 127.0.0.1:``port``); yield its base URL once
    it listens; stop it after. A server that does not start fails with its own output."""
    # The server's output goes to a file, not a pipe: nobody reads a pipe while the test
    # runs, and a server that logs enough would block on a full one (and with it the test).
    output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, timeout)
        except TimeoutError:
            proc.kill()
            proc.wait()
            output.seek(0)
            printed = output.read().decode(errors="replace")
            raise RuntimeError(f"{command[0]} did not start:\n{printed}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        output.close()


@contextmanager
def uvicorn_server(
    app: str,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 20.0,
) -> Iterator[str]:
    """Run ``uvicorn APP`` (``module:attr``) on 127.0.0.1; yield its base URL; stop it after."""
    port = port or free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", *extra_args]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with serve_process(command, port, env=environ, timeout=timeout) as url:
        yield url
