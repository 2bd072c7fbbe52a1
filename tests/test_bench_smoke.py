"""The benchmark harness still runs: tiny sizes, structure and positivity only (never timing)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import (
    analysis,
    driver,
    events_bench,
    instructions,
    memory,
    micro,
    ratelimit_bench,
    report,
    run,
)
from bench.stats import Summary, machine


def _positive(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and v > 0 for v in values)


def test_asgi_driver_times_every_variant_and_probes_it() -> None:
    """Each variant answers 200, ctxvars_mw sets both id headers, and every timing is > 0."""
    result = driver.run(n=20, repeats=2, batch=10, warmup=5)
    rows = result["rows"]
    assert {"bare", "floor", "ctxvars", "correlation", "starlette_context"} <= rows.keys()
    for row in rows.values():
        assert row["probe"]["status"] == 200
        for mode in driver.MODES:
            assert len(row[mode]["cpu"]) == 2
            assert _positive(row[mode]["cpu"])
            assert _positive(row[mode]["wall"])
    assert rows["ctxvars"]["probe"]["id_headers"] == ["x-correlation-id", "x-request-id"]
    assert rows["ctxvars"]["probe"]["sees"] == "anonymous free"
    if "jwt_cached" in rows:
        assert rows["jwt_cached"]["probe"]["sees"].endswith(" business")
    assert _positive(result["pyjwt_decode_us"]["HS256"])
    table = analysis.asgi(result, "sequential")
    assert table["bare"]["delta"].median == 0
    assert set(analysis.peer_ratios(table)) == {"floor", "correlation", "starlette_context"}


def test_every_request_carries_its_own_request_id_and_trace() -> None:
    """The driver's scopes have 8 headers, with a request id and traceparent new each time."""
    template = driver.http_scope("abc.def.ghi")
    first, second = driver._fresh(template, 0), driver._fresh(template, 1)
    assert len(first["headers"]) == 8
    assert dict(first["headers"])[b"authorization"] == b"Bearer abc.def.ghi"
    assert dict(first["headers"])[b"x-request-id"] != dict(second["headers"])[b"x-request-id"]
    assert dict(first["headers"])[b"traceparent"] != dict(second["headers"])[b"traceparent"]
    assert template["headers"] is not first["headers"]


def test_micro_benchmarks_report_every_case() -> None:
    """Every micro case has one positive sample per repeat; baselines pair up."""
    result = micro.run(repeats=2, block_seconds=0.001)
    cases = result["cases"]
    assert "root context, validated (8 fields given)" in cases
    assert all(len(c["us"]) == 2 and _positive(c["us"]) for c in cases.values())
    table = analysis.micro(result)
    assert "minus_baseline" in table["root context, validated (8 fields given)"]


def test_memory_pass_leaves_no_live_context() -> None:
    """After the requests, the registry counts no live context and RSS was read."""
    result = memory.run(requests=300)
    for app in result["apps"].values():
        assert app["live_contexts_after"] == 0
        assert app["rss_before_mib"] > 0
        assert app["requests"] == 300


def test_ratelimit_benchmark_times_both_libraries_and_counts_round_trips() -> None:
    """Every memory case and both request variants are timed; one Redis round trip a check."""
    result = ratelimit_bench.run(n=50, repeats=2, redis_checks=20)
    assert len(result["memory_us"]) == 6
    assert all(_positive(values) for values in result["memory_us"].values())
    assert all(_positive(values) for values in result["request_us"].values())
    if "redis_us" in result:
        trips = result["redis_us"]["round_trips_per_check"]["ctxvars_mw: RedisLimitStore.hit"]
        assert set(trips) == {1.0}
    text = "\n".join(ratelimit_bench.section(result))
    assert "limits: MovingWindowRateLimiter.hit" in text
    assert "paired Δ" in text


def test_events_benchmark_measures_latency_and_connections() -> None:
    """In-process latency percentiles are positive; every connection was registered."""
    result = events_bench.run(messages=20, connections=30)
    assert result["latency"]["local"]["p50"] > 0
    assert result["memory"]["registered"] == 30


def test_run_writes_json_and_renders_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m bench.run --quick --only asgi,micro`` writes its JSON and prints targets."""
    tiny: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "asgi": ({"n": 20, "repeats": 2, "warmup": 5, "batch": 10}, {}),
        "micro": ({"repeats": 2, "block_seconds": 0.001}, {}),
    }
    monkeypatch.setattr(run, "PARAMS", tiny)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    assert run.main(["--quick", "--only", "asgi,micro"]) == 0
    text = capsys.readouterr().out
    assert "## Targets" in text
    assert "anonymous request, endpoint reads: Δ ≤ 0.8 x asgi-correlation-id" in text
    (saved,) = tmp_path.glob("*.json")
    data = json.loads(saved.read_text())
    assert {"machine", "asgi", "micro", "argv"} <= data.keys()
    assert not (tmp_path / "latest.md").exists()  # only a full run replaces latest.md


def test_instruction_count_child_runs_each_variant_in_process() -> None:
    """The code callgrind runs (warm-up, then n requests) works for every variant."""
    for name in ("bare", "ctxvars", "correlation"):
        instructions._child(name, 3)


def test_instruction_counts_cancel_start_up_and_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per request = (I(high) - I(low)) / (high - low); the table shows Δ and peer ratios.
    (Counting under valgrind itself takes ~30 s a process: `python -m bench.run --only
    instructions` does that.)"""
    cost = {"bare": 80_000, "ctxvars": 140_000, "correlation": 120_000}
    monkeypatch.setattr(instructions, "_count", lambda name, n: 10**9 + cost[name] * n)
    result = instructions.run(low=100, high=300, names=("bare", "ctxvars", "correlation", "x"))
    assert result["per_request"] == {"bare": 80_000, "ctxvars": 140_000, "correlation": 120_000}
    text = "\n".join(instructions.section(result))
    assert "| ctxvars_mw anonymous | 140,000 | 60,000 | 1.50x |" in text
    assert "| asgi-correlation-id | 120,000 | 40,000 | 1.00x |" in text


def test_summary_and_report_helpers() -> None:
    """Summary orders its figures; the report renders the machine line."""
    s = Summary.of([3.0, 1.0, 2.0])
    assert (s.low, s.median, s.high) == (1.0, 2.0, 3.0)
    assert s.q1 <= s.median <= s.q3
    with pytest.raises(ValueError, match="no values"):
        Summary.of([])
    text = report.render({"machine": machine(), "argv": "python -m bench.run"})
    assert "Python" in text
