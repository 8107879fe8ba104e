"""The admin sidecar: an HTTP server in the broker's own process and event loop (dashboard, admin API, GraphQL,
Prometheus metrics), reading the broker's state directly, through one narrow view
(:class:`~replika_server.admin.seam.BrokerView`).

Built on FastAPI (OpenAPI docs at ``/docs`` for free, request validation from type hints, Strawberry's GraphQL
router) served by uvicorn, started here on the broker's running loop rather than through ``uvicorn.run``, which
would want its own loop and signal handlers.

Starting is two steps. :meth:`AdminServer.bind` takes the port at once, so a taken port fails the start and the
port is known (and announced) with the broker's. :meth:`AdminServer.serve` then imports the web stack and serves
the socket. Importing FastAPI, pydantic and Strawberry takes about half a second, which ``replika serve`` does not
make the broker wait for: it serves queues while the import runs in a thread. HTTP clients that connect meanwhile
wait in the socket's backlog.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import uvicorn

    from replika_server.admin.sampler import Sampler
    from replika_server.admin.seam import BrokerView
    from replika_server.config import Config

__all__ = ["AdminServer"]

log = structlog.get_logger("replika.admin")

#: The modules :meth:`AdminServer.serve` needs, imported off the loop thread.
_WEB_STACK = ("uvicorn", "replika_server.admin.app")


class AdminServer:
    def __init__(self, config: Config, sock: socket.socket) -> None:
        self._config = config
        self._sock = sock
        self.sampler: Sampler | None = None  # set once serving
        self._http: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @classmethod
    def bind(cls, config: Config) -> AdminServer:
        """Take the sidecar's address; nothing answers on it until :meth:`serve`."""
        assert config.admin_port is not None
        family = socket.getaddrinfo(config.admin_host, None, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((config.admin_host, config.admin_port), family=family, backlog=128)
        sock.setblocking(False)
        return cls(config, sock)

    async def serve(self, node: BrokerView, *, import_in_thread: bool = False) -> None:
        """Load the web stack and start answering HTTP on the bound socket, for the broker ``node`` (anything
        with the members of :class:`~replika_server.admin.seam.BrokerView`)."""
        if import_in_thread:
            # The import holds the GIL in slices: the loop keeps serving the broker's connections meanwhile.
            await asyncio.to_thread(lambda: [importlib.import_module(name) for name in _WEB_STACK])
        import uvicorn

        from replika_server.admin.app import create_app
        from replika_server.admin.ops import Ops
        from replika_server.admin.sampler import Sampler

        ops = Ops(node)
        sampler = Sampler(ops)
        app = create_app(ops, sampler)
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
        await http.startup(sockets=[self._sock])
        self._http, self.sampler = http, sampler
        self._task = asyncio.get_running_loop().create_task(http.main_loop())
        sampler.start()
        host = self._config.admin_host
        log.info("admin_listening", host=host, port=self.port, url=f"http://{host}:{self.port}/")

    async def stop(self) -> None:
        if self.sampler is not None:
            await self.sampler.stop()  # ends the live feeds, which would otherwise hold the shutdown
        if self._http is not None:
            self._http.should_exit = True
            if self._task is not None:
                await self._task
            await self._http.shutdown(sockets=[self._sock])
        self._sock.close()
