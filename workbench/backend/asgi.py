"""The trainer's and the replica's ASGI app: Starlette with FastAPI-style route decorators.

    app = RouteApp(lifespan=lifespan)
    app.add_middleware(ApiKeyMiddleware, api_key=key, reject=...)
    app.add_exception_handler(BadRequest, handler)

    @app.post("/api/v1/op")
    async def op(request: Request):
        return {"ok": True}         # a Response, or JSON content (answered as a JSONResponse)

Those servers use nothing else of FastAPI (no models, no dependency injection, no OpenAPI: every route
reads its own body), and importing fastapi was ~0.57 of the ~3.9 CPU seconds from a trainer's spawn to
RUNNING, and ~0.6 of a replica's start (it builds pydantic models for OpenAPI at import).
"""

from __future__ import annotations

import functools

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response


class RouteApp(Starlette):
    """Starlette plus `get`/`post` decorators; an endpoint returning anything but a Response has it sent as
    JSON (Starlette's JSONResponse: compact, UTF-8, NaN refused, as FastAPI's default)."""

    def get(self, path: str):
        return self._route(path, "GET")

    def post(self, path: str):
        return self._route(path, "POST")

    def _route(self, path: str, method: str):
        def add(endpoint):
            @functools.wraps(endpoint)
            async def answer(request):
                out = await endpoint(request)
                return out if isinstance(out, Response) else JSONResponse(out)
            self.add_route(path, answer, methods=[method])
            return endpoint
        return add
