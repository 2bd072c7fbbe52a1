"""Render a run's results as the Markdown tables of ``bench/results/latest.md``."""

from __future__ import annotations

from typing import Any

from . import analysis
from .stats import Summary


def _us(s: Summary) -> str:
    return f"{s.median:.2f} [{s.low:.2f}..{s.high:.2f}]"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _machine(m: dict[str, Any], argv: str) -> list[str]:
    v = m["versions"]
    peers = ", ".join(f"{k} {val}" for k, val in v.items())
    return [
        f"Run `{argv}` on {m['date']}: {m['nproc']} x {m['cpu']}, Python {m['python']}, "
        f"load average at start {m['loadavg_at_start']}; {peers}.",
        "",
    ]


def _asgi(result: dict[str, Any]) -> list[str]:
    c = result["config"]
    lines = [
        "## In-process ASGI driver",
        "",
        f"{c['n']} requests per timing, {c['repeats']} interleaved repeats, event loop "
        f"`{c['loop']}`, concurrent batches of {c['batch']} tasks; uncached JWT rows: "
        f"`{c['uncached_jwt']}`. CPU µs per request: median [min..max]; Δ is the median of "
        "the per-repeat differences with bare Starlette (same repeat, interleaved).",
        "",
        "| variant | sequential µs/req | Δ seq µs | concurrent µs/req | Δ conc µs "
        "| Δ over anonymous / floor (seq) |",
        "|---|---|---|---|---|---|",
    ]
    seq, conc = analysis.asgi(result, "sequential"), analysis.asgi(result, "concurrent")
    for name, row in seq.items():
        over = row.get("over_anonymous", row.get("over_floor"))
        lines.append(
            f"| {row['label']} | {_us(row['cpu'])} | {_us(row['delta'])} | "
            f"{_us(conc[name]['cpu'])} | {_us(conc[name]['delta'])} | "
            f"{'' if over is None else _us(over)} |"
        )
    lines += ["", "ctxvars_mw anonymous Δ ÷ peer Δ (same run): "]
    for mode, table in (("sequential", seq), ("concurrent", conc)):
        ratios = analysis.peer_ratios(table)
        names = {p: table[p]["label"] for p in ratios}
        text = "; ".join(f"{names[p]} {_x(r)}" for p, r in ratios.items())
        lines.append(f"- {mode}: {text}")
    decode = analysis.pyjwt(result)
    text = "; ".join(f"{alg} {_us(s)} µs" for alg, s in decode.items())
    lines += [f"- PyJWT `jwt.decode` alone (same run): {text}", ""]
    lines.append("Probe of each variant before timing (status, id headers, what `/whoami` saw):")
    lines.append("")
    for row in result["rows"].values():
        p = row["probe"]
        ids = ", ".join(p["id_headers"]) or "none"
        lines.append(f"- {row['label']}: {p['status']}, id headers: {ids}, sees `{p['sees']}`")
    return [*lines, ""]


def _micro(result: dict[str, Any]) -> list[str]:
    c = result["config"]
    lines = [
        "## Micro-benchmarks",
        "",
        f"{c['repeats']} interleaved repeats of ~{c['block_seconds']} s blocks; CPU µs per "
        "operation, median [min..max].",
        "",
        "| operation | µs/op | compared with | difference µs |",
        "|---|---|---|---|",
    ]
    for name, row in analysis.micro(result).items():
        diff = row.get("minus_baseline")
        lines.append(
            f"| {name} | {_us(row['us'])} | {row['baseline'] or ''} | "
            f"{'' if diff is None else _us(diff)} |"
        )
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: `{reason}` | | |")
    return [*lines, ""]


def _wrk(result: dict[str, Any]) -> list[str]:
    c = result["config"]
    lines = [
        "## uvicorn + wrk (out of process)",
        "",
        f"`{c['server']}`; `wrk -t1 -c{c['connections']} -d{c['seconds']}s`, "
        f"{c['rounds']} interleaved rounds. Server CPU µs/request from `/proc/<pid>/stat` "
        "(10 ms ticks).",
        "",
        "| app | requests/s | ÷ bare (per round) | server CPU µs/req | capacity ÷ bare |",
        "|---|---|---|---|---|",
    ]
    for row in analysis.wrk(result).values():
        r = row["rps"]
        lines.append(
            f"| {row['label']} | {r.median:.0f} [{r.low:.0f}..{r.high:.0f}] | "
            f"{row['ratio'].median:.3f} [{row['ratio'].low:.3f}..{row['ratio'].high:.3f}] | "
            f"{_us(row['cpu_us'])} | {row['capacity'].median:.3f} |"
        )
    return [*lines, ""]


def _memory(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Memory",
        "",
        f"{result['config']['requests']:,} requests after a warm-up of 5,000, twice: RSS "
        "without tracing, then Python allocations with `tracemalloc`.",
        "",
        "| app | RSS before → after MiB | RSS Δ KiB | tracemalloc Δ KiB | live contexts after |",
        "|---|---|---|---|---|",
    ]
    for name, m in result["apps"].items():
        lines.append(
            f"| {name} | {m['rss_before_mib']:.1f} → {m['rss_after_mib']:.1f} | "
            f"{m['rss_growth_kib']:.0f} | {m['tracemalloc_growth_kib']:.0f} | "
            f"{m['live_contexts_after']} |"
        )
    first = next(iter(result["apps"].values()))
    lines += ["", "Largest traced growth (first app):", ""]
    lines += [f"- `{line}`" for line in first["top_growth"]]
    return [*lines, ""]


def _targets(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for name, t in analysis.targets(results):
        measured = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        limit = ("≥ " if t.get("at_least") else "≤ ") + f"{t['limit']:.2f}"
        lines.append(f"| {name} | {measured} | {limit} | {'yes' if t['met'] else '**no**'} |")
    return [*lines, ""]


def render(results: dict[str, Any], extra_sections: list[list[str]] | None = None) -> str:
    """The whole Markdown report of one run."""
    lines = ["# ctxvars_mw benchmark results", ""]
    lines += _machine(results["machine"], results["argv"])
    lines += _targets(results)
    if "asgi" in results:
        lines += _asgi(results["asgi"])
    if "micro" in results:
        lines += _micro(results["micro"])
    if "wrk" in results:
        lines += _wrk(results["wrk"])
    if "memory" in results:
        lines += _memory(results["memory"])
    for section in extra_sections or []:
        lines += section
    return "\n".join(lines).rstrip() + "\n"
