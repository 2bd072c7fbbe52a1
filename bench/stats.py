"""Summary statistics, the clock every benchmark uses, and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

#: CPU time of the calling thread, in ns. The machine is shared: wall time also counts the
#: time other processes held the core, CPU time counts only ours (syscalls included).
cpu_ns = time.thread_time_ns
wall_ns = time.perf_counter_ns


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements of one quantity."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarise ``values`` (at least one)."""
        if not values:
            raise ValueError("no values to summarise")
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ordered))

    def as_dict(self) -> dict[str, float]:
        """Plain data, for the JSON results."""
        return asdict(self)


def paired(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Differences measured in the same repeat (interleaved), so drift cancels out."""
    return [v - b for v, b in zip(values, baseline, strict=True)]


def ratio(a: float, b: float) -> float | None:
    """``a / b``, or None when ``b`` is not positive."""
    return a / b if b > 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """Where and when the run happened."""
    from importlib.metadata import version

    versions = {}
    for dist in ("starlette", "uvicorn", "PyJWT", "starlette-context", "asgi-correlation-id"):
        try:
            versions[dist] = version(dist)
        except Exception:  # a missing peer is reported, not fatal
            versions[dist] = "missing"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_at_start": _loadavg(),
        "versions": versions,
    }


def rss_bytes() -> int:
    """The current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
