"""Helpers every layer shares, written once: atomic files, the API-key check, time stamps, error codes,
running a coroutine from sync code, resource-id validation, the default training shape and giving freed
memory back to the OS.

    from workbench.common import write_json_atomic, api_key_ok, rfc3339, error_body, run_async

    write_json_atomic(path, {"a": 1}, mode=0o600)   # temp file + fsync + os.replace: old or new, never half
    api_key_ok(request.headers, api_key)            # X-Api-Key or Authorization: Bearer, constant-time
    rfc3339()                                       # "2026-11-30T02:00:00.000000Z"
    error_body(404, "job 'x' not found")            # {"error": {"code": 5, "status": "NOT_FOUND", ...}}
    run_async(lambda: sample_many(...))             # also inside a running Jupyter loop; Ctrl-C cancels
    release_free_memory()                           # an idle process hands its freed heap back to the OS

This module imports nothing from workbench (it is the bottom of the import graph) and nothing heavy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

ACCOUNT_ID = "workbench"
"""The one local account: every resource name is `accounts/workbench/...`."""

# ---- atomic files ------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so a reader (or a crash) sees the old file or the new one, never half.

    The temp file sits beside `path` (same filesystem, so os.replace is atomic), starts with a dot
    (listings skip it) and is fsynced before the rename; `mode` is applied before the file appears.
    On any failure (disk full included) the temp file is removed and the old file stays untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def write_json_atomic(path: str | os.PathLike, data: Any, mode: int | None = None) -> None:
    """`data` as indented JSON (sorted keys, trailing newline), atomically. NaN/Infinity are refused
    (ValueError) before anything is written: they are not JSON and would break every later reader."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", mode)


# ---- API key -------------------------------------------------------------------------------------


def offered_api_keys(headers: Mapping[str, str]) -> list[str]:
    """The credentials a request offers: `X-Api-Key` and/or `Authorization: Bearer` (the SDK sends both)."""
    offered = []
    if headers.get("x-api-key"):
        offered.append(headers["x-api-key"])
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        offered.append(auth[7:].strip())
    return offered


class ApiKeyMiddleware:
    """Pure ASGI middleware: an HTTP request that does not offer `api_key` (see `api_key_ok`) is answered
    by `reject` (an ASGI app, e.g. a 401 JSON response) and never reaches the routes.

        app.add_middleware(ApiKeyMiddleware, api_key=key, reject=JSONResponse(body, status_code=401))

    Pure ASGI rather than `@app.middleware("http")`: that one passes every request and response through
    anyio memory streams and a task group, a fixed cost on each of the many small trainer calls."""

    def __init__(self, app, api_key: str | None, reject):
        self.app = app
        self.api_key = api_key or ""
        self.reject = reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
                       if k.lower() in (b"x-api-key", b"authorization")}
            if not api_key_ok(headers, self.api_key):
                return await self.reject(scope, receive, send)
        return await self.app(scope, receive, send)


def api_key_ok(headers: Mapping[str, str], api_key: str) -> bool:
    """True if either credential carries `api_key` (compared in constant time). An empty `api_key`
    never matches: no workbench server runs unauthenticated."""
    if not api_key:
        return False
    expected = api_key.encode()
    return any(hmac.compare_digest(k.encode(), expected) for k in offered_api_keys(headers))


# ---- time ----------------------------------------------------------------------------------------


def rfc3339(t: float | None = None) -> str:
    """UTC timestamp (now if `t` is None) with fixed microsecond precision, so string order equals time
    order. ValueError if `t` is not a representable time."""
    return datetime.fromtimestamp(time.time() if t is None else t, tz=timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an `rfc3339()` timestamp."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


# ---- error bodies ------------------------------------------------------------------------------

GRPC_STATUS: dict[int, tuple[int, str]] = {
    400: (3, "INVALID_ARGUMENT"),
    401: (16, "UNAUTHENTICATED"),
    403: (7, "PERMISSION_DENIED"),
    404: (5, "NOT_FOUND"),
    405: (12, "UNIMPLEMENTED"),
    409: (6, "ALREADY_EXISTS"),
    412: (9, "FAILED_PRECONDITION"),
    413: (8, "RESOURCE_EXHAUSTED"),
    422: (3, "INVALID_ARGUMENT"),
    425: (14, "UNAVAILABLE"),
    429: (8, "RESOURCE_EXHAUSTED"),
    500: (13, "INTERNAL"),
    502: (14, "UNAVAILABLE"),
    503: (14, "UNAVAILABLE"),
    504: (4, "DEADLINE_EXCEEDED"),
    507: (8, "RESOURCE_EXHAUSTED"),
}
"""HTTP status -> (gRPC code, gRPC status name): the error shape the Fireworks SDK parses (wire contract §3.1)."""


def error_body(status: int, message: str) -> dict:
    """`{"error": {"code", "message", "status", "details"}}` for an HTTP status."""
    code, name = GRPC_STATUS.get(status, (2, "UNKNOWN"))
    return {"error": {"code": code, "message": message, "status": name, "details": []}}


# ---- request bodies ------------------------------------------------------------------------------

MAX_JSON_DEPTH = 32
"""Deepest nesting a request body may have (no wire object nests beyond a handful of levels)."""


class BodyError(ValueError):
    """A request body that is not a JSON object workbench can read; the message says why."""


def _reject_constant(name: str):
    raise BodyError(f"request body is not valid JSON: {name} is not a JSON number")


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """`raw` (UTF-8 JSON) as a dict; BodyError naming the problem for anything else: invalid UTF-8,
    invalid JSON, NaN/Infinity, nesting deeper than `max_depth`, or a top level that is not an object.
    An empty body is `{}`."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"request body is not valid UTF-8 (invalid byte at offset {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BodyError(f"request body nests deeper than {max_depth} levels") from None
    except BodyError:
        raise
    except ValueError as e:
        raise BodyError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BodyError(f"request body must be a JSON object (got a JSON {type(body).__name__})")
    stack = [(body, 1)]
    while stack:  # iterative: a deep body must not exhaust the stack of the code that checks it
        value, depth = stack.pop()
        if depth > max_depth:
            raise BodyError(f"request body nests deeper than {max_depth} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return body


# ---- names ---------------------------------------------------------------------------------------

RESOURCE_ID_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
"""Ids of jobs, deployments and models: a DNS label. Always used with `fullmatch` (a `$` anchor would
accept a trailing newline, and the id becomes a directory name)."""


def is_resource_id(value: Any) -> bool:
    return isinstance(value, str) and RESOURCE_ID_RE.fullmatch(value) is not None


RUN_ID_RE = re.compile(r"run-[0-9a-f]{32}")
"""The only run ids the SDK accepts in a serverless model_path (`<account>/<run id>/<snapshot>`)."""


def serverless_run_id(job_id: str) -> str:
    """A trainer job's serverless training-run id: the job id if it already has the run form, else
    `run-<md5(job id)>` (the control plane maps it back by scanning its jobs)."""
    import hashlib

    return job_id if RUN_ID_RE.fullmatch(job_id) else "run-" + hashlib.md5(job_id.encode()).hexdigest()


# ---- training shapes -----------------------------------------------------------------------------

EMBEDDED_MODEL_PREFIX = f"accounts/{ACCOUNT_ID}/models/"


def default_training_shape(base_model: str, lora_rank: int, role: str = "policy") -> str | None:
    """The local training shape of an embedded workbench model, or None (manual path) for any other model.

    `role="reference"` names the forward-only reference shape (`<model>-ref-cpu`) for full-parameter
    runs; a LoRA run's reference uses the LoRA shape, as the SDK prefers."""
    if not base_model.startswith(EMBEDDED_MODEL_PREFIX):
        return None
    short = base_model[len(EMBEDDED_MODEL_PREFIX):]
    if lora_rank and lora_rank > 0:
        suffix = "-lora"
    elif role == "reference":
        suffix = "-ref"
    else:
        suffix = ""
    return f"accounts/{ACCOUNT_ID}/trainingShapes/{short}{suffix}-cpu"


# ---- async from sync -----------------------------------------------------------------------------


def run_async(make_coro: Callable[[], Any]) -> Any:
    """Run the coroutine `make_coro()` to completion from sync code and return its result.

    Works inside a Jupyter kernel too (whose loop is already running, so asyncio.run would refuse): the
    coroutine runs on a private event loop in a helper thread. Ctrl-C (KeyboardInterrupt) in the caller
    cancels the coroutine, waits briefly for it to unwind, and re-raises.
    """
    box: dict[str, Any] = {}
    loop = asyncio.new_event_loop()

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["task"] = loop.create_task(make_coro())
            box["value"] = loop.run_until_complete(box["task"])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    t = threading.Thread(target=target, name="workbench-run-async", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.1)
    except KeyboardInterrupt:
        task = box.get("task")
        if task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop closed in between: nothing left to cancel
        t.join(5)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


class LazyModule:
    """A module imported on first attribute access: `torch = LazyModule("torch")`.

    The control plane imports the checkpoint modules for detection and manifests; importing torch (and numpy)
    there only when a function needs tensors keeps it ~200 MiB smaller and seconds faster to start. The real
    module is fetched through `importlib` (nothing is put in `sys.modules` that is not the real module) and each
    attribute is cached on this object, so later accesses cost a plain attribute lookup.
    """

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        import importlib

        value = getattr(importlib.import_module(self.__dict__["_name"]), attr)
        self.__dict__[attr] = value
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_name']!r}>"


# ---- process memory ------------------------------------------------------------------------------
IDLE_RELEASE_S = 1.0
"""How long a trainer's queue or a replica's engine stays idle after work before it calls
release_free_memory (once per idle spell). Long enough that a client calling step after step (an RL
loop sampling, then training) never pays for it."""

_malloc_trim: Callable[[int], int] | None | bool = False   # False: not looked up yet; None: no glibc


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where there is none.

    Why: torch allocates a step's activations (a batch's logits, a KV cache) with malloc, and glibc keeps
    what is freed in its heap instead of returning it, so a process that ran one big step holds its peak
    RSS for good (a trainer on the embedded model: 231 MiB built, ~410 MiB after two 16x128 steps, 255 MiB
    after this). Call it when the process goes idle, not per step: the next step faults every page back
    in, which cost 15-50% of a step's CPU on this machine when done after each one.
    """
    global _malloc_trim
    if _malloc_trim is False:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to trim this way
            _malloc_trim = None
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
