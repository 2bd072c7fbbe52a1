"""Run the benchmark suite: ``python -m bench.run [--quick] [--only asgi,micro,...]``.

Writes the raw samples to ``bench/results/<UTC time>.json`` and prints the Markdown report;
a full run (not ``--quick``, every section) also writes ``bench/results/latest.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import (
    driver,
    events_bench,
    instructions,
    memory,
    micro,
    ratelimit_bench,
    report,
    wrk_bench,
)
from .stats import machine

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("asgi", "micro", "wrk", "memory", "events", "limits", "instructions")

#: Parameters of each section: (quick, full).
PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "asgi": ({"n": 400, "repeats": 3, "warmup": 100}, {"n": 3000, "repeats": 5, "warmup": 500}),
    "micro": ({"repeats": 3, "block_seconds": 0.01}, {"repeats": 5, "block_seconds": 0.05}),
    "wrk": (
        {"rounds": 1, "seconds": 1, "connections": 8, "warmup": 1},
        {"rounds": 3, "seconds": 4, "connections": 8, "warmup": 2},
    ),
    "memory": ({"requests": 10_000}, {"requests": 100_000}),
    "events": (
        {"messages": 300, "connections": 1_000},
        {"messages": 3_000, "connections": 10_000},
    ),
    "limits": (
        {"n": 2_000, "repeats": 3, "redis_checks": 500},
        {"n": 20_000, "repeats": 7, "redis_checks": 5_000},
    ),
    "instructions": (
        {"low": 100, "high": 300, "names": instructions.QUICK_VARIANTS},
        {"low": 500, "high": 2500},
    ),
}
RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "asgi": driver.run,
    "micro": micro.run,
    "wrk": wrk_bench.run,
    "memory": memory.run,
    "events": events_bench.run,
    "limits": ratelimit_bench.run,
    "instructions": instructions.run,
}
UNAVAILABLE: dict[str, Callable[[], str | None]] = {
    "wrk": wrk_bench.available,
    "events": events_bench.available,
    "limits": ratelimit_bench.available,
    "instructions": instructions.available,
}


_SECTION_WRITERS = (
    ("events", events_bench),
    ("limits", ratelimit_bench),
    ("instructions", instructions),
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small, fast run for development")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def run_sections(sections: list[str], quick: bool) -> dict[str, Any]:
    """Run ``sections`` in order; a section that cannot run here is recorded as skipped."""
    results: dict[str, Any] = {"machine": machine(), "skipped": {}}
    for name in sections:
        reason = UNAVAILABLE.get(name, lambda: None)()
        if reason is not None:
            results["skipped"][name] = reason
            print(f"[bench] {name}: skipped ({reason})", file=sys.stderr)
            continue
        started = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = RUNNERS[name](**PARAMS[name][0 if quick else 1])
        print(f"[bench] {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    results = run_sections(args.sections, args.quick)
    args_text = " ".join(sys.argv[1:] if argv is None else argv)
    results["argv"] = f"python -m bench.run {args_text}".rstrip()
    extra = [mod.section(results[name]) for name, mod in _SECTION_WRITERS if name in results]
    text = report.render(results, extra)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=1, default=_plain))
    if not args.quick and list(args.sections) == list(SECTIONS):
        (RESULTS / "latest.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
