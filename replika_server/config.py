"""The one validated, frozen configuration of a broker process, built from defaults, environment and flags.

Precedence, highest first: command-line flag, ``REPLIKA_*`` environment variable, built-in default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from replika_protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_FRAME, DEFAULT_MAX_PAYLOAD, FRAME_ROOM

__all__ = ["Config", "ConfigError", "check_exposure", "is_loopback", "parse_size"]

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
    # The HTTP sidecar (dashboard, admin API, metrics), in the same process. admin_port None: no sidecar.
    admin_host: str = "127.0.0.1"
    admin_port: int | None = DEFAULT_ADMIN_PORT
    admin_cors_origins: tuple[str, ...] = ()  # browser origins besides the dashboard's own that may call the API
    text_protocol: bool = True  # connections starting with a letter speak the debug line protocol (nc)
    data_dir: Path = Path("replika-data")
    durability: str = "sync"
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = DEFAULT_MAX_BATCH
    max_payload: int = 0  # 0: DEFAULT_MAX_PAYLOAD, or less when max_frame is too small to carry it
    max_store_size: int = 64 * 1024**3
    sync_interval: float = 1.0
    log_level: str = "info"
    log_format: str = "auto"  # auto: JSON unless stderr is a terminal
    # Security (SECURITY.md). None: not configured.
    auth: Path | None = None  # TOML file of tokens and their permissions
    insecure: bool = False  # allow a non-loopback bind without authentication
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates signed by this CA (mutual TLS)
    # Limits on what clients control. 0 means unlimited where noted.
    max_connections: int = 4096
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0  # 0: never close an idle connection
    max_queues: int = 10_000
    queue_max_length: int = 0  # default per-queue limit on messages; 0: unlimited (max_store_size bounds it)
    queue_max_bytes: int = 0  # default per-queue limit on stored bytes; 0: unlimited
    max_outbound: int = 8 * 1024 * 1024  # unread reply bytes of one connection beyond which its fetches wait
    publish_rate: float = 0.0  # messages per second per token, for tokens that set none; 0: unlimited
    publish_burst: int = 0  # bucket size in messages; 0: one second's worth

    def __post_init__(self) -> None:
        if self.durability not in ("sync", "relaxed"):
            raise ConfigError("durability must be 'sync' or 'relaxed'")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be between 0 and 65535")
        if self.admin_port is not None and not 0 <= self.admin_port <= 65535:
            raise ConfigError("admin_port must be between 0 and 65535")
        for origin in self.admin_cors_origins:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ConfigError(f"admin_cors_origins: {origin!r} is not an origin like https://ops.example.com")
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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key (the server side of TLS)")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ConfigError("max_connections must be between 1 and 1000000")
        if not 0 < self.handshake_timeout <= 3600:
            raise ConfigError("handshake_timeout must be positive and at most 3600 seconds")
        if not 0 <= self.idle_timeout <= 86400 * 7:
            raise ConfigError("idle_timeout must be between 0 (never) and 604800 seconds")
        if not 1 <= self.max_queues <= 10_000_000:
            raise ConfigError("max_queues must be between 1 and 10000000")
        if self.queue_max_length < 0 or self.queue_max_bytes < 0:
            raise ConfigError("queue_max_length and queue_max_bytes must be 0 (unlimited) or positive")
        if self.max_outbound < 64 * 1024:
            raise ConfigError("max_outbound must be at least 64 KiB")
        if self.publish_rate < 0 or self.publish_burst < 0:
            raise ConfigError("publish_rate and publish_burst must be 0 (unlimited / default) or positive")

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


#: Settings given in bytes (accepting units such as 64M), and settings that are paths.
_SIZES = frozenset({"max_frame", "max_payload", "max_store_size", "max_outbound", "queue_max_bytes"})
_PATHS = frozenset({"data_dir", "auth", "tls_cert", "tls_key", "tls_client_ca"})


def _convert(name: str, default: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if name in _PATHS:
            return Path(raw)
        if name in _SIZES:
            return parse_size(raw)
        if name == "admin_cors_origins":
            return tuple(o.strip() for o in raw.split(",") if o.strip())
        if name == "admin_port":
            return None if raw.lower() in ("", "none", "off") else int(raw)
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return raw


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (resolving names)."""
    if host in ("", "0.0.0.0", "::"):
        return False  # every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(config: Config) -> None:
    """Refuse to serve a network with nobody checked at the door (Redis's protected mode): a bind beyond
    loopback needs ``--auth`` (tokens) or ``--tls-client-ca`` (client certificates), or an explicit
    ``--insecure``."""
    if config.insecure:
        return
    if config.auth is None and config.tls_client_ca is None and not is_loopback(config.host):
        raise ConfigError(
            f"refusing to listen on {config.host!r} without authentication: anyone who can reach it could "
            "read, publish and delete every message. Give --auth FILE (tokens, see SECURITY.md) or "
            "--tls-client-ca (client certificates); or --insecure if the network itself is trusted."
        )
    if config.auth is None and config.admin_port is not None and not is_loopback(config.admin_host):
        raise ConfigError(
            f"refusing to serve the admin API on {config.admin_host!r} without --auth: anyone who can reach it "
            "could read, purge and delete every queue. Give --auth FILE, or --insecure if the network is trusted."
        )
