"""REST routes for accounts, training shapes and RLOR trainer jobs (wire contract §2.3, §4.1, §4.2).

    POST   /v1/accounts/{a}/rlorTrainerJobs?rlorTrainerJobId=ID[&trainingShape=...]   create (409 if ID exists)
    GET    /v1/accounts/{a}/rlorTrainerJobs[/{id}]                                     list / get
    DELETE /v1/accounts/{a}/rlorTrainerJobs/{id}                                       stop, keep the row (DELETED)
    POST   /v1/accounts/{a}/rlorTrainerJobs/{id}:resume                                restart a stopped trainer

A GET of a job that is still CREATING waits (up to ~20 s) for it to settle, so the SDK's
`wait_for_ready`, which polls every 5 s, usually returns on its first poll.
"""

from __future__ import annotations

import re
import secrets

from fastapi import APIRouter, Request

from workbench.common import is_resource_id
from workbench.models import ModelNotFoundError, local_path

from .core import JOB_STOPPED_STATES, ControlPlane, check_account, read_body_json, rfc3339, settled
from .errors import ApiError, require
from .shapes import SHAPES, shape_for_ref, shape_version

router = APIRouter()


def _cp(request: Request) -> ControlPlane:
    return request.app.state.cp


@router.get("/v1/accounts")
async def list_accounts(request: Request) -> dict:
    cp = _cp(request)
    return {"accounts": [{"name": f"accounts/{cp.account}", "displayName": "workbench (local)"}], "totalSize": 1}


@router.get("/v1/accounts/{account}")
async def get_account(request: Request, account: str) -> dict:
    cp = _cp(request)
    check_account(cp, account)
    return {"name": f"accounts/{cp.account}", "displayName": "workbench (local)"}


# ---- training shapes --------------------------------------------------------------------------
@router.get("/v1/accounts/{account}/trainingShapes")
async def list_shapes(account: str) -> dict:
    shapes = [{"name": f"accounts/{account}/trainingShapes/{s}"} for s in SHAPES]
    return {"trainingShapes": shapes, "totalSize": len(shapes)}


@router.get("/v1/accounts/{account}/trainingShapes/{shape}/versions")
async def list_shape_versions(account: str, shape: str) -> dict:
    version = shape_version(shape, account)
    require(version is not None, 404, f"trainingShape {shape!r} not found; local shapes: {sorted(SHAPES)}")
    return {"trainingShapeVersions": [version], "totalSize": 1}


@router.get("/v1/accounts/{account}/trainingShapes/{shape}/versions/{version_id}")
async def get_shape_version(account: str, shape: str, version_id: str) -> dict:
    version = shape_version(shape, account)
    require(version is not None, 404, f"trainingShape {shape!r} not found; local shapes: {sorted(SHAPES)}")
    version["name"] = f"accounts/{account}/trainingShapes/{shape}/versions/{version_id}"
    return version


# ---- trainer jobs -----------------------------------------------------------------------------
@router.post("/v1/accounts/{account}/rlorTrainerJobs")
async def create_job(request: Request, account: str) -> dict:
    cp = _cp(request)
    check_account(cp, account)
    body = read_body_json(await request.body())
    q = request.query_params
    job_id = q.get("rlorTrainerJobId") or f"training-api-service-{secrets.token_hex(4)}"
    require(is_resource_id(job_id), 400,
            f"rlorTrainerJobId {job_id!r} is invalid: use 1-63 lowercase letters, digits and hyphens")
    config = dict(body.get("trainingConfig") or {})
    require(isinstance(body.get("trainingConfig", {}), dict), 400, "trainingConfig must be an object")

    shape_ref = q.get("trainingShape") or body.get("trainingShape")
    shape_context = None
    # Trainer ranks: nodeCount x acceleratorCount (the SDK's manual path; a shape pins both).
    nodes, ranks_per_node = body.get("nodeCount", 1), config.get("acceleratorCount") or 1
    if shape_ref:
        found = shape_for_ref(shape_ref)
        require(found is not None, 400, f"trainingShape {shape_ref!r} not found; local shapes: "
                                        f"{[f'accounts/{cp.account}/trainingShapes/{s}' for s in SHAPES]}")
        snapshot = found[1]["snapshot"]
        config.setdefault("baseModel", snapshot["baseModel"])
        shape_context = snapshot["maxSupportedContextLength"]
        nodes, ranks_per_node = snapshot["nodeCount"], snapshot["acceleratorCount"] or 1
        if snapshot["trainerMode"] == "LORA_TRAINER" and not config.get("loraRank"):
            raise ApiError(400, f"trainingShape {shape_ref!r} is a LoRA shape: trainingConfig.loraRank must be > 0")

    base_model = config.get("baseModel")
    require(isinstance(base_model, str) and bool(base_model), 400, "trainingConfig.baseModel is required")
    try:
        local_path(base_model)
    except ModelNotFoundError as e:
        raise ApiError(400, f"trainingConfig.baseModel: {e}") from e
    lora_rank = config.get("loraRank", 0) or 0
    require(isinstance(lora_rank, int) and lora_rank >= 0, 400,
            f"trainingConfig.loraRank must be a non-negative integer (got {lora_rank!r})")
    lr = config.get("learningRate")
    require(lr is None or (isinstance(lr, (int, float)) and lr >= 0), 400,
            f"trainingConfig.learningRate must be a non-negative number (got {lr!r})")
    max_context = config.get("maxContextLength") or shape_context or 2048
    require(isinstance(max_context, int) and max_context > 0, 400,
            f"trainingConfig.maxContextLength must be a positive integer (got {max_context!r})")
    for field, value in (("nodeCount", nodes), ("trainingConfig.acceleratorCount", ranks_per_node)):
        require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64, 400,
                f"{field} must be an integer in 1..64 (got {value!r})")
    config.update(baseModel=base_model, loraRank=lora_rank, maxContextLength=max_context)
    if ranks_per_node > 1:
        config["acceleratorCount"] = ranks_per_node

    now = rfc3339()
    job = {
        "name": cp.job_name(job_id),
        "displayName": body.get("displayName") or job_id,
        "createTime": now,
        "updateTime": now,
        "state": "JOB_STATE_CREATING",
        "status": {"code": "OK", "message": "queued"},
        "serviceMode": bool(body.get("serviceMode", True)),
        "keepAlive": bool(body.get("keepAlive", False)),
        "dataset": body.get("dataset", ""),
        "trainingConfig": config,
        "nodeCount": nodes,
    }
    if shape_ref:
        job["trainingShape"] = shape_ref
    if body.get("hotLoadDeploymentId"):
        job["hotLoadDeploymentId"] = body["hotLoadDeploymentId"]
    if body.get("inactivityTimeout") is not None:
        timeout = body["inactivityTimeout"]
        require(isinstance(timeout, str) and bool(re.fullmatch(r"\d+(\.\d+)?s", timeout)), 400,
                f"inactivityTimeout must be a duration like '1800s' (got {timeout!r})")
        job["inactivityTimeout"] = timeout
    if body.get("disableInactivityCleanup"):
        job["disableInactivityCleanup"] = True
    if not cp.store.insert("jobs", job_id, job):
        raise ApiError(409, f"rlorTrainerJob {job_id!r} already exists")
    cp.start_trainer(job_id)
    return cp.store.get("jobs", job_id)


@router.get("/v1/accounts/{account}/rlorTrainerJobs")
async def list_jobs(request: Request, account: str) -> dict:
    cp = _cp(request)
    check_account(cp, account)
    jobs = cp.store.list("jobs")
    return {"rlorTrainerJobs": jobs, "totalSize": len(jobs), "nextPageToken": ""}


@router.get("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
async def get_job(request: Request, account: str, job_id: str) -> dict:
    cp = _cp(request)
    check_account(cp, account)
    return await settled(lambda: _get_job(cp, job_id), "JOB_STATE_CREATING")


def _get_job(cp: ControlPlane, job_id: str) -> dict:
    job = cp.store.get("jobs", job_id)
    require(job is not None, 404, f"rlorTrainerJob {job_id!r} not found")
    return job


@router.delete("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
async def delete_job(request: Request, account: str, job_id: str) -> dict:
    cp = _cp(request)
    check_account(cp, account)
    _get_job(cp, job_id)
    # The row and the checkpoint files stay: promotion only needs the row (seed 000).
    cp.stop_trainer(job_id)
    return cp.set_job_state(job_id, "JOB_STATE_DELETED", "deleted")


@router.post("/v1/accounts/{account}/rlorTrainerJobs/{job_action}")
async def job_action(request: Request, account: str, job_action: str) -> dict:
    cp = _cp(request)
    check_account(cp, account)
    job_id, _, action = job_action.partition(":")
    require(action == "resume", 404, f"unknown trainer job action {action!r} (supported: resume)")
    job = _get_job(cp, job_id)
    require(job["state"] not in ("JOB_STATE_DELETED", "JOB_STATE_ARCHIVED"), 412,
            f"rlorTrainerJob {job_id!r} is {job['state']} and cannot be resumed")
    running = cp.supervisor.get("trainer", job_id) is not None
    if job["state"] in JOB_STOPPED_STATES or not running:
        cp.start_trainer(job_id)
    return cp.store.get("jobs", job_id)
