"""Checks for the authenticators' numeric options (a bad value → ConfigurationError)."""

from __future__ import annotations

from ..errors import ConfigurationError

__all__ = ["int_option", "seconds_option"]


def int_option(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}")
    return value


def seconds_option(name: str, value: object, minimum: float = 0, *, above: bool = False) -> float:
    """``value`` as float seconds if it is a number >= ``minimum`` (> ``minimum`` with
    ``above``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < minimum
        or (above and value == minimum)
    ):
        relation = ">" if above else ">="
        raise ConfigurationError(f"{name} must be a number of seconds {relation} {minimum}")
    return float(value)
