"""The control plane app: assembles the core, the route modules and the middleware into one FastAPI app.

    app = create_app(home)            # served by `workbench serve` (workbench/cli.py) with uvicorn

It serves the Fireworks REST surface (`/v1/accounts/...`: trainer jobs, training shapes, checkpoints,
promotion, operations, models, deployments) and is the single entry point clients talk to: the
gateway routes (gateway.py) proxy trainer, hot-load and inference traffic to the processes that the
`Supervisor` starts. State lives in SQLite (`Store`); checkpoint files live under `jobs/<job>/`.

This module only assembles: the state and lifecycle rules are in core.py, the routes in jobs.py,
deployments.py, checkpoints.py and gateway.py (which import core.py, never this module).
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from workbench.common import api_key_ok

from ..home import ensure_api_key
from . import checkpoints, deployments, gateway, jobs
from .core import ControlPlane
from .errors import ApiError, api_error_handler, error_response, validation_error_handler
from .gateway import strip_trainer_prefix


def create_app(home: Path, api_key: str | None = None) -> FastAPI:
    api_key = api_key or ensure_api_key(home)
    cp = ControlPlane(home, api_key)
    app = FastAPI(title="workbench control plane", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cp = cp
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.on_event("startup")
    async def _startup() -> None:
        # Long-polls (retrieve_future, SSE) pass through the proxy: no read timeout here.
        app.state.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                           limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        cp.startup()

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        await app.state.http.aclose()
        cp.shutdown()

    app.add_middleware(AuthAndPrefixMiddleware, api_key=api_key, key_file=home / "api_key")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    for module in (jobs, deployments, checkpoints, gateway):
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
