"""The dashboard's files (``/`` and ``/static/...``) and the API's Swagger UI (``/docs``), all served from the
package: no CDN, so they work on a network without internet access."""

from __future__ import annotations

import importlib.resources

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response
from swagger_ui_bundle import swagger_ui_path

from replika_protocol import ErrorCode
from replika_server.admin.errors import ApiError

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_STATIC = importlib.resources.files("replika_server.admin") / "static"
_DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}


@router.get("/docs")
async def docs() -> Response:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Replika admin API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )


@router.get("/docs-assets/{name}")
async def docs_asset(name: str) -> Response:
    if name not in _DOCS_ASSETS:
        raise ApiError(ErrorCode.NOT_FOUND, f"no asset {name!r}")
    return FileResponse(str(swagger_ui_path / name), media_type=_DOCS_ASSETS[name])


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(str(_STATIC / "index.html"), media_type="text/html")


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    path = _STATIC / name
    if name not in _ASSETS or not path.is_file():
        raise ApiError(ErrorCode.NOT_FOUND, f"no asset {name!r}")
    return FileResponse(str(path), media_type=_ASSETS[name])
