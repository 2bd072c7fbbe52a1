"""Benchmarks for ctxvars_mw (not tests): ``python -m bench.run`` (see bench/README.md)."""
