"""``python -m ctxvars_mw demo``: the served demo, the in-process tour, the command line."""

from __future__ import annotations

import io
import itertools
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from ctxvars_mw import ConfigurationError, demo
from ctxvars_mw.__main__ import main
from tests.servers import ROOT, free_port, wait_for_port

STAIRCASE = {
    "free": ["200", "403", "403", "403", "403", "403"],
    "early": ["200", "200", "403", "403", "403", "403"],
    "business": ["200", "200", "200", "403", "403", "403"],
    "enterprise": ["200", "200", "200", "200", "200", "403"],
    "internal": ["200", "200", "200", "200", "200", "200"],
}


@pytest.fixture(scope="module")
def tour_output() -> str:
    """The tour's printed output (run once for the module)."""
    out = io.StringIO()
    demo.tour(out=out)
    return out.getvalue()


def section(output: str, number: int) -> list[list[str]]:
    """The table rows (split on 2+ spaces) of section ``number``, header and rule dropped."""
    text = output.split(f"== {number}.")[1].split("\n== ")[0]
    lines = [line for line in text.splitlines()[1:] if line.strip()]
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


def test_tour_shows_each_tier_on_the_gated_endpoints(tour_output: str) -> None:
    """Section 1: every tier's row is the default policy's 200/403 staircase."""
    rows = section(tour_output, 1)
    assert {row[0]: row[2:] for row in rows} == STAIRCASE
    assert [row[1] for row in rows] == ["user", "user", "user", "admin", "admin"]


def test_tour_shows_401_for_missing_and_invalid_tokens(tour_output: str) -> None:
    """Section 2: no token is anonymous on /whoami and 401 on a gate; bad tokens are 401."""
    rows = section(tour_output, 2)
    assert rows[0][:4] == ["no token", "GET /whoami", "200", "user anonymous"]
    assert [row[2:4] for row in rows[1:]] == [
        ["401", "authentication_required"],
        ["401", "invalid_token"],
        ["401", "invalid_token"],
        ["401", "invalid_token"],
    ]
    assert rows[4][4] == "The access token has expired."


def test_tour_shows_a_linked_child_context_chain(tour_output: str) -> None:
    """Section 3: depths 0-3, each step's parent is the step before, one correlation id."""
    rows = [row for row in section(tour_output, 3) if row[0].isdigit()]
    assert [row[:2] for row in rows] == [
        ["0", "(the request)"],
        ["1", "agent.plan"],
        ["2", "tool.search"],
        ["3", "tool.fetch"],
    ]
    for parent, child in itertools.pairwise(rows):
        assert child[3] == parent[2]
    assert f"correlation id {rows[0][2]}" in tour_output


def test_tour_delivers_each_event_only_to_its_own_user(tour_output: str) -> None:
    """Section 4: each socket's first event is its own user's run."""
    rows = [row for row in section(tour_output, 4) if row[0].endswith("socket")]
    assert [row[0] for row in rows] == ["business's socket", "free's socket"]
    assert all(row[-1] == "yes" for row in rows)
    assert rows[0][2] != rows[1][2]
    assert "14 refusals audited" in tour_output  # 13 denials and one 429


def test_tour_shows_a_free_caller_reaching_its_quota_while_business_passes(
    tour_output: str,
) -> None:
    """Section 5: free's fourth agent run is a 429 with a Retry-After; business's all pass."""
    rows = section(tour_output, 5)[:8]
    free = [row for row in rows if row[0] == "free"]
    business = [row for row in rows if row[0] == "business"]
    assert [row[2:4] for row in free] == [
        ["200", "2"],
        ["200", "1"],
        ["200", "0"],
        ["429", "quota_exceeded"],
    ]
    assert [row[4] for row in free[:3]] == ["-"] * 3
    assert 1 <= int(free[3][4]) <= 86400  # seconds until the next UTC day
    assert [row[2:4] for row in business] == [
        ["200", "999"],
        ["200", "998"],
        ["200", "997"],
        ["200", "996"],
    ]
    assert '"minute";q=600;w=60' in tour_output


def test_tour_runs_with_the_network_switched_off() -> None:
    """``demo --tour`` as a command succeeds with every socket connect and bind refused."""
    code = textwrap.dedent(
        """
        import socket, sys

        def refuse(*args, **kwargs):
            raise RuntimeError("the tour touched the network")

        socket.socket.connect = refuse
        socket.socket.bind = refuse
        socket.create_connection = refuse
        from ctxvars_mw.__main__ import main
        sys.exit(main(["demo", "--tour"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "== 4. Websocket events" in done.stdout


def test_help_documents_the_demo_and_its_options() -> None:
    """``--help`` works for the program and for ``demo`` (--tour, --host, --port)."""
    top = subprocess.run(
        [sys.executable, "-m", "ctxvars_mw", "--help"], capture_output=True, text=True, timeout=30
    )
    assert top.returncode == 0
    assert "demo" in top.stdout
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--help"])
    assert exited.value.code == 0


@pytest.mark.parametrize("argv", [["demo", "--port", "0"], ["demo", "--port", "x"], []])
def test_bad_arguments_exit_with_status_2(argv: list[str]) -> None:
    """A port out of range, a non-number or no command is a usage error (status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


def test_missing_example_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a source checkout the demo says what it needs instead of crashing."""
    monkeypatch.setattr(demo, "EXAMPLE_PATH", Path("/nonexistent/examples/fastapi_app.py"))
    with pytest.raises(ConfigurationError, match="source checkout"):
        demo.load_example()
    assert main(["demo", "--tour"]) == 2


def run_printed_commands(printed: str) -> None:
    """Paste the printed shell lines into bash, as a user would; check what curl shows."""
    script = "set -e\n" + printed[printed.index("# 1.") : printed.index("# 5.")]
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    tiers = re.findall(r'"tier":"(\w+)"', done.stdout)
    assert tiers[:5] == ["free", "early", "business", "enterprise", "internal"]
    assert re.findall(r"HTTP/1.1 (\d{3})", done.stdout) == ["200", "403", "401", "200", "401"]
    assert '"operation":"tool.fetch"' in done.stdout


def test_demo_serves_the_example_with_the_printed_tokens() -> None:
    """``demo --port P`` serves on 127.0.0.1:P; each printed token is its tier's user."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxvars_mw", "demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not (lines[-1].startswith("# 5.") or lines[-1] == ""):
            lines.append(proc.stdout.readline())  # up to the last curl hint (or EOF)
        wait_for_port(port)
        tokens = dict(re.findall(r"export TOKEN_(\w+)='([^']+)'", "".join(lines)))
        assert sorted(tokens) == ["BUSINESS", "EARLY", "ENTERPRISE", "FREE", "INTERNAL"]
        base = f"http://127.0.0.1:{port}"
        for name, token in tokens.items():
            me = httpx.get(f"{base}/whoami", headers={"Authorization": f"Bearer {token}"})
            assert me.json()["tier"] == name.lower()
        free = {"Authorization": f"Bearer {tokens['FREE']}"}
        assert httpx.get(f"{base}/reports", headers=free).status_code == 403
        assert httpx.get(f"{base}/reports").status_code == 401
        if shutil.which("curl") and shutil.which("bash"):
            run_printed_commands("".join(lines))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
