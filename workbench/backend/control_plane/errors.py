"""Error bodies in the shape the Fireworks SDK parses (wire contract §3.1).

    raise ApiError(404, f"rlorTrainerJob {job_id!r} not found")

becomes HTTP 404 with `{"error": {"code": 5, "message": ..., "status": "NOT_FOUND", "details": []}}`.
Every error carries a body: the SDK treats a bare empty 400 as a proxy rejection and retries it.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.common import error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


async def api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message)


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405 (no such route, wrong method) in the same error shape as every other error."""
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          headers=getattr(exc, "headers", None))


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Name the offending field(s) the way a user wrote them: "deploymentId", "body.trainingConfig".
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return error_response(400, "invalid request: " + "; ".join(parts))


def require(condition: bool, status: int, message: str) -> None:
    if not condition:
        raise ApiError(status, message)
