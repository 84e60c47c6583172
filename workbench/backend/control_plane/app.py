"""The control plane app: assembles the core, the route modules and the middleware into one FastAPI app.

    app = create_app(home)            # served by `workbench serve` (workbench/cli.py) with uvicorn

It serves the Fireworks REST surface (`/v1/accounts/...`: trainer jobs, training shapes, checkpoints,
promotion, operations, models, deployments) and is the single entry point clients talk to: the
gateway (gateway.py: `TrainerGateway` in front of the routes for trainer calls, routes for hot-load and
inference) proxies traffic to the processes that the `Supervisor` starts, and the serverless routes (serverless.py) serve the SDK's standalone sampling.
State lives in SQLite (`Store`); checkpoint files live under `jobs/<job>/`.

This module only assembles: the state and lifecycle rules are in core.py, the routes in jobs.py,
deployments.py, checkpoints.py, serverless.py and gateway.py (which import core.py, never this module).
"""

from __future__ import annotations

from pathlib import Path

import errno
import logging
import sqlite3

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.checkpoints.layout import HomeLayout
from workbench.common import api_key_ok

from ..home import ensure_api_key
from . import checkpoints, deployments, gateway, jobs, serverless
from .core import ControlPlane
from .errors import ApiError, api_error_handler, error_response, http_exception_handler, validation_error_handler
from .gateway import TrainerGateway, strip_trainer_prefix
from .relay import UpstreamPool


def create_app(home: Path, api_key: str | None = None) -> FastAPI:
    api_key = api_key or ensure_api_key(home)
    cp = ControlPlane(home, api_key)
    app = FastAPI(title="workbench control plane", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cp = cp
    app.state.upstream = UpstreamPool()   # the trainer calls' keep-alive connections (TrainerGateway)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)

    @app.on_event("startup")
    async def _startup() -> None:
        # Long-polls (retrieve_future, SSE) pass through the proxy: no read timeout here.
        app.state.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                           limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        cp.startup()

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        await app.state.http.aclose()
        await app.state.upstream.close()
        cp.shutdown()

    # Added last = outermost: the boundary also covers the auth middleware, and the key is checked before
    # the trainer gateway sees a request.
    app.add_middleware(TrainerGateway, cp=cp, pool=app.state.upstream)
    app.add_middleware(AuthAndPrefixMiddleware, api_key=api_key, key_file=HomeLayout(home).api_key_file)
    app.add_middleware(ErrorBoundaryMiddleware)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    for module in (jobs, deployments, checkpoints, serverless, gateway):
        app.include_router(module.router)
    return app


class AuthAndPrefixMiddleware:
    """Pure ASGI middleware (no buffering, so SSE and long-polls stream through untouched).

    1. Every request must carry the key, as `X-Api-Key` or `Authorization: Bearer` (the SDK uses both).
    2. R1.2: a client built on a trainer endpoint reaches control-plane and inference paths under the
       trainer prefix; anything there that is not the Tinker surface (`/api/...`) is served un-prefixed.
    """

    def __init__(self, app, api_key: str, key_file: Path):
        self.app = app
        self.api_key = api_key
        self.key_file = key_file

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not api_key_ok(headers, self.api_key):
            response = error_response(401, "missing or wrong API key: send it as X-Api-Key or Authorization: "
                                           f"Bearer (a local backend keeps it in {self.key_file})")
            return await response(scope, receive, send)
        rewritten = strip_trainer_prefix(scope["path"])
        if rewritten is not None:
            scope = dict(scope, path=rewritten, raw_path=rewritten.encode())
        return await self.app(scope, receive, send)


log = logging.getLogger("workbench.control_plane")


def failure_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for an exception no route turned into an ApiError: a full disk is 507 (the
    client can free space and retry), a busy or unavailable database 503, anything else 500."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, f"the workbench home's disk is full ({exc.strerror}); free space and retry"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "full" in text:
            return 507, f"the workbench state database cannot grow: {text}; free disk space and retry"
        return 503, f"the workbench state database is unavailable ({text}); retry"
    if isinstance(exc, sqlite3.Error):
        return 503, f"the workbench state database failed ({type(exc).__name__}: {exc}); retry"
    return 500, f"internal error ({type(exc).__name__}: {exc}); see the control-plane log"


class ErrorBoundaryMiddleware:
    """Pure ASGI: an exception escaping a route before its response started becomes a JSON error body
    (never a text 500 that drops the keep-alive connection); `failure_status` picks the status. Errors
    inside a streaming (proxied) response that already started cannot be answered and are re-raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            status, message = failure_status(exc)
            log.exception("%s %s failed with %d", scope.get("method"), scope.get("path"), status)
            await error_response(status, message)(scope, receive, send)
