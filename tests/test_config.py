"""Configuration: flags over REPLIKA_* environment over defaults, validated once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from replika_server.config import Config, ConfigError, parse_size


def test_defaults_are_safe() -> None:
    config = Config.build({}, environ={})
    assert (config.host, config.port, config.durability) == ("127.0.0.1", 8777, "sync")


def test_flags_override_environment_override_defaults() -> None:
    env = {"REPLIKA_PORT": "9000", "REPLIKA_DURABILITY": "relaxed", "REPLIKA_MAX_FRAME": "1M"}
    config = Config.build({"port": 9100, "host": None}, environ=env)
    assert config.port == 9100  # flag wins
    assert config.durability == "relaxed"  # from the environment
    assert config.max_frame == 1024 * 1024
    assert config.host == "127.0.0.1"  # default


def test_data_dir_from_environment() -> None:
    assert Config.build({}, environ={"REPLIKA_DATA_DIR": "/srv/q"}).data_dir == Path("/srv/q")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REPLIKA_DURABILITY": "maybe"}, "durability"),
        ({"REPLIKA_PORT": "99999"}, "port"),
        ({"REPLIKA_PORT": "eighty"}, "port"),
        ({"REPLIKA_MAX_FRAME": "lots"}, "size"),
    ],
)
def test_bad_settings_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.build({}, environ=env)


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 * 1024**2
    assert parse_size("1GiB") == 1024**3


def test_cli_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replika_server", "serve", "--durability", "relaxed", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "port" in result.stderr


def test_cli_help_lists_the_contract_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replika_server", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for flag in ("--host", "--port", "--data-dir", "--durability"):
        assert flag in result.stdout


def test_security_and_limit_settings_from_the_environment() -> None:
    env = {
        "REPLIKA_AUTH": "/etc/replika/auth.toml",
        "REPLIKA_INSECURE": "true",
        "REPLIKA_MAX_OUTBOUND": "2M",
        "REPLIKA_QUEUE_MAX_BYTES": "1G",
        "REPLIKA_MAX_CONNECTIONS": "100",
        "REPLIKA_IDLE_TIMEOUT": "0",
        "REPLIKA_PUBLISH_RATE": "250.5",
    }
    config = Config.build({}, environ=env)
    assert config.auth == Path("/etc/replika/auth.toml") and config.insecure is True
    assert (config.max_outbound, config.queue_max_bytes) == (2 * 1024**2, 1024**3)
    assert (config.max_connections, config.idle_timeout, config.publish_rate) == (100, 0.0, 250.5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"handshake_timeout": 0}, "handshake_timeout"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"max_queues": 0}, "max_queues"),
        ({"queue_max_length": -1}, "queue_max_length"),
        ({"max_outbound": 1024}, "max_outbound"),
        ({"publish_rate": -1}, "publish_rate"),
        ({"tls_key": Path("k")}, "together"),
    ],
)
def test_bad_limits_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**settings)  # type: ignore[arg-type]
