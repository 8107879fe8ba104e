"""Both clients (and the CLI, which uses the blocking one) connecting to something that is not the broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import replika
from tests.conftest import WAIT, ServerProcess, serving
from tests.test_cli import cli


def check_names_the_admin_port(error: replika.NotABroker, port: int) -> None:
    text = str(error)
    assert error.code == "NOT_A_BROKER"
    assert f"127.0.0.1:{port} answered in HTTP" in text
    assert "admin sidecar" in text and "8777" in text
    assert "1213486160" not in text  # "HTTP" read as a frame length, what this used to say


async def test_both_clients_pointed_at_the_admin_port_say_so(tmp_path: Path) -> None:
    async with serving(tmp_path / "data", admin_port=0) as running:
        port = running.server.admin_port
        assert port is not None
        url = f"replika://127.0.0.1:{port}"
        client = replika.AsyncClient(url, connect_timeout=WAIT)
        with pytest.raises(replika.NotABroker) as info:
            await client.connect()
        check_names_the_admin_port(info.value, port)
        assert not client.connected
        with pytest.raises(replika.NotABroker):  # a call connects first, and fails the same way
            await client.publish("q", b"x")

        def blocking() -> replika.NotABroker:
            with pytest.raises(replika.NotABroker) as info:
                replika.Client(url, connect_timeout=WAIT).connect()
            return info.value

        check_names_the_admin_port(await asyncio.to_thread(blocking), port)
        async with replika.AsyncClient(running.url) as good:  # the broker itself is unaffected
            await good.ping()


def test_the_cli_pointed_at_the_admin_port_says_so(server_process: ServerProcess) -> None:
    result = cli("stats", "q", url=f"replika://127.0.0.1:{server_process.admin_port}")
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"replika: NOT_A_BROKER: 127.0.0.1:{server_process.admin_port} answered")
