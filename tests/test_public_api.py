"""The public surface of ctxvars_mw: one sorted, complete __all__, and a light import."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import ctxvars_mw

PACKAGE = Path(ctxvars_mw.__file__).resolve().parent
OPTIONAL_FRAMEWORKS = ("starlette", "fastapi", "django", "redis", "celery")


def _names_bound_in_init() -> set[str]:
    """Public names that ``ctxvars_mw/__init__.py`` binds at module level."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def test_all_is_sorted_and_unique() -> None:
    """__all__ is sorted and names each export once."""
    assert list(ctxvars_mw.__all__) == sorted(ctxvars_mw.__all__)
    assert len(set(ctxvars_mw.__all__)) == len(ctxvars_mw.__all__)


def test_all_is_complete() -> None:
    """Every public name bound in __init__.py is in __all__, and nothing else is."""
    assert _names_bound_in_init() == set(ctxvars_mw.__all__)


def test_every_exported_name_imports_and_is_documented() -> None:
    """Each name in __all__ resolves and carries a docstring."""
    for name in ctxvars_mw.__all__:
        obj = getattr(ctxvars_mw, name)
        assert inspect.getdoc(obj), name
    namespace: dict[str, object] = {}
    exec("from ctxvars_mw import *", namespace)  # the star import users write
    assert set(ctxvars_mw.__all__) <= set(namespace)


def test_core_contract_names_are_exported() -> None:
    """The core of API.md §1, §2, §3 and §6 is importable from the package root."""
    core = {
        "UserExecutionContext",
        "Tier",
        "IdRules",
        "use_id_rules",
        "set_id_rules",
        "get_context",
        "get_context_or_none",
        "use_context",
        "child_context",
        "bind",
        "run_in_thread",
        "ContextMiddleware",
        "CtxvarsError",
        "ConfigurationError",
        "InvalidContextError",
        "MaxDepthExceededError",
        "ContextNotSetError",
        "AuthenticationError",
        "AuthenticationRequiredError",
        "InvalidTokenError",
        "ExpiredTokenError",
        "PermissionDeniedError",
        "PermissionEscalationError",
    }
    assert core <= set(ctxvars_mw.__all__)


def test_importing_the_core_imports_no_framework() -> None:
    """``import ctxvars_mw`` (and its logging/testing modules) loads no optional framework."""
    code = (
        "import sys, ctxvars_mw, ctxvars_mw.logging, ctxvars_mw.testing;"
        f"print(','.join(m for m in {OPTIONAL_FRAMEWORKS!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_package_ships_py_typed() -> None:
    """The package is marked as typed."""
    assert (PACKAGE / "py.typed").is_file()
