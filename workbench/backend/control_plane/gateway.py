"""The gateway: routes trainer, hot-load and inference traffic to the process that serves it.

    /training/v1/rlorTrainerJobs/{account}/{job}/api/v1/*   -> that job's trainer process   (§1, R1.1)
    /hot_load/v1/models/hot_load                             -> the replica named by the `fireworks-deployment` header (§5)
    /inference/v1/completions, /v1/completions               -> the replica named by the body's `model` (§6)

Trainer calls (two per SDK operation: the POST, then `retrieve_future`) are answered by `TrainerGateway`,
a pure ASGI layer in front of FastAPI that checks the job and relays itself; hot-load and inference go
through FastAPI routes and `proxy`. Both use pooled keep-alive connections (relay.py). Requests and responses
pass through unchanged: an answer of known length up to BUFFER_LIMIT is relayed whole, anything else
(SSE, chunked, large) is streamed back as it arrives. A
target that is not running answers 503 with a JSON body: the SDK retries 503 on every surface, which
is exactly what a client should do while a trainer resumes or a crashed replica restarts.
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from workbench.common import BodyError, parse_json_object

from .core import JOB_STOPPED_STATES, ControlPlane, desired_replicas, plane
from .errors import error_response
from .relay import UpstreamPool

router = APIRouter()

_TRAINER_PREFIX = re.compile(r"^/training/v1/rlorTrainerJobs/[^/]+/[^/]+(/.*)$")
BUFFER_LIMIT = 4 << 20   # proxied answers of a known length up to this size are relayed whole, not streamed


def strip_trainer_prefix(path: str) -> str | None:
    """R1.2: `/training/v1/rlorTrainerJobs/{a}/{j}/v1/...` -> `/v1/...` (the Tinker `/api/` paths stay)."""
    m = _TRAINER_PREFIX.match(path)
    if m and not m.group(1).startswith("/api/"):
        return m.group(1)
    return None


async def proxy(request: Request, port: int, path: str, body: bytes | None = None,
                extra_headers: dict | None = None) -> Response:
    """`request` relayed to the process on `port` at `path` (over the app's `UpstreamPool`); the answer is
    read whole when it is complete on arrival (returned as a plain Response, so a caller knows the upstream
    is done with it), else streamed."""
    pool: UpstreamPool = request.app.state.upstream
    headers = list(request.scope["headers"])
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra_headers or {}).items()]
    target = path.encode() + (b"?" + request.scope["query_string"] if request.scope.get("query_string") else b"")
    answer = await pool.request(port, request.method.encode(), target, headers,
                                body if body is not None else await request.body())
    if answer is None:
        return error_response(503, f"upstream process on port {port} is unavailable; retry")
    try:
        data = await answer.read_some()
        while not answer.complete and _known_small(answer):
            data += await answer.read_some()
    except BaseException:
        answer.close()
        raise
    if answer.complete:
        answer.close()
        return Response(data, status_code=answer.status, headers=_header_dict(answer.headers))

    async def rest():
        yield data
        async for chunk in answer.chunks():
            yield chunk

    return StreamingResponse(rest(), status_code=answer.status, headers=_header_dict(answer.headers),
                             background=BackgroundTask(answer.close))


def _known_small(answer) -> bool:
    """A body of known length up to BUFFER_LIMIT: read whole (one message, no chunked re-framing)."""
    length = dict(answer.headers).get(b"content-length", b"")
    return length.isdigit() and int(length) <= BUFFER_LIMIT


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


# ---- trainer ----------------------------------------------------------------------------------
_TRAINER_API = re.compile(rb"^/training/v1/rlorTrainerJobs/([^/]+)/([^/]+)(/api/v1/[^?]*)$")


class TrainerGateway:
    """Pure ASGI, in front of the FastAPI app: `/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/*` is
    answered here and relayed to the job's trainer (relay.py); every other request goes on to `app`.

        app.add_middleware(TrainerGateway, cp=cp, pool=UpstreamPool())   # inside the API-key middleware

    Every SDK training call is two of these requests (the operation, then `retrieve_future`), so they skip
    FastAPI's routing and Request objects.
    The checks are the ones any control-plane route makes: the key (the middleware outside this one),
    the account and the job (404), the job's state (`_not_serving`: 412/503 naming state and reason).
    """

    def __init__(self, app, cp: ControlPlane, pool: UpstreamPool):
        self.app = app
        self.cp = cp
        self.pool = pool

    async def __call__(self, scope, receive, send):
        m = _TRAINER_API.match(scope.get("raw_path") or scope["path"].encode()) if scope["type"] == "http" else None
        if m is None:
            return await self.app(scope, receive, send)
        account, job_id = unquote(m.group(1).decode("latin-1")), unquote(m.group(2).decode("latin-1"))
        rest = unquote(m.group(3).decode("latin-1"))[len("/api/v1/"):]
        if scope["method"] not in ("GET", "POST"):
            return await error_response(405, f"method {scope['method']} not allowed on the trainer API "
                                             "(GET or POST)")(scope, receive, send)
        port = await trainer_port(self.cp, account, job_id, rest)
        if not isinstance(port, int):
            return await port(scope, receive, send)
        parts = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        target = m.group(3) + (b"?" + scope["query_string"] if scope.get("query_string") else b"")
        if not await self.pool.relay(port, scope["method"].encode(), target, scope["headers"], body, send):
            await error_response(503, f"upstream process on port {port} is unavailable; retry")(scope, receive, send)


async def trainer_port(cp: ControlPlane, account: str, job_id: str, rest: str) -> int | JSONResponse:
    """The port of the trainer serving `account/job_id`, or the error answer (404, 412, 503) for `rest`."""
    job = cp.store.get("jobs", job_id)
    if job is None or account != cp.account or job["state"] == "JOB_STATE_DELETED":
        return error_response(404, f"rlorTrainerJob {account}/{job_id} not found")
    cp.last_activity[job_id] = time.time()
    child = cp.supervisor.get("trainer", job_id)
    port = child.port() if child else None
    if port is None and job["state"] == "JOB_STATE_RUNNING":
        # The trainer just exited and its exit is not recorded yet: wait for the job's state (and reason).
        deadline = time.monotonic() + EXIT_SETTLE_S
        while job["state"] == "JOB_STATE_RUNNING" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            job = cp.store.get("jobs", job_id) or job
            child = cp.supervisor.get("trainer", job_id)
            port = child.port() if child else None
            if port is not None:
                break
    if port is None or job["state"] != "JOB_STATE_RUNNING":
        return _not_serving(job_id, job, rest)
    return port


EXIT_SETTLE_S = 10.0
"""How long a trainer request waits for a just-exited trainer's job state, so its answer carries the reason."""


def _not_serving(job_id: str, job: dict, rest: str) -> JSONResponse:
    """The answer for a job whose trainer is not serving. The SDK retries 503 (on submissions for 5 minutes,
    on `retrieve_future` for ever), which is right only while the trainer is starting: a future issued by a
    trainer process that stopped can never complete (a new process does not know it), and a job that is
    stopped (FAILED, PAUSED, ...) serves nothing until someone resumes it. Those answer 412, which the SDK
    raises at once with this message, so a call in flight fails instead of hanging. The health probe
    (`healthz`) answers 503 whatever the state: it says "not serving", never raises."""
    state = job["state"]
    reason = (job.get("status") or {}).get("message") or ""
    detail = f"state {state}" + (f": {reason}" if reason else "")
    if rest == "retrieve_future":
        return error_response(412, f"this request to job {job_id!r} is lost: its trainer stopped ({detail}). "
                                   "Resume the job (reconnect_and_wait) and repeat the call")
    if state in JOB_STOPPED_STATES and rest != "healthz":
        return error_response(412, f"trainer for job {job_id!r} is not serving ({detail}); resume the job "
                                   "(reconnect_and_wait) to continue from its last saved state")
    return error_response(503, f"trainer for job {job_id!r} is not serving ({detail}); wait for it, or resume the job")


# ---- hot load ---------------------------------------------------------------------------------
def _deployment_from_header(cp: ControlPlane, request: Request) -> tuple[str | None, JSONResponse | None]:
    name = request.headers.get("fireworks-deployment", "")
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments":
        return None, error_response(400, "header fireworks-deployment must name a deployment "
                                         f"(accounts/{cp.account}/deployments/<id>), got {name!r}")
    if cp.store.get("deployments", parts[3]) is None:
        return None, error_response(404, f"deployment {name!r} not found")
    return parts[3], None


@router.api_route("/hot_load/v1/models/hot_load", methods=["GET", "POST"])
async def hot_load(request: Request):
    cp = plane(request)
    deployment_id, error = _deployment_from_header(cp, request)
    if error:
        return error
    dep = cp.store.get("deployments", deployment_id)
    if desired_replicas(dep) == 0 and request.method == "GET":
        return JSONResponse({"replicas": []})  # scaled to zero: nothing loaded, nothing pending
    child = cp.supervisor.get("deployment", deployment_id)
    port = child.port() if child else None
    if port is None:
        return error_response(503, f"deployment {deployment_id!r} has no ready replica (state {dep['state']}); retry")
    extra = {}
    trainer = dep.get("hotLoadTrainerJob")
    if trainer:
        extra["x-workbench-snapshot-root"] = str(cp.job_layout(trainer.split("/")[-1]).samplers)
    elif request.method == "POST":
        return error_response(400, f"deployment {deployment_id!r} has no hotLoadTrainerJob: link it to a trainer "
                                   "(create with hot_load_trainer_job, or reattach_trainer) before hot-loading")
    return await proxy(request, port, "/hot_load/v1/models/hot_load", extra_headers=extra)


# ---- inference --------------------------------------------------------------------------------
@router.post("/inference/v1/completions")
@router.post("/v1/completions")
async def completions(request: Request):
    cp = plane(request)
    raw = await request.body()
    try:
        model = parse_json_object(raw).get("model")
    except BodyError as e:
        return error_response(400, str(e))
    if not isinstance(model, str) or not model:
        return error_response(400, f"model must name a deployment (accounts/{cp.account}/deployments/<id>), "
                                   f"got {model!r}")
    parts = model.split("#")[0].split("/")
    if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments":
        return error_response(400, f"model must name a deployment (accounts/{cp.account}/deployments/<id>), "
                                   f"got {model!r}")
    dep = cp.store.get("deployments", parts[3])
    if dep is None:
        return error_response(404, f"deployment {model!r} not found")
    child = cp.supervisor.get("deployment", parts[3])
    port = child.port() if child else None
    if port is None:
        if desired_replicas(dep) == 0:
            return error_response(503, f"deployment {model!r} is scaled to zero; scale it up to sample")
        return error_response(503, f"deployment {model!r} has no ready replica yet (state {dep['state']}); retry")
    return await proxy(request, port, request.url.path if request.url.path.startswith("/inference")
                       else "/v1/completions", body=raw)
