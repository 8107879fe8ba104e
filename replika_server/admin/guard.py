"""The checks every admin request passes before any route sees it: the Host (DNS rebinding), the token, the
body's declared size and the Origin (CORS)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from replika_protocol import ErrorCode
from replika_server.admin.deps import GUARDED, authenticate
from replika_server.admin.errors import ApiError
from replika_server.config import Config, is_loopback

__all__ = ["Guard"]

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


class Guard:
    """An HTTP middleware (``app.middleware("http")(Guard(config))``) refusing, before routing:

    - on a loopback sidecar, a Host that is not a loopback name (a DNS-rebinding page in the user's browser);
    - on guarded paths, a missing or unknown token, before anything reads the body (a route's body model is
      parsed before its dependencies run);
    - a POST, PUT or PATCH body that is chunked or declares more than ``--max-frame`` bytes: bodies are read
      whole, so they are bounded by their header, up front;
    - a browser request from another origin than the sidecar's own, unless listed with ``--admin-cors-origin``.
    """

    def __init__(self, config: Config) -> None:
        self._loopback_only = is_loopback(config.admin_host)
        self._origins = frozenset(config.admin_cors_origins)
        self._max_body = config.max_frame

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            self._check_host(request)
            if request.url.path.startswith(GUARDED):
                request.state.principal = authenticate(request)
            if request.method in ("POST", "PUT", "PATCH"):
                self._check_body(request)
            self._check_origin(request)
        except ApiError as exc:
            return exc.response()
        return await call_next(request)

    def _check_host(self, request: Request) -> None:
        host = _hostname(request.headers.get("host", ""))
        if self._loopback_only and host not in _LOOPBACK_HOSTS:
            raise ApiError(ErrorCode.FORBIDDEN, f"host {host!r} is not this loopback-only admin sidecar")

    def _check_body(self, request: Request) -> None:
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise ApiError(ErrorCode.BAD_REQUEST, "send a Content-Length (chunked bodies are refused)")
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self._max_body:
            message = f"request bodies are limited to {self._max_body} bytes (--max-frame)"
            raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, message)

    def _check_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is None or origin in self._origins:
            return
        if origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            message = f"cross-origin request from {origin} refused; allow it with --admin-cors-origin"
            raise ApiError(ErrorCode.FORBIDDEN, message)


def _hostname(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8333" -> "[::1]")."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]
