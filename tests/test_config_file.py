"""Settings from a TOML file (``replika serve --config``), its precedence under environment and flags, and
``--print-config``, whose output ``--config`` reads back to the same settings."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import replika
from replika_server.cli import build_parser, serve_flags
from replika_server.config import Config, ConfigError, DeclaredQueue, load_config_file, render_toml
from replika_server.store import QueueOptions
from replika_server.store.model import HistoryOptions
from tests.conftest import WAIT, ServerProcess


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def serve(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLIKA_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "replika_server", "serve", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=environ,
        cwd=cwd,
    )


def settings(toml_text: str) -> dict[str, object]:
    return tomllib.loads(toml_text)


def test_a_file_gives_every_kind_of_setting(tmp_path: Path) -> None:
    path = write(
        tmp_path / "replika.toml",
        """
port = 9001
data_dir = "store"                 # relative to the file's directory
auth = "/etc/replika/auth.toml"
max_frame = "1M"
max_store_size = 2147483648
sync_interval = 2                  # an integer for a float setting
durability = "relaxed"
insecure = true
text_protocol = false
admin_port = "off"
admin_cors_origins = ["https://ops.example.com"]
""",
    )
    config = Config.build({}, environ={}, file=load_config_file(path))
    assert (config.port, config.durability, config.insecure, config.text_protocol) == (9001, "relaxed", True, False)
    assert config.data_dir == tmp_path / "store"
    assert config.auth == Path("/etc/replika/auth.toml")
    assert (config.max_frame, config.max_store_size) == (1024**2, 2 * 1024**3)
    assert config.sync_interval == 2.0 and isinstance(config.sync_interval, float)
    assert config.admin_port is None
    assert config.admin_cors_origins == ("https://ops.example.com",)


def test_precedence_flag_over_environment_over_file_over_default(tmp_path: Path) -> None:
    file = load_config_file(write(tmp_path / "r.toml", 'port = 1000\nhost = "127.0.0.2"\nmax_batch = 5\n'))
    env = {"REPLIKA_PORT": "2000", "REPLIKA_HOST": "127.0.0.3"}
    config, origins = Config.build_with_origins({"port": 3000}, environ=env, file=file)
    assert (config.port, config.host, config.max_batch, config.max_queues) == (3000, "127.0.0.3", 5, 10_000)
    assert (origins["port"], origins["host"], origins["max_batch"]) == ("flag", "env REPLIKA_HOST", "file")
    assert origins["max_queues"] == "default"
    assert Config.build({}, environ=env, file=file).port == 2000
    assert Config.build({}, environ={}, file=file).port == 1000
    assert Config.build({}, environ={}).port == 8777


def test_precedence_through_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", "port = 1000\nmax_batch = 5\nmax_queues = 7\n")
    result = serve("--config", str(path), "--port", "3000", "--print-config", env={"REPLIKA_MAX_BATCH": "6"})
    assert result.returncode == 0, result.stderr
    got = settings(result.stdout)
    assert (got["port"], got["max_batch"], got["max_queues"], got["max_connections"]) == (3000, 6, 7, 4096)
    lines = result.stdout.splitlines()
    assert "port = 3000  # flag" in lines
    assert "max_batch = 6  # env REPLIKA_MAX_BATCH" in lines
    assert "max_queues = 7  # file" in lines
    assert "max_connections = 4096  # default" in lines
    # The file may also be named by REPLIKA_CONFIG.
    result = serve("--print-config", env={"REPLIKA_CONFIG": str(path)})
    assert settings(result.stdout)["max_queues"] == 7


def test_print_config_round_trips_through_config(tmp_path: Path) -> None:
    first = serve(
        "--print-config",
        "--port",
        "9100",
        "--durability",
        "relaxed",
        "--max-frame",
        "1M",
        "--no-admin",
        "--no-text-protocol",
        "--admin-cors-origin",
        "https://a.example",
        "--admin-cors-origin",
        "http://b.example:8080",
        "--auth",
        "auth.toml",
        "--data-dir",
        "relative/store",
        "--log-stream",
        "stdout",
        env={"REPLIKA_IDLE_TIMEOUT": "12.5", "REPLIKA_PUBLISH_RATE": "100"},
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    printed = settings(first.stdout)
    assert printed["data_dir"] == str(tmp_path / "relative/store")  # absolute: the file may be read from elsewhere
    assert printed["admin_port"] == "off" and printed["text_protocol"] is False
    assert printed["admin_cors_origins"] == ["https://a.example", "http://b.example:8080"]
    assert (printed["idle_timeout"], printed["publish_rate"], printed["max_frame"]) == (12.5, 100.0, 1024**2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    saved = write(elsewhere / "printed.toml", first.stdout)
    second = serve("--config", str(saved), "--print-config", cwd=elsewhere)
    assert second.returncode == 0, second.stderr
    assert settings(second.stdout) == printed
    # Every setting came from the file the second time.
    assert all(line.endswith("# file") for line in second.stdout.splitlines() if line and not line.startswith("#"))


def test_render_toml_is_read_back_exactly(tmp_path: Path) -> None:
    config = Config(
        host="::1",
        port=0,
        admin_port=None,
        data_dir=tmp_path / 'odd "name"\\ é \x7f',
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "k.pem",
        max_payload=1000,
        sync_interval=0.25,
        queue_max_bytes=10**12,
    )
    path = write(tmp_path / "c.toml", render_toml(config))
    assert Config.build({}, environ={}, file=load_config_file(path)) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown setting 'prot' (did you mean 'port'?)"),
        ('data-dir = "x"\n', "unknown setting 'data-dir' (did you mean 'data_dir'?)"),
        ("[serve]\nport = 1\n", "unknown setting 'serve'"),
        ('port = "eighty"\n', "port"),
        ("port = true\n", "port must be int, not bool"),
        ("insecure = 1\n", "insecure must be bool, not int"),
        ("data_dir = 5\n", "data_dir must be a path"),
        ("sync_interval = [1]\n", "sync_interval must be int or float, not list"),
        ("admin_cors_origins = [1]\n", "admin_cors_origins must be a list of strings"),
        ("max_frame = 'lots'\n", "not a size"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        load_config_file(path)
    assert message in str(info.value)


def test_out_of_range_values_from_a_file_are_refused(tmp_path: Path) -> None:
    file = load_config_file(write(tmp_path / "r.toml", "port = 70000\n"))
    with pytest.raises(ConfigError, match="port"):
        Config.build({}, environ={}, file=file)


def test_serve_refuses_a_bad_or_missing_file_with_exit_2(tmp_path: Path) -> None:
    result = serve("--config", str(write(tmp_path / "r.toml", "portt = 1\n")))
    assert result.returncode == 2
    assert "unknown setting 'portt'" in result.stderr and result.stdout == ""
    result = serve("--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def test_every_serve_flag_is_a_setting_the_file_and_environment_can_give() -> None:
    parser = build_parser()
    names = {f.name for f in dataclasses.fields(Config)}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices["serve"]._actions:
        if action.dest in ("help", "config", "print_config"):
            continue
        value = [] if action.nargs == 0 else [str(next(iter(action.choices))) if action.choices else "1"]
        args = parser.parse_args(["serve", action.option_strings[0], *value])
        given = {k for k, v in serve_flags(args).items() if v is not None}
        assert len(given) == 1 and given <= names, f"{action.option_strings} is not exactly one setting: {given}"


def test_a_broker_runs_from_a_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "replika.toml", "max_batch = 7\ntext_protocol = false\n")
    proc = ServerProcess(tmp_path / "data", "--config", str(path)).start()
    try:
        with replika.Client(proc.url) as client:
            client.ping()
            assert client.max_batch == 7
    finally:
        proc.stop()


def test_logs_go_to_stdout_when_asked(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLIKA_")}
    environ.update(REPLIKA_LOG_STREAM="stdout", REPLIKA_LOG_FORMAT="json", REPLIKA_PORT_FILE=str(port_file))
    proc = subprocess.Popen(
        [sys.executable, "-m", "replika_server", "serve", "--port", "0", "--no-admin", "--data-dir", "d"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while not any('"event": "listening"' in line for line in seen):
            line = proc.stdout.readline()  # a log line: "listening" comes once the broker has started
            assert line, f"the broker exited: {proc.stderr.read() if proc.stderr else ''}"
            seen.append(line)
        deadline = time.monotonic() + WAIT
        while not port_file.exists():  # written right after "listening"; its path came from the environment
            assert time.monotonic() < deadline
            time.sleep(0.01)  # another process's file: nothing to await
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0
    assert '"event": "stopped"' in "".join(seen) + out and err == ""


def test_the_store_url_comes_from_the_environment_or_the_file(tmp_path: Path) -> None:
    url = "postgresql://replika@db1,db2/queues?target_session_attrs=read-write"
    from_env = Config.build({}, environ={"REPLIKA_STORE": url}, file={})
    assert from_env.store_url == url
    file = load_config_file(write(tmp_path / "r.toml", f'store = "{url}"\n'))
    assert Config.build({}, environ={}, file=file).store_url == url
    with pytest.raises(ConfigError, match="store"):
        Config.build({}, environ={"REPLIKA_STORE": "mysql://x/y"}, file={})


# ------------------------------------------------------------------------------------------------ [queues]
QUEUES = """
port = 9001

[queues."orders.eu"]
max_attempts = 5
dead_letter = "orders.failed"
max_bytes = "64M"
overflow = "drop_oldest"
retry_delay = "1.5s"
message_ttl = "12h"
history = { retention = "7d", max_messages = 1000, payloads = true }

[queues.jobs]
history = true
dedup_window = 0

[queues.audit]
max_length = 10

[queues.audit.history]
retention = 3600
"""


def test_queue_tables_give_declares_options(tmp_path: Path) -> None:
    config = Config.build({}, environ={}, file=load_config_file(write(tmp_path / "q.toml", QUEUES)))
    assert config.port == 9001
    assert config.queues == (
        DeclaredQueue(
            "orders.eu",
            QueueOptions(
                max_attempts=5,
                dead_letter="orders.failed",
                max_bytes=64 * 1024**2,
                overflow="drop_oldest",
                retry_delay=1.5,
                message_ttl=12 * 3600.0,
                history=HistoryOptions(retention=7 * 86400.0, max_messages=1000, payloads=True),
            ),
        ),
        DeclaredQueue("jobs", QueueOptions(dedup_window=0.0, history=HistoryOptions())),
        DeclaredQueue("audit", QueueOptions(max_length=10, history=HistoryOptions(retention=3600.0))),
    )
    # --print-config writes them back as tables that read back to the same options.
    path = write(tmp_path / "printed.toml", render_toml(config))
    assert Config.build({}, environ={}, file=load_config_file(path)).queues == config.queues
    assert '[queues."orders.eu"]' in path.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("queues = 1\n", 'queues must be tables: [queues."name"]'),
        ("[queues]\njobs = 5\n", 'queues."jobs" must be a table'),
        ('[queues."a b"]\n', 'queues."a b": not a queue name'),
        (
            "[queues.jobs]\nmax_attempt = 3\n",
            "queues.\"jobs\": unknown option 'max_attempt' (did you mean 'max_attempts'?)",
        ),
        ("[queues.jobs]\nmax_attempts = 0\n", 'queues."jobs".max_attempts must be between 1 and'),
        ('[queues.jobs]\nmax_attempts = "3"\n', 'queues."jobs".max_attempts must be an integer, not str'),
        ('[queues.jobs]\nretry_delay = "soon"\n', 'queues."jobs".retry_delay: not a duration'),
        ("[queues.jobs]\nmessage_ttl = -1\n", 'queues."jobs".message_ttl: not a duration'),
        ('[queues.jobs]\nmax_bytes = "lots"\n', 'queues."jobs".max_bytes: not a size'),
        ('[queues.jobs]\noverflow = "spill"\n', 'queues."jobs".overflow must be one of'),
        ('[queues.jobs]\ndead_letter = "jobs"\n', 'queues."jobs": a queue cannot be its own dead-letter queue'),
        ('[queues.jobs]\nhistory = "yes"\n', 'queues."jobs".history must be true, false or a table'),
        ("[queues.jobs]\nhistory = { keep = 1 }\n", "queues.\"jobs\".history: unknown option 'keep'"),
        ('[queues.jobs]\nhistory = { retention = "100d" }\n', 'queues."jobs".history.retention must be between'),
        ("[queues.jobs]\nhistory = { max_messages = 0 }\n", 'queues."jobs".history.max_messages must be between'),
        ("[queues.jobs]\nhistory = { payloads = 1 }\n", 'queues."jobs".history.payloads must be a boolean'),
    ],
)
def test_a_bad_queue_table_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        load_config_file(write(tmp_path / "bad.toml", text))
    assert message in str(info.value)


def test_queues_come_from_the_file_only() -> None:
    with pytest.raises(ConfigError, match="queues: only tables of the config file"):
        Config.build({}, environ={"REPLIKA_QUEUES": "jobs"})


def test_the_broker_declares_the_files_queues_at_every_start(tmp_path: Path) -> None:
    path = write(tmp_path / "replika.toml", QUEUES.replace("port = 9001\n", ""))
    proc = ServerProcess(tmp_path / "data", "--config", str(path)).start()
    try:
        with replika.Client(proc.url) as client:
            stats = client.stats("orders.eu")
            assert (stats["max_attempts"], stats["dead_letter"], stats["overflow"]) == (
                5,
                "orders.failed",
                "drop_oldest",
            )
            assert stats["history"] == {"retention": 7 * 86400.0, "max_messages": 1000, "payloads": True}
            mid = client.publish("orders.eu", b"order", headers={"trace": "t-1"})
            [msg] = client.fetch("orders.eu", max=1, wait=WAIT)
            client.ack([msg])
            client.flush()
            life = client.history("orders.eu", mid)
            assert [e["kind"] for e in life["events"]] == ["published", "delivered", "acked"]
            assert life["payload"] == b"order"
            assert client.stats("audit")["history"]["retention"] == 3600.0
            client.declare("orders.eu")  # a client may change them while it runs (history off: forgotten)...
            assert client.stats("orders.eu")["history"] is None
        proc.terminate()
        proc.start()  # ...and the next start declares them as the file says
        with replika.Client(proc.url) as client:
            assert client.stats("orders.eu")["history"]["max_messages"] == 1000
            mid = client.publish("orders.eu", b"again")
            assert client.history("orders.eu", mid)["payload"] == b"again"
    finally:
        proc.stop()


def test_a_queue_the_store_refuses_stops_the_start_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml", "[queues.a]\nhistory = true\n[queues.b]\nmax_attempts = 2\n")
    result = serve(
        "--config", str(path), "--max-queues", "1", "--port", "0", "--no-admin", "--data-dir", "d", cwd=tmp_path
    )
    assert result.returncode == 2
    assert 'queues."b": the store refused to declare it: TOO_MANY_QUEUES' in result.stderr
