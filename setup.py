"""Builds ctxvars_mw's optional C accelerator; everything else is in pyproject.toml.

The extension is optional: without a C compiler (or with ``CTXVARS_MW_NO_EXTENSIONS=1`` set
at build time) the install still succeeds and ``ContextMiddleware`` runs its pure-Python
path, which behaves the same, only slower.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("CTXVARS_MW_NO_EXTENSIONS"):
    ext_modules.append(Extension("ctxvars_mw._speedups", ["ctxvars_mw/_speedups.c"], optional=True))

setup(ext_modules=ext_modules)
