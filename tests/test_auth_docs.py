"""docs/identity-providers.md: every python block runs as a standalone script."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.servers import ROOT

PAGE = ROOT / "docs" / "identity-providers.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def test_the_page_has_an_example_per_provider() -> None:
    """Auth0, Keycloak, Entra ID, a generic provider and the startup check each have one."""
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_example_runs_as_written(block: str) -> None:
    """The block exits 0 in a fresh interpreter (its own asserts hold), warnings as errors."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", block],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
