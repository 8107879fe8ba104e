"""The one validated, frozen configuration of a broker process, built from defaults, environment and flags.

Precedence, highest first: command-line flag, ``REPLIKA_*`` environment variable, built-in default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from replika_protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_FRAME, DEFAULT_MAX_PAYLOAD, FRAME_ROOM

__all__ = ["Config", "ConfigError", "parse_size"]

DEFAULT_PORT = 8777
DEFAULT_ADMIN_PORT = 8333


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from ``"4096"``, ``"64M"``, ``"1GiB"`` (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"not a size: {text!r} (use e.g. 512M or 8G)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of ``replika serve``. Sizes in bytes, durations in seconds."""

    host: str = "127.0.0.1"  # loopback unless told otherwise: a broker must be opened to a network on purpose
    port: int = DEFAULT_PORT
    data_dir: Path = Path("replika-data")
    durability: str = "sync"
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = DEFAULT_MAX_BATCH
    max_payload: int = 0  # 0: DEFAULT_MAX_PAYLOAD, or less when max_frame is too small to carry it
    max_store_size: int = 64 * 1024**3
    sync_interval: float = 1.0
    log_level: str = "info"
    log_format: str = "auto"  # auto: JSON unless stderr is a terminal

    def __post_init__(self) -> None:
        if self.durability not in ("sync", "relaxed"):
            raise ConfigError("durability must be 'sync' or 'relaxed'")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be between 0 and 65535")
        if not 2 * FRAME_ROOM <= self.max_frame <= 1024**3:
            raise ConfigError(f"max_frame must be between {2 * FRAME_ROOM // 1024} KiB and 1 GiB")
        if not 1 <= self.max_batch <= 1_000_000:
            raise ConfigError("max_batch must be between 1 and 1000000")
        if self.max_payload == 0:
            object.__setattr__(self, "max_payload", min(DEFAULT_MAX_PAYLOAD, self.max_frame - FRAME_ROOM))
        if not 1 <= self.max_payload <= self.max_frame - FRAME_ROOM:
            raise ConfigError(
                f"max_payload must be positive and at least {FRAME_ROOM // 1024} KiB below max_frame "
                "(room for headers and the reply envelope)"
            )
        if self.max_store_size < 1024 * 1024:
            raise ConfigError("max_store_size must be at least 1 MiB")
        if self.sync_interval <= 0:
            raise ConfigError("sync_interval must be positive")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")

    @classmethod
    def build(cls, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
        """Merge ``flags`` (None means not given) over ``REPLIKA_<NAME>`` variables over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = flags.get(f.name)
            if raw is None:
                raw = environ.get("REPLIKA_" + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _convert(f.name, f.default, raw)
        return cls(**values)


def _convert(name: str, default: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, Path):
            return Path(raw)
        if name.startswith("max_") and name != "max_batch":
            return parse_size(raw)
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return raw
