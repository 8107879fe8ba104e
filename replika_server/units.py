"""Sizes and durations as people write them in flags, environment variables and config files, and the error a
setting that cannot be used raises."""

from __future__ import annotations

import math
import re

__all__ = ["ConfigError", "parse_duration", "parse_size"]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_SECONDS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_size(text: str) -> int:
    """Bytes from ``"4096"``, ``"64M"``, ``"1GiB"`` (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"not a size: {text!r} (use e.g. 512M or 8G)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def parse_duration(value: str | float) -> float:
    """Seconds from a number of seconds or a string with one unit: ``"90"``, ``"1.5"``, ``"250ms"``, ``"30s"``,
    ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"``. Never negative, never infinite or NaN."""
    if isinstance(value, bool):
        raise ConfigError(f"not a duration: {value!r} (use seconds, or e.g. 30s, 15m, 12h, 7d)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.fullmatch(value.strip())
        if m is None:
            raise ConfigError(f"not a duration: {value!r} (use seconds, or e.g. 30s, 15m, 12h, 7d)")
        seconds = float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"not a duration: {value!r} (a duration is a finite number of seconds, at least 0)")
    return seconds
