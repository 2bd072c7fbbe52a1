"""From raw samples to the figures the report shows: medians, paired deltas, ratios, targets."""

from __future__ import annotations

from typing import Any

from .stats import Summary, paired, ratio

PEERS = ("floor", "correlation", "starlette_context")


def asgi(result: dict[str, Any], mode: str) -> dict[str, Any]:
    """Per variant: CPU µs/request, paired Δ over bare (and over anonymous for JWT rows)."""
    rows = result["rows"]
    bare = rows["bare"][mode]["cpu"]
    anon = rows["ctxvars"][mode]["cpu"] if "ctxvars" in rows else None
    out: dict[str, Any] = {}
    for name, row in rows.items():
        cpu = row[mode]["cpu"]
        entry = {
            "label": row["label"],
            "cpu": Summary.of(cpu),
            "wall": Summary.of(row[mode]["wall"]),
            "delta": Summary.of(paired(cpu, bare)),
        }
        if name.startswith("jwt") and anon is not None:
            entry["over_anonymous"] = Summary.of(paired(cpu, anon))
        if name == "jwt_cached_read" and "ctxvars_read" in rows:
            # Both endpoints read (build) the context: what a token adds then.
            reading = rows["ctxvars_read"][mode]["cpu"]
            entry["over_anonymous_read"] = Summary.of(paired(cpu, reading))
        if name.startswith("pyjwt") and "floor" in rows:
            entry["over_floor"] = Summary.of(paired(cpu, rows["floor"][mode]["cpu"]))
        out[name] = entry
    return out


def peer_ratios(table: dict[str, Any]) -> dict[str, float | None]:
    """ctxvars_mw anonymous Δ divided by each peer's Δ (same run, same mode)."""
    ours = table["ctxvars"]["delta"].median
    return {peer: ratio(ours, table[peer]["delta"].median) for peer in PEERS if peer in table}


def pyjwt(result: dict[str, Any]) -> dict[str, Summary]:
    """PyJWT's raw ``jwt.decode`` per algorithm."""
    return {alg: Summary.of(v) for alg, v in result["pyjwt_decode_us"].items()}


def micro(result: dict[str, Any]) -> dict[str, Any]:
    """Per case: median µs/op and, for cases with a baseline, the paired difference."""
    cases = result["cases"]
    out: dict[str, Any] = {}
    for name, case in cases.items():
        entry: dict[str, Any] = {"us": Summary.of(case["us"]), "baseline": case["baseline"]}
        base = case["baseline"]
        if base is not None and base in cases:
            entry["minus_baseline"] = Summary.of(paired(case["us"], cases[base]["us"]))
        out[name] = entry
    return out


def wrk(result: dict[str, Any]) -> dict[str, Any]:
    """Per app: requests/s, server CPU µs/request, and the per-round ratio to bare."""
    apps = result["apps"]
    bare = apps["bare"]["rps"]
    out: dict[str, Any] = {}
    for name, app in apps.items():
        ratios = [a / b for a, b in zip(app["rps"], bare, strict=True)]
        # A single worker is CPU-bound: its capacity is 1 / CPU per request, which other
        # processes on a shared machine disturb far less than requests/s.
        capacity = [b / a for a, b in zip(app["cpu_us"], apps["bare"]["cpu_us"], strict=True)]
        out[name] = {
            "label": app["label"],
            "rps": Summary.of(app["rps"]),
            "cpu_us": Summary.of(app["cpu_us"]),
            "ratio": Summary.of(ratios),
            "capacity": Summary.of(capacity),
        }
    return out


def check(measured: float | None, limit: float, *, at_least: bool = False) -> dict[str, Any]:
    """A target's verdict: ``measured <= limit`` (or ``>=`` when ``at_least``)."""
    met = measured is not None and (measured >= limit if at_least else measured <= limit)
    return {"measured": measured, "limit": limit, "at_least": at_least, "met": met}


Target = tuple[str, dict[str, Any]]


def _asgi_targets(result: dict[str, Any]) -> list[Target]:
    seq = asgi(result, "sequential")
    out: list[Target] = []
    if "ctxvars_read" in seq:
        read = seq["ctxvars_read"]["delta"].median
        limit = 0.8 * seq["correlation"]["delta"].median
        name = "anonymous request, endpoint reads: Δ ≤ 0.8 x asgi-correlation-id's Δ (µs)"
        out.append((name, check(read, limit)))
    if "jwt_cached_read" not in seq:
        return out
    cached_read = seq["jwt_cached_read"]["delta"].median
    limit = 1.2 * seq["correlation"]["delta"].median
    name = "cached JWT, endpoint reads: Δ ≤ 1.2 x asgi-correlation-id's Δ (µs)"
    out.append((name, check(cached_read, limit)))
    decode = pyjwt(result)
    for alg in ("HS256", "RS256"):
        row = seq[f"jwt_{alg.lower()}"]["over_anonymous"].median
        name = f"uncached {alg} Δ over anonymous ≤ PyJWT decode alone + 3 (µs)"
        out.append((name, check(row, decode[alg].median + 3)))
    return out


def _instruction_targets(result: dict[str, Any]) -> list[Target]:
    per = result["per_request"]
    if "bare" not in per or "correlation" not in per:
        return []
    bare, corr = per["bare"], per["correlation"] - per["bare"]
    out: list[Target] = []
    for name, limit, label in (
        ("ctxvars_read", 0.8, "anonymous request, endpoint reads the context"),
        ("jwt_cached_read", 1.2, "cached JWT, endpoint reads the context"),
    ):
        if name in per:
            ratio = (per[name] - bare) / corr
            out.append((f"{label}: instructions Δ ÷ asgi-correlation-id's Δ", check(ratio, limit)))
    return out


def _micro_targets(result: dict[str, Any]) -> list[Target]:
    m = micro(result)
    out = [
        (f"{case} (µs)", check(m[case]["us"].median, limit))
        for case, limit in (
            ("root context, validated (user_id only)", 1.5),
            ("root context, validated (8 fields given)", 1.5),
            ("child('op')", 1.0),
        )
        if case in m
    ]
    if "requires_permission check" in m:
        extra = m["requires_permission check"]["minus_baseline"].median
        out.append(("requires_permission check over a bare call (µs)", check(extra, 0.5)))
    return out


def _wrk_targets(result: dict[str, Any]) -> list[Target]:
    w = wrk(result)["ctxvars"]
    return [
        (
            "uvicorn+wrk: ctxvars_mw requests/s ÷ bare",
            check(w["ratio"].median, 0.90, at_least=True),
        ),
        (
            "uvicorn+wrk: ctxvars_mw capacity ÷ bare (server CPU/request)",
            check(w["capacity"].median, 0.90, at_least=True),
        ),
    ]


def targets(results: dict[str, Any]) -> list[Target]:
    """Every target that this run measured, with its figure and verdict."""
    out: list[Target] = []
    if "instructions" in results:
        out += _instruction_targets(results["instructions"])
    if "asgi" in results:
        out += _asgi_targets(results["asgi"])
    if "micro" in results:
        out += _micro_targets(results["micro"])
    if "wrk" in results:
        out += _wrk_targets(results["wrk"])
    if "events" in results and "targets" in results["events"]:
        out += [(name, verdict) for name, verdict in results["events"]["targets"]]
    return out
