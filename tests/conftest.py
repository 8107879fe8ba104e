"""Shared fixtures: real servers on ephemeral ports, in-process (same loop) or as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from replika_server.config import Config
from replika_server.node import Node as Server
from replika_server.store.lmdb_engine import LmdbConfig, LmdbStore
from tests.tokens import AUTH, write

# Every wait in these tests is bounded by this many seconds; far above what any step needs on a loaded machine.
WAIT = 30.0


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, as the server does in production."""
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class RunningServer:
    server: Server
    data_dir: Path

    @property
    def url(self) -> str:
        return f"replika://127.0.0.1:{self.server.port}"

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.asynccontextmanager
async def serving(data_dir: Path, **config: Any) -> AsyncIterator[RunningServer]:
    """A broker in the running event loop on 127.0.0.1, port 0, storing in ``data_dir``, with ``config`` on top
    of the defaults; any exception the loop could not hand to anyone fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    config.setdefault("admin_port", None)  # the admin sidecar only where a test asks for it (admin_port=0)
    running = RunningServer(await Server.start(Config(host="127.0.0.1", port=0, data_dir=data_dir, **config)), data_dir)
    try:
        yield running
    finally:
        await running.server.stop()
    assert not errors, f"unhandled event loop errors: {errors}"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A broker in this test's event loop on 127.0.0.1, port 0, with its own store."""
    async with serving(tmp_path / "data") as running:
        yield running


async def restart(running: RunningServer, **config: Any) -> RunningServer:
    """Stop ``running`` and start a new broker on the same store."""
    await running.server.stop()
    config.setdefault("admin_port", None)
    running.server = await Server.start(Config(host="127.0.0.1", port=0, data_dir=running.data_dir, **config))
    return running


class ServerProcess:
    """``replika serve`` as a child process, for tests that kill it or use the blocking client."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0
        self.log = data_dir.parent / "server.log"

    @property
    def url(self) -> str:
        return f"replika://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        port_file = self.data_dir.parent / "port"
        admin_port_file = self.data_dir.parent / "admin-port"
        port_file.unlink(missing_ok=True)
        admin_port_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "replika_server", "serve", "--port", "0", "--data-dir", str(self.data_dir)]
        cmd += ["--admin-port", "0", "--admin-port-file", str(admin_port_file)]
        cmd += ["--port-file", str(port_file), "--log-format", "json", *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + WAIT
        while not (port_file.exists() and port_file.read_text()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.01)  # polling a file another process writes: there is nothing to await
        self.port = int(port_file.read_text())
        if admin_port_file.exists():  # written before the port file, unless the sidecar is off
            self.admin_port = int(admin_port_file.read_text())
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(WAIT)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A started ``replika serve`` child process on port 0; killed at teardown."""
    proc = ServerProcess(tmp_path / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


# ----------------------------------------------------------------------------------------------- stores
@dataclass
class Opener:
    """Opens stores on one path; every store it opened is closed at teardown (close is idempotent)."""

    path: Path
    opened: list[LmdbStore] = field(default_factory=list)

    async def __call__(self, **config: Any) -> LmdbStore:
        store = await LmdbStore.open(LmdbConfig(path=self.path, **config))
        self.opened.append(store)
        return store

    async def reopen(self, store: LmdbStore, **config: Any) -> LmdbStore:
        await store.close()
        return await self(**config)


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[Opener]:
    """Stores on one path, closed at teardown; any unhandled event-loop exception fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    opener = Opener(tmp_path / "s")
    try:
        yield opener
    finally:
        for store in opener.opened:
            await store.close()
    assert not errors, f"unhandled event loop errors: {errors}"


@pytest.fixture
async def store(open_store: Opener) -> LmdbStore:
    return await open_store()


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    """An ``--auth`` file with the tokens of tests/tokens.py."""
    path = tmp_path / "auth.toml"
    write(path, AUTH)
    return path
