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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from replika_server.config import Config
from replika_server.node import Node as Server
from replika_server.store import Store
from tests.engines import ENGINES, LmdbOpener, Opener, StoreSpace
from tests.pg import postgres_server, replicated_postgres  # noqa: F401  (the PostgreSQL engine's tests' fixtures)
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
@contextlib.asynccontextmanager
async def _loop_errors_fail() -> AsyncIterator[None]:
    """Any exception the event loop could not hand to anyone in the block fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    assert not errors, f"unhandled event loop errors: {errors}"


@pytest.fixture(
    params=[pytest.param(name, marks=pytest.mark.postgres) if name == "postgresql" else name for name in ENGINES]
)
def store_space(request: pytest.FixtureRequest) -> Iterator[StoreSpace]:
    """Fresh stores of one engine: every test that uses this (or ``open_store``, ``store``) runs once per entry of
    tests/engines.py's ENGINES, so a new engine inherits the whole store contract suite."""
    with ENGINES[request.param](request) as space:
        yield space


@pytest.fixture
async def open_store(store_space: StoreSpace) -> AsyncIterator[Opener]:
    """Stores at one fresh URL of the engine under test, on a manual clock (``open_store.clock``), closed at
    teardown; any unhandled event-loop exception fails the test."""
    opener = Opener(store_space.new())
    async with _loop_errors_fail():
        try:
            yield opener
        finally:
            await opener.close()


@pytest.fixture
async def store(open_store: Opener) -> Store:
    """An open, empty store of the engine under test, on a manual clock (``store.clock``)."""
    return await open_store()


@pytest.fixture
async def open_lmdb(tmp_path: Path) -> AsyncIterator[LmdbOpener]:
    """LMDB stores at one path, on a manual clock, closed at teardown: for the tests of that engine itself."""
    opener = LmdbOpener(tmp_path / "s")
    async with _loop_errors_fail():
        try:
            yield opener
        finally:
            await opener.close()


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    """An ``--auth`` file with the tokens of tests/tokens.py."""
    path = tmp_path / "auth.toml"
    write(path, AUTH)
    return path
