"""Every fenced block in README.md and docs/*.md runs, the way a new user would run it.

* ``python`` blocks are written to a file in a fresh temporary directory and run there with
  ``sys.executable`` (warnings are errors): they must exit 0. A block that is a pytest test file
  (``import pytest`` and a ``def test_``) is run with ``python -m pytest`` instead, next to the
  ``toml``/``ini`` pytest configuration shown on the same page.
* ``bash``/``console`` blocks: ``pip install`` lines must name extras that ``pyproject.toml``
  defines; every other command runs from the checkout's root and must exit 0 within the timeout.
* ``toml``/``ini``/``json`` blocks must parse; ``text`` blocks are output samples.

Only the checkout's ``ctxvars_mw`` package is put on the blocks' ``sys.path`` (through a
directory holding a link to it), so nothing else from the repository leaks into them. The blocks
run in parallel, once per session, and each test reports its own block: ids look like
``docs/context.md:42`` (the line of the opening fence).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 60
RUN_LANGUAGES = {"python", "bash", "console"}
PARSE_LANGUAGES = {"toml", "ini", "json", "text"}

# The README's set-up commands: checked as text, since one of them is this very test suite.
SETUP = """\
python -m pip install -e ".[dev]" && python -m ctxvars_mw demo   # serve the demo on 127.0.0.1:8000, print curl commands
python -m pip install -e ".[dev]" && python -m pytest             # run the whole test suite
"""  # noqa: E501


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language and its text."""

    page: Path
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, in order; an unterminated fence is an error."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines(keepends=True)
    opening: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        fence = re.match(r"^```([\w-]*)\s*$", line)
        if opening is None and fence:
            opening, body = (number, fence.group(1)), []
        elif opening is not None and line.rstrip() == "```":
            found.append(Block(page, opening[0], opening[1], "".join(body)))
            opening = None
        elif opening is not None:
            body.append(line)
    assert opening is None, f"{page.name}:{opening and opening[0]}: unterminated code block"
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def is_pytest_file(block: Block) -> bool:
    """A python block that is a test module, to be run by pytest."""
    code = block.code
    return bool(
        re.search(r"^import pytest$", code, re.M) and re.search(r"^(async )?def test_", code, re.M)
    )


def pytest_config_of(page: Path) -> dict[str, str]:
    """The pytest configuration files a page shows, by file name."""
    files: dict[str, str] = {}
    for block in blocks_of(page):
        if block.language == "toml" and "[tool.pytest.ini_options]" in block.code:
            files["pyproject.toml"] = block.code
        if block.language == "ini" and block.code.lstrip().startswith("[pytest]"):
            files["pytest.ini"] = block.code
    return files


def block_env(site: Path) -> dict[str, str]:
    """The environment of a block: only the checkout's package added to the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    env["PYTHONWARNINGS"] = "error"
    return env


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str | None:
    """None when ``args`` exits 0 within the timeout, else what went wrong."""
    try:
        done = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{shlex.join(args)} did not finish within {TIMEOUT} s"
    if done.returncode != 0:
        return f"{shlex.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return None


def extras_defined() -> set[str]:
    """The extras ``pyproject.toml`` defines."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def check_pip_install(command: str) -> str | None:
    """An error when a ``pip install`` command names an extra that does not exist."""
    missing = []
    for names in re.findall(r"\[([\w,\s-]+)\]", command):
        missing += [n.strip() for n in names.split(",") if n.strip() not in extras_defined()]
    return f"unknown extras {missing} in {command!r}" if missing else None


def check_setup(site: Path) -> str | None:
    """The README's set-up commands are the ones the project promises, and the demo starts."""
    if ("python -m ctxvars_mw demo" not in SETUP) or check_pip_install(SETUP):
        return check_pip_install(SETUP) or "the set-up commands changed"
    return run([sys.executable, "-m", "ctxvars_mw", "demo", "--help"], ROOT, block_env(site))


def run_shell(block: Block, site: Path) -> str | None:
    """Run each command of a bash/console block (``pip install`` lines are only checked)."""
    if block.page.name == "README.md" and block.code == SETUP:
        return check_setup(site)
    for raw in block.code.splitlines():
        line = raw.removeprefix("$ ").split("  #", 1)[0].strip()
        if block.language == "console" and not raw.startswith("$ "):
            continue  # output shown after a command
        if not line or line.startswith("#"):
            continue
        for command in (part.strip() for part in line.split("&&")):
            if re.match(r"^(python -m )?pip install ", command):
                error = check_pip_install(command)
            else:
                args = shlex.split(command)
                if args[0] == "python":
                    args[0] = sys.executable
                error = run(args, ROOT, block_env(site))
            if error:
                return error
    return None


def run_python(block: Block, site: Path, workdir: Path) -> str | None:
    """Run a python block in ``workdir``, as a script or as a pytest file."""
    env = block_env(site)
    if is_pytest_file(block):
        for name, text in pytest_config_of(block.page).items():
            (workdir / name).write_text(text)
        (workdir / "test_example.py").write_text(block.code)
        return run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], workdir, env)
    (workdir / "example.py").write_text(block.code)
    return run([sys.executable, "example.py"], workdir, env)


def check_block(block: Block, site: Path, workdir: Path) -> str | None:
    """None when ``block`` runs (or parses) as its language says, else the failure."""
    if block.language == "python":
        return run_python(block, site, workdir)
    if block.language in ("bash", "console"):
        return run_shell(block, site)
    if block.language == "toml":
        tomllib.loads(block.code)
    elif block.language == "ini":
        configparser.ConfigParser().read_string(block.code)
    elif block.language == "json":
        json.loads(block.code)
    elif block.language != "text":
        return f"unknown block language {block.language!r}: use python, bash, toml, ini or text"
    return None


@pytest.fixture(scope="session")
def block_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[str | None]]]:
    """Every selected block, checked in parallel once per session, by block id."""
    site = tmp_path_factory.mktemp("site")
    (site / "ctxvars_mw").symlink_to(ROOT / "ctxvars_mw", target_is_directory=True)
    selected = {
        item.callspec.id
        for item in request.session.items
        if item.originalname == "test_code_block" and hasattr(item, "callspec")
    }
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        yield {
            block.id: pool.submit(check_block, block, site, tmp_path_factory.mktemp("block"))
            for block in BLOCKS
            if block.id in selected
        }


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_code_block(block: Block, block_results: dict[str, Future[str | None]]) -> None:
    """The block runs (or parses) as a new user would use it."""
    error = block_results[block.id].result()
    assert error is None, error


def test_every_page_is_found_and_has_blocks() -> None:
    """The runner sees the README and every docs page, and the docs are mostly runnable."""
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    expected = {
        "README.md",
        *(
            f"docs/{topic}.md"
            for topic in [
                "index",
                "authentication",
                "authorization",
                "context",
                "events",
                "integrations",
                "limits",
                "logging",
                "middleware",
                "performance",
                "propagation",
                "security",
                "testing",
            ]
        ),
    }
    assert expected <= names
    runnable = [block for block in BLOCKS if block.language in RUN_LANGUAGES]
    assert len(runnable) >= 25
    assert all(block.language in RUN_LANGUAGES | PARSE_LANGUAGES for block in BLOCKS)


def test_readme_starts_with_the_set_up_commands() -> None:
    """The README's first block is exactly the two set-up commands, before any other text."""
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# ctxvars_mw\n\n```bash\n" + SETUP + "```\n")


def test_readme_is_a_front_door() -> None:
    """The README stays short and links the manual, the policy, the history and the benchmarks."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for target in ("SECURITY.md", "CHANGELOG.md", "bench/README.md", "docs/index.md"):
        assert f"]({target}" in readme


def test_relative_links_point_at_files() -> None:
    """Every relative link in the README and docs names a file of the checkout."""
    broken = []
    for page in [*PAGES, ROOT / "SECURITY.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve()
            if not path.exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_no_page_mentions_removed_machinery() -> None:
    """The docs describe the library users get: no C accelerator, no build switch."""
    for page in [*PAGES, ROOT / "SECURITY.md", ROOT / "CHANGELOG.md"]:
        text = page.read_text()
        for word in ("accelerator", "_speedups", "CTXVARS_MW_NO_EXTENSIONS"):
            assert word not in text, f"{page.name} mentions {word}"


def test_shell_pip_lines_name_real_extras() -> None:
    """An unknown extra in a ``pip install`` line is reported, a known one is not."""
    assert check_pip_install('python -m pip install "ctxvars-mw[redis,fastapi]"') is None
    assert check_pip_install('pip install "ctxvars-mw[nosuchextra]"') is not None
