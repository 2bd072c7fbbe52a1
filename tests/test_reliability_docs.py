"""docs/reliability.md: every python block runs as a standalone script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT

PAGE = Path(ROOT) / "docs" / "reliability.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def test_the_page_has_its_examples() -> None:
    """The page keeps one runnable block per section that promises one."""
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_python_block_runs_standalone(block: int, tmp_path: Path) -> None:
    """Each block runs by itself in a fresh interpreter and exits 0."""
    script = tmp_path / f"block_{block}.py"
    script.write_text(BLOCKS[block])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
