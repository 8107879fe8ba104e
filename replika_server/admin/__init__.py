"""The admin sidecar: an HTTP server in the broker's own process and event loop (dashboard, admin API, GraphQL,
Prometheus metrics), reading the broker's state directly.

Built on FastAPI (OpenAPI docs at ``/docs`` for free, request validation from type hints, Strawberry's GraphQL
router) served by uvicorn, started here on the broker's running loop rather than through ``uvicorn.run``, which
would want its own loop and signal handlers.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import structlog
import uvicorn

from replika_server.admin.app import create_app
from replika_server.admin.ops import Ops
from replika_server.admin.sampler import Sampler

if TYPE_CHECKING:
    from replika_server.server import Server

__all__ = ["AdminServer"]

log = structlog.get_logger("replika.admin")


class AdminServer:
    def __init__(self, sampler: Sampler, http: uvicorn.Server, sock: socket.socket) -> None:
        self.sampler = sampler
        self._http = http
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @classmethod
    async def start(cls, server: Server) -> AdminServer:
        config = server.config
        assert config.admin_port is not None
        family = socket.getaddrinfo(config.admin_host, None, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((config.admin_host, config.admin_port), family=family, backlog=128)
        sock.setblocking(False)
        ops = Ops(server)
        sampler = Sampler(ops)
        app = create_app(server, ops, sampler)
        http = uvicorn.Server(
            uvicorn.Config(
                app,
                loop="none",
                http="h11",
                ws="none",
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                limit_concurrency=512,  # beyond, 503: a flood of HTTP clients cannot take the broker's memory
                timeout_keep_alive=5,
                timeout_graceful_shutdown=2,
                h11_max_incomplete_event_size=64 * 1024,
            )
        )
        http.config.load()
        http.lifespan = http.config.lifespan_class(http.config)
        try:
            await http.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        admin = cls(sampler, http, sock)
        admin._task = asyncio.get_running_loop().create_task(http.main_loop())
        sampler.start()
        log.info(
            "admin_listening", host=config.admin_host, port=admin.port, url=f"http://{config.admin_host}:{admin.port}/"
        )
        return admin

    async def stop(self) -> None:
        await self.sampler.stop()  # ends the live feeds, which would otherwise hold the shutdown
        self._http.should_exit = True
        if self._task is not None:
            await self._task
        await self._http.shutdown(sockets=[self._sock])
        self._sock.close()
