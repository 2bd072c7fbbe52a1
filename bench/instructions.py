"""Instructions per request, counted by ``valgrind --tool=callgrind``: a noise-free comparison.

Timings on a shared VM drift by a factor of two between repeats; instruction counts do not
(the same program, inputs and hash seed give the same count). Each variant runs in its own
process under callgrind twice (the processes share the cores: counts do not depend on load),
with ``low`` and ``high`` sequential requests after the same warm-up, and
``(I(high) - I(low)) / (high - low)`` is its cost per request: start-up and imports cancel
out. Instructions are not time (a cache miss costs more than an add), so this section
complements the timed ones: it shows exactly how much work each middleware does, and settles
A/B comparisons that timings on this machine cannot.

Run alone: ``python -m bench.run --only instructions`` (a few minutes: callgrind runs Python
about 50 times slower).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

VARIANTS = (
    "bare",
    "floor",
    "ctxvars",
    "ctxvars_read",
    "ctxvars_read_no_metadata",
    "ctxvars_read_no_ids",
    "ctxvars_read_proxied",
    "correlation",
    "starlette_context",
    "jwt_cached",
    "jwt_cached_read",
    "pyjwt_hs256",
    "jwt_hs256",
)
QUICK_VARIANTS = ("bare", "ctxvars", "correlation", "jwt_cached")
_WARMUP = 300
_COLLECTED_RE = re.compile(r"Collected\s*:\s*(\d+)")


def available() -> str | None:
    """Why this section cannot run here, or None."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (apt-get install -y valgrind)"
    return None


def _child(name: str, n: int) -> None:
    """Run ``n`` sequential requests of variant ``name`` after the warm-up (inside callgrind)."""
    from .apps import variants
    from .driver import _templates, loop_factory, sequential, uncached_strategy

    variant = next(v for v in variants(uncached_strategy()) if v.name == name)
    app = variant.build()
    templates = _templates(variant, 64)

    async def main() -> None:
        await sequential(app, templates, _WARMUP)
        if n:
            await sequential(app, templates, n)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())


def _count(name: str, n: int) -> int:
    """The instructions one child process executes (callgrind's total)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.instructions",
        name,
        str(n),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    match = _COLLECTED_RE.search(out.stderr)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"callgrind run of {name} failed:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def run(*, low: int, high: int, names: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Instructions per request of each variant, and the request counts used."""
    from .apps import variants
    from .driver import uncached_strategy

    known = {v.name: v.label for v in variants(uncached_strategy())}
    chosen = [name for name in names if name in known]  # no JWT rows when no key was made
    jobs = [(name, n) for name in chosen for n in (low, high)]
    # Counts do not depend on what else runs, so the processes share the cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs), strict=True))
    per_request = {name: (counts[name, high] - counts[name, low]) / (high - low) for name in chosen}
    labels = {name: known[name] for name in chosen}
    return {"low": low, "high": high, "per_request": per_request, "labels": labels}


def section(result: dict[str, Any]) -> list[str]:
    """The Markdown section for the report."""
    per = result["per_request"]
    bare = per.get("bare")
    corr = per.get("correlation")
    lines = [
        "## Instructions per request (callgrind)",
        "",
        f"`valgrind --tool=callgrind`, each variant in its own process: "
        f"(I({result['high']}) - I({result['low']})) / {result['high'] - result['low']} "
        "sequential requests after the same warm-up, `PYTHONHASHSEED=0`. Deterministic: the "
        "same code gives the same count on any run, busy machine or not.",
        "",
        "| variant | instructions/request | Δ over bare | Δ ÷ asgi-correlation-id's Δ |",
        "|---|---|---|---|",
    ]
    for name, count in per.items():
        delta = None if bare is None else count - bare
        ratio = (
            None
            if delta is None or corr is None or bare is None or corr == bare or name == "bare"
            else delta / (corr - bare)
        )
        lines.append(
            f"| {result['labels'][name]} | {count:,.0f} | "
            f"{'' if delta is None else f'{delta:,.0f}'} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines.append("")
    return lines


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
