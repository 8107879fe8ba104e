"""The one validated, frozen configuration of a broker process, built from flags, environment, a file and defaults.

Precedence, highest first: command-line flag, ``REPLIKA_<SETTING>`` environment variable, TOML config file
(``--config``), built-in default. Each setting has one name: the field of :class:`Config`, which is the flag without
its dashes (``--data-dir``: ``data_dir``), the environment variable's suffix (``REPLIKA_DATA_DIR``) and the key in
the file (``data_dir = "/var/lib/replika"``).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from replika_protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_FRAME, DEFAULT_MAX_PAYLOAD, FRAME_ROOM
from replika_server.queue_config import DeclaredQueue, queues_from_toml, render_queues
from replika_server.store import StoreUrlError, engine_of
from replika_server.units import ConfigError, parse_duration, parse_size

__all__ = [
    "Config",
    "ConfigError",
    "DeclaredQueue",
    "check_exposure",
    "is_loopback",
    "load_config_file",
    "parse_duration",
    "parse_size",
    "render_toml",
]

DEFAULT_PORT = 8777
DEFAULT_ADMIN_PORT = 8333


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
    # Where messages live, as a URL naming the engine: a directory or lmdb:///path (embedded LMDB). "" means
    # data_dir; when both are given, store wins.
    store: str = ""
    durability: str = "sync"
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = DEFAULT_MAX_BATCH
    max_payload: int = 0  # 0: DEFAULT_MAX_PAYLOAD, or less when max_frame is too small to carry it
    max_store_size: int = 64 * 1024**3
    sync_interval: float = 1.0
    log_level: str = "info"
    log_format: str = "auto"  # auto: JSON unless the log stream is a terminal
    log_stream: str = "stderr"  # or stdout, where container runtimes expect a service's logs
    # Files a script reads to learn the ports bound (useful with port 0); None: not written.
    port_file: Path | None = None
    admin_port_file: Path | None = None
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
    # Queues declared with these options at every start: the config file's [queues."name"] tables only.
    queues: tuple[DeclaredQueue, ...] = ()

    def __post_init__(self) -> None:
        if self.store:
            try:
                engine_of(self.store)
            except StoreUrlError as exc:
                raise ConfigError(f"store: {exc}") from None
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
        if self.log_stream not in ("stderr", "stdout"):
            raise ConfigError("log_stream must be stderr or stdout")
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

    @property
    def store_url(self) -> str:
        """The store this broker serves: ``store`` if given, else the LMDB directory ``data_dir``."""
        return self.store or str(self.data_dir)

    @classmethod
    def build(
        cls,
        flags: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        file: Mapping[str, Any] | None = None,
    ) -> Config:
        """Merge ``flags`` (None means not given) over ``REPLIKA_<NAME>`` variables over ``file`` (from
        :func:`load_config_file`) over defaults."""
        return cls.build_with_origins(flags, environ, file)[0]

    @classmethod
    def build_with_origins(
        cls,
        flags: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        file: Mapping[str, Any] | None = None,
    ) -> tuple[Config, dict[str, str]]:
        """:meth:`build`, and where each setting came from: ``flag``, ``env REPLIKA_X``, ``file`` or ``default``."""
        environ = os.environ if environ is None else environ
        file = file or {}
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for f in fields(cls):
            env_name = "REPLIKA_" + f.name.upper()
            if flags.get(f.name) is not None:
                values[f.name], origins[f.name] = _convert(f.name, f.default, flags[f.name]), "flag"
            elif environ.get(env_name) is not None:
                values[f.name], origins[f.name] = _convert(f.name, f.default, environ[env_name]), f"env {env_name}"
            elif f.name in file:
                values[f.name], origins[f.name] = file[f.name], "file"
            else:
                origins[f.name] = "default"
        return cls(**values), origins


#: Settings given in bytes (accepting units such as 64M), and settings that are paths.
_SIZES = frozenset({"max_frame", "max_payload", "max_store_size", "max_outbound", "queue_max_bytes"})
_PATHS = frozenset({"data_dir", "auth", "tls_cert", "tls_key", "tls_client_ca", "port_file", "admin_port_file"})


def _convert(name: str, default: Any, raw: Any) -> Any:
    if name == "queues":
        raise ConfigError('queues: only tables of the config file declare queues ([queues."name"])')
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


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML config file, converted and checked for type, for :meth:`Config.build`.

    Keys are :class:`Config`'s field names at the top level of the file; an unknown key is an error naming it.
    Sizes are a number of bytes or a string with a unit (``"64M"``), durations are seconds, ``admin_port`` may
    be ``"off"``. A relative path is relative to the file's own directory, so that a file and the files it names
    can move together. Ranges are checked when the :class:`Config` is built. ``[queues."name"]`` tables declare
    queues (:mod:`replika_server.queue_config`), checked here."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    defaults = {f.name: f.default for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in defaults:
            close = difflib.get_close_matches(key.replace("-", "_"), defaults, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
        try:
            values[key] = _from_file(key, defaults[key], value, path.parent)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    return values


def _from_file(name: str, default: Any, value: Any, base: Path) -> Any:
    if name == "queues":
        return queues_from_toml(value)
    if name == "store" and isinstance(value, str) and value and "://" not in value:
        return str(base / value)  # a directory, relative to the file as data_dir is
    if name in _PATHS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a path (a non-empty string)")
        return base / value  # an absolute value stays as it is
    if name == "admin_port" and value is False:
        return None
    if name == "admin_cors_origins" and isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return tuple(value)
    if isinstance(value, str):
        return _convert(name, default, value)  # as in the environment: "64M", "off", "true"
    expected: tuple[type, ...]
    if isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, float):
        expected = (int, float)
    elif isinstance(default, int):
        expected = (int,)
    else:
        expected = (str,)
    if isinstance(value, bool) != (expected == (bool,)) or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {' or '.join(t.__name__ for t in expected)}, not {type(value).__name__}")
    return float(value) if float in expected else value


def render_toml(config: Config, origins: Mapping[str, str] | None = None) -> str:
    """``config`` as a TOML file that :func:`load_config_file` reads back to the same settings: paths absolute,
    sizes in bytes, an unset path as a comment. ``origins`` (from :meth:`Config.build_with_origins`) adds a comment
    per line saying where the value came from."""
    lines = [
        "# replika serve settings. Precedence: flag > REPLIKA_* environment > this file (--config) > default.",
    ]
    for f in fields(Config):
        value = getattr(config, f.name)
        origin = f"  # {origins[f.name]}" if origins else ""
        if f.name == "queues":
            continue  # tables, which TOML puts after every key of the top level
        if value is None and f.name != "admin_port":
            lines.append(f"# {f.name} = (not set){origin}")
        else:
            lines.append(f"{f.name} = {_toml_value(f.name, value)}{origin}")
    if not config.queues:
        lines.append('# queues: none declared here ([queues."name"] tables, with the options of declare)')
    lines += render_queues(config.queues)
    return "\n".join(lines) + "\n"


def _toml_value(name: str, value: Any) -> str:
    if name == "admin_port" and value is None:
        return '"off"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value.absolute())
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_string(v) for v in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    # JSON's string escapes are a subset of TOML's basic-string escapes; DEL is the one control character JSON
    # leaves bare and TOML does not allow.
    return json.dumps(text).replace("\x7f", "\\u007f")


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
