"""Serverless sampling routes: what the SDK (1.2.30+) calls for standalone sampling with no trainer of its own.

    service = FiretitanServiceClient(base_url=f"{url}/training/v1/serverless", api_key=key)
    base = service.create_sampling_client(base_model="accounts/workbench/models/qwen3-tiny")
    tuned = service.create_sampling_client(model_path=workbench.sdk.sampler_model_path(job_id, "step-00020"))

Routes (all under the SDK's serverless base URL `/training/v1/serverless`):

    POST api/v1/client/config, api/v1/create_session, api/v1/session_heartbeat, api/v1/telemetry
                                              the session surface every service client opens (ids `ts-<hex>`)
    POST api/v1/create_sampling_route         {"base_model": M} or {"training_run": "accounts/a/trainingRuns/<run>"}:
                                              starts (or reuses) the deployment that serves it; answers once it is READY
    POST inference/v1/completions             routed by the body's `model`:
        accounts/a/trainingSamplers/<base model>                       the base model's serverless deployment
        accounts/a/trainingSamplers/checkpoints/<a>/<run>/<snapshot>    the run's deployment, holding <snapshot>
        accounts/a/trainingSessions/<ts>/checkpoints/<a>/<run>/<snapshot>   the same (SDK 1.2.28's spelling)
    GET  /v1/accounts/a/trainingRuns/<run>    which trainer job a run id names
    DELETE /v1/accounts/a/trainingSessions/<ts>   close a session (SDK `delete_training_session`)

Training runs are trainer jobs. The SDK only accepts run ids of the form `run-<32 hex>`: a job whose id has
that form is its own run, any other job's run id is `run-<md5(job id)>` (`common.serverless_run_id`). The samples come
from ordinary deployments (the `Supervisor` runs their replicas), named `sl-...` and annotated with the
route they serve, one per base model and one per training run; they are listed and deleted like any
other, and a restarted backend leaves them scaled to zero until a completion needs them again. A run's deployment loads the snapshot a completion names before answering it (base or LoRA
snapshot, then the deltas after it, read from the snapshot manifests), and completions for one
snapshot wait until those in flight on another have finished, so each answer comes from the snapshot
it named. Serverless training (`create_model` on a session) is not served locally: a trainer job is
the local way to train.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from workbench.checkpoints.manifest import read_manifest
from workbench.common import BodyError, parse_json_object
from workbench.common import serverless_run_id as run_id_of
from workbench.models import ModelNotFoundError, local_path

from ..deployment.sources import ROOT_HEADER
from .core import (SERVERLESS_ANNOTATION, AccountPlane, ControlPlane, check_account, job_id_of, plane, read_body_json,
                   rfc3339)
from .deployments import create_deployment_record
from .errors import ApiError, error_response, require
from .gateway import proxy

log = logging.getLogger("workbench.control_plane")
router = APIRouter()

PREFIX = "/training/v1/serverless"
ROUTE_READY_WAIT_S = 45.0
"""How long create_sampling_route (and a completion on an unbound route) waits for the replica: below the
SDK's 60 s REST timeout; a 503 after it makes the SDK retry."""
HOTLOAD_WAIT_S = 600.0
_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MAX_CHAIN = 10_000


# ---- runs ---------------------------------------------------------------------------------------
def job_for_run(cp: ControlPlane, run: str) -> dict:
    """The trainer job named by a run id (or by its own job id); 404 naming the run otherwise."""
    for job in cp.store.list("jobs"):
        job_id = job_id_of(job)
        if run in (job_id, run_id_of(job_id)):
            return job
    raise ApiError(404, f"training run {run!r} not found: a run id is a trainer job's id or its run-<md5> form "
                        "(workbench.sdk.sampler_model_path builds it)")


@router.get("/v1/accounts/{account}/trainingRuns/{run}")
async def get_training_run(request: Request, account: str, run: str, cp: AccountPlane) -> dict:
    job = job_for_run(cp, run)
    job_id = job_id_of(job)
    return {"name": f"accounts/{cp.account}/trainingRuns/{run_id_of(job_id)}", "trainerJob": job["name"],
            "baseModel": job["trainingConfig"]["baseModel"], "state": job["state"]}


# ---- sessions -----------------------------------------------------------------------------------
@router.post(PREFIX + "/api/v1/client/config")
async def client_config(request: Request):
    await request.body()
    # As a trainer answers (trainer/server.py): no JWT exchange, JSON (not proto) request bodies.
    return {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": True, "proto_write_fwdbwd": False,
            "proto_compress_fwdbwd": False, "fwd_via_fwdbwd": False, "use_pyqwest_transport": True}


@router.post(PREFIX + "/api/v1/create_session")
async def create_session(request: Request):
    body = read_body_json(await request.body())
    session_id = f"ts-{secrets.token_hex(8)}"
    sessions = request.app.state.__dict__.setdefault("serverless_sessions", {})
    sessions[session_id] = {"created": time.time(), "sdk_version": body.get("sdk_version")}
    log.info("serverless session %s (sdk %s)", session_id, body.get("sdk_version"))
    return {"type": "create_session", "session_id": session_id}


@router.post(PREFIX + "/api/v1/session_heartbeat")
async def session_heartbeat(request: Request):
    read_body_json(await request.body())
    return {"type": "session_heartbeat"}


@router.post(PREFIX + "/api/v1/telemetry")
async def telemetry(request: Request):
    await request.body()
    return {"status": "accepted"}   # the SDK requires exactly this (else it retries forever)


@router.delete("/v1/accounts/{account}/trainingSessions/{session_id}")
async def delete_training_session(request: Request, account: str, session_id: str, cp: AccountPlane):
    request.app.state.__dict__.get("serverless_sessions", {}).pop(session_id, None)
    return {}


# ---- routes: one deployment per base model and per training run ------------------------------------
def _deployment_id(kind: str, key: str, label: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40].strip("-") or kind
    return f"sl-{slug}-{hashlib.sha1(f'{kind}:{key}'.encode()).hexdigest()[:8]}"


def _ensure_deployment(cp: ControlPlane, kind: str, key: str, base_model: str, job: dict | None,
                       revive: bool = False) -> str:
    """The id of the serverless deployment for (kind, key), created or scaled up as needed; a FAILED one is
    restarted only when `revive` (binding the route again), never by a completion."""
    label = base_model.split("/")[-1] if job is None else job_id_of(job)
    deployment_id = _deployment_id(kind, key, label)
    dep = cp.store.get("deployments", deployment_id)
    if dep is None:
        body = {"baseModel": base_model, "minReplicaCount": 0, "maxReplicaCount": 1,
                "displayName": f"serverless sampler for {kind} {key}",
                "annotations": {SERVERLESS_ANNOTATION: f"{kind}:{key}"}}
        if job is not None:
            body["hotLoadTrainerJob"] = job["name"]
        try:
            create_deployment_record(cp, deployment_id, body)
        except ApiError as e:
            if e.status != 409:    # 409: a concurrent request created it first
                raise
        log.info("serverless %s %s: deployment %s", kind, key, deployment_id)
    elif (dep["state"] == "FAILED" and revive) or not dep.get("maxReplicaCount"):
        cp.store.update("deployments", deployment_id, maxReplicaCount=1, state="CREATING", updateTime=rfc3339())
        cp.reconcile_replicas(deployment_id)
    elif cp.supervisor.get("deployment", deployment_id) is None:
        cp.reconcile_replicas(deployment_id)
    return deployment_id


async def _wait_ready(cp: ControlPlane, deployment_id: str, timeout: float) -> int:
    """The replica's port once the deployment is READY; 503 (the SDK retries it) if it is not yet, or naming
    the failure if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        dep = cp.store.get("deployments", deployment_id)
        require(dep is not None, 503, f"serverless deployment {deployment_id!r} was deleted; retry to recreate it")
        child = cp.supervisor.get("deployment", deployment_id)
        port = child.port() if child else None
        if dep["state"] == "READY" and port is not None:
            return port
        if dep["state"] == "FAILED":    # not transient (a 5xx would be retried): 422 with the replica's reason
            raise ApiError(422, f"serverless deployment {deployment_id!r} failed: "
                                f"{(dep.get('status') or {}).get('message', '')}; create the sampling client "
                                "again to restart it")
        if time.monotonic() > deadline:
            raise ApiError(503, f"serverless deployment {deployment_id!r} is still starting (state {dep['state']}); "
                                "retry")
        await asyncio.sleep(0.1)


def _base_route(cp: ControlPlane, base_model, revive: bool = False) -> str:
    require(isinstance(base_model, str) and bool(base_model), 400,
            f"base_model must name a model, e.g. accounts/{cp.account}/models/qwen3-tiny (got {base_model!r})")
    try:
        local_path(base_model)
    except ModelNotFoundError as e:
        raise ApiError(400, f"base_model: {e}") from e
    return _ensure_deployment(cp, "base_model", base_model, base_model, None, revive)


def _run_route(cp: ControlPlane, run: str, revive: bool = False) -> tuple[str, dict]:
    job = job_for_run(cp, run)
    return _ensure_deployment(cp, "training_run", run_id_of(job_id_of(job)),
                              job["trainingConfig"]["baseModel"], job, revive), job


@router.post(PREFIX + "/api/v1/create_sampling_route")
async def create_sampling_route(request: Request):
    cp = plane(request)
    body = read_body_json(await request.body())
    if "base_model" in body:
        deployment_id = _base_route(cp, body["base_model"], revive=True)
    elif "training_run" in body:
        run = body["training_run"]
        parts = run.split("/") if isinstance(run, str) else []
        require(len(parts) == 4 and parts[0] == "accounts" and parts[2] == "trainingRuns", 400,
                f"training_run must be accounts/{cp.account}/trainingRuns/<run id> (got {run!r})")
        check_account(cp, parts[1])
        deployment_id, _ = _run_route(cp, parts[3], revive=True)
    else:
        raise ApiError(400, "create_sampling_route needs base_model or training_run")
    await _wait_ready(cp, deployment_id, ROUTE_READY_WAIT_S)
    return {"deployment": cp.deployment_name(deployment_id)}


# ---- completions --------------------------------------------------------------------------------
def _parse_model(cp: ControlPlane, model) -> tuple[str, str, str | None]:
    """`model` -> ("base_model", base model, None) or ("training_run", run, snapshot); 400 naming it otherwise."""
    require(isinstance(model, str) and bool(model), 400, f"model must name a serverless sampler (got {model!r})")
    parts = model.split("/")
    require(len(parts) >= 3 and parts[0] == "accounts", 400,
            f"model {model!r} is not a serverless sampler (accounts/<a>/trainingSamplers/...)")
    check_account(cp, parts[1])
    if parts[2] == "trainingSamplers" and len(parts) > 3 and parts[3] != "checkpoints":
        return "base_model", "/".join(parts[3:]), None
    if parts[2] == "trainingSamplers":
        checkpoint = parts[4:]
    elif parts[2] == "trainingSessions" and len(parts) > 4 and parts[4] == "checkpoints":
        checkpoint = parts[5:]
    elif parts[2] == "trainingSessions":
        raise ApiError(400, f"model {model!r} names a session's own model, and workbench serves no serverless "
                            "training: sample a base model with create_sampling_client(base_model=...) (SDK 1.2.30+), "
                            "or a saved snapshot with model_path=<account>/<run id>/<snapshot>")
    else:
        raise ApiError(400, f"model {model!r} is not a serverless sampler (accounts/<a>/trainingSamplers/...)")
    require(len(checkpoint) == 3 and all(checkpoint), 400,
            f"model {model!r}: the checkpoint must be <account>/<run id>/<snapshot>")
    check_account(cp, checkpoint[0])
    require(bool(_SNAPSHOT_NAME.fullmatch(checkpoint[2])), 400,
            f"model {model!r}: {checkpoint[2]!r} is not a snapshot name")
    return "training_run", checkpoint[1], checkpoint[2]


class _Holding:
    """Which snapshot a run's replica holds and how many completions are in flight on it.

    A completion for the held snapshot goes straight through; one for another snapshot takes the lock,
    waits for the completions in flight to finish, loads its snapshot, then goes through."""

    def __init__(self):
        self.lock = asyncio.Lock()
        self.replica = None          # the supervisor child whose weights `held` describes
        self.held: str | None = None
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


def _holding(request: Request, deployment_id: str) -> _Holding:
    table = request.app.state.__dict__.setdefault("serverless_holding", {})
    return table.setdefault(deployment_id, _Holding())


def snapshot_chain(cp: ControlPlane, job_id: str, name: str) -> list[tuple[str, str | None]]:
    """[(identity, previous identity or None)] from the base (or LoRA) snapshot to `name`; 404 if one is missing."""
    samplers = cp.job_layout(job_id).samplers
    chain: list[tuple[str, str | None]] = []
    current: str | None = name
    while current is not None:
        require(len(chain) < MAX_CHAIN and all(current != c for c, _ in chain), 422,
                f"snapshot {name!r} of job {job_id!r} has a cyclic delta chain")
        meta = read_manifest(samplers / current) if _SNAPSHOT_NAME.fullmatch(current) else None
        require(meta is not None and meta.get("kind") == "sampler", 404,
                f"sampler snapshot {current!r} not found in job {job_id!r}"
                + ("" if current == name else f" (snapshot {name!r} is a delta on it)"))
        previous = meta.get("base_identity") if meta.get("snapshot_kind") == "delta" else None
        chain.append((current, previous))
        current = previous
    return chain[::-1]


async def _hotload(cp: ControlPlane, client: httpx.AsyncClient, port: int, deployment_id: str, job_id: str,
                   identity: str, previous: str | None) -> None:
    url = f"http://127.0.0.1:{port}/hot_load/v1/models/hot_load"
    headers = {"X-Api-Key": cp.api_key, "fireworks-deployment": cp.deployment_name(deployment_id),
               ROOT_HEADER: str(cp.job_layout(job_id).samplers)}
    body: dict = {"identity": identity}
    if previous is not None:
        body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": previous}
    r = await client.post(url, json=body, headers=headers, timeout=120)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise ApiError(r.status_code if r.status_code < 500 else 503, f"loading snapshot {identity!r}: {message}")
    deadline = time.monotonic() + HOTLOAD_WAIT_S
    while r.json().get("status") == "accepted":   # still loading in the replica: poll its status
        if time.monotonic() > deadline:
            raise ApiError(503, f"loading snapshot {identity!r} did not finish in {HOTLOAD_WAIT_S:.0f}s; retry")
        await asyncio.sleep(0.2)
        replica = (await client.get(url, headers=headers, timeout=30)).json()["replicas"][0]
        if replica.get("current_snapshot_identity") == identity:
            return
        state = replica.get("loading_state") or {}
        if state.get("stage") == "error" and state.get("target_snapshot_identity") == identity:
            raise ApiError(422, f"loading snapshot {identity!r}: {state.get('message')}")


async def _hold_snapshot(request: Request, cp: ControlPlane, deployment_id: str, port: int, job_id: str,
                         name: str) -> _Holding:
    """Make the run's replica hold snapshot `name` and count one completion in flight on it."""
    holding = _holding(request, deployment_id)
    replica = cp.supervisor.get("deployment", deployment_id)
    async with holding.lock:
        client: httpx.AsyncClient = request.app.state.http
        if holding.replica is not replica:          # new (or restarted) replica: ask what it holds
            status = await client.get(f"http://127.0.0.1:{port}/hot_load/v1/models/hot_load",
                                      headers={"X-Api-Key": cp.api_key}, timeout=30)
            holding.replica, holding.held = replica, status.json()["replicas"][0].get("current_snapshot_identity")
        if holding.held != name:
            chain = snapshot_chain(cp, job_id, name)
            await holding.idle.wait()               # completions on the held snapshot finish on it
            names = [c for c, _ in chain]
            start = names.index(holding.held) + 1 if holding.held in names else 0
            try:
                for identity, previous in chain[start:]:
                    await _hotload(cp, client, port, deployment_id, job_id, identity, previous)
                    holding.held = identity
            except BaseException:
                holding.replica = None              # ask the replica again next time
                raise
        holding.enter()
    return holding


def _release_when_done(response: Response, holding: _Holding) -> Response:
    """Count the completion out of `holding` once its body has been sent (or the client went away)."""
    if not isinstance(response, StreamingResponse):
        holding.leave()
        return response
    body, done = response.body_iterator, False

    async def counted():
        nonlocal done
        try:
            async for chunk in body:
                yield chunk
        finally:
            if not done:
                done = True
                holding.leave()
    response.body_iterator = counted()
    return response


@router.post(PREFIX + "/inference/v1/completions")
@router.post(PREFIX + "/v1/completions")
async def completions(request: Request):
    cp = plane(request)
    try:
        body = parse_json_object(await request.body())
    except BodyError as e:
        return error_response(400, str(e))
    kind, key, snapshot = _parse_model(cp, body.get("model"))
    if kind == "base_model":
        deployment_id, job = _base_route(cp, key), None
    else:
        deployment_id, job = _run_route(cp, key)
    port = await _wait_ready(cp, deployment_id, ROUTE_READY_WAIT_S)
    body["model"] = cp.deployment_name(deployment_id)
    raw = json.dumps(body).encode()
    if job is None:
        return await proxy(request, port, "/inference/v1/completions", body=raw)
    holding = await _hold_snapshot(request, cp, deployment_id, port, job_id_of(job), snapshot)
    try:
        response = await proxy(request, port, "/inference/v1/completions", body=raw)
    except BaseException:
        holding.leave()
        raise
    return _release_when_done(response, holding)


@router.api_route(PREFIX + "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unsupported(request: Request, rest: str) -> JSONResponse:
    return error_response(501 if rest.startswith("api/v1/") else 404,
                          f"{request.method} {PREFIX}/{rest}: workbench serves serverless sampling only "
                          "(sessions, create_sampling_route, completions); train with a trainer job "
                          "(rlorTrainerJobs) instead")
