"""REST routes for accounts, training shapes and RLOR trainer jobs (wire contract §2.3, §4.1, §4.2).

    POST   /v1/accounts/{a}/rlorTrainerJobs?rlorTrainerJobId=ID[&trainingShape=...]   create (409 if ID exists)
    GET    /v1/accounts/{a}/rlorTrainerJobs[/{id}]                                     list / get
    DELETE /v1/accounts/{a}/rlorTrainerJobs/{id}                                       stop; the id answers 404 and
                                                                                       may be created again (the row
                                                                                       stays, for promotion)
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

from .core import JOB_STOPPED_STATES, AccountPlane, ControlPlane, field, plane, read_body_json, rfc3339, settled
from .errors import ApiError, require
from .shapes import SHAPES, shape_for_ref, shape_version

router = APIRouter()


@router.get("/v1/accounts")
async def list_accounts(request: Request) -> dict:
    cp = plane(request)
    return {"accounts": [{"name": f"accounts/{cp.account}", "displayName": "workbench (local)"}], "totalSize": 1}


@router.get("/v1/accounts/{account}")
async def get_account(request: Request, account: str, cp: AccountPlane) -> dict:
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
MAX_LORA_RANK = 1024
MAX_CONTEXT_LENGTH = 1 << 20
_DURATION_RE = re.compile(r"\d{1,9}(\.\d{1,9})?s")


@router.post("/v1/accounts/{account}/rlorTrainerJobs")
async def create_job(request: Request, account: str, cp: AccountPlane) -> dict:
    body = read_body_json(await request.body())
    q = request.query_params
    job_id = q.get("rlorTrainerJobId") or f"training-api-service-{secrets.token_hex(4)}"
    require(is_resource_id(job_id), 400,
            f"rlorTrainerJobId {job_id!r} is invalid: use 1-63 lowercase letters, digits and hyphens")
    config = dict(field(body, "trainingConfig", "object", default={}))
    forward_only = field(body, "forwardOnly", "boolean", default=False)

    shape_ref = q.get("trainingShape") or field(body, "trainingShape", "string")
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
        mode = snapshot["trainerMode"]
        # As the service: a LoRA shape trains adapters (loraRank > 0) or hosts a frozen rank-0 reference
        # (forwardOnly, what the SDK provisions for KL/DPO references); a FORWARD_ONLY shape hosts only those.
        if mode == "LORA_TRAINER" and not config.get("loraRank") and not forward_only:
            raise ApiError(400, f"trainingShape {shape_ref!r} is a LoRA shape: trainingConfig.loraRank must be > 0 "
                                "(or forwardOnly must be true, for a frozen reference trainer)")
        if mode == "FORWARD_ONLY":
            require(forward_only, 400, f"trainingShape {shape_ref!r} is a FORWARD_ONLY shape: forwardOnly must be true")
            require(not config.get("loraRank"), 400,
                    f"trainingShape {shape_ref!r} is a FORWARD_ONLY shape: trainingConfig.loraRank must be 0")

    base_model = field(config, "baseModel", "string", where="trainingConfig")
    require(bool(base_model), 400, "trainingConfig.baseModel is required")
    try:
        local_path(base_model)
    except ModelNotFoundError as e:
        raise ApiError(400, f"trainingConfig.baseModel: {e}") from e
    lora_rank = field(config, "loraRank", "integer", where="trainingConfig", default=0, minimum=0,
                      maximum=MAX_LORA_RANK)
    field(config, "learningRate", "number", where="trainingConfig", minimum=0)
    max_context = field(config, "maxContextLength", "integer", where="trainingConfig", minimum=0,
                        maximum=MAX_CONTEXT_LENGTH) or shape_context or 2048
    for name, value in (("nodeCount", nodes), ("trainingConfig.acceleratorCount", ranks_per_node)):
        require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64, 400,
                f"{name} must be an integer in 1..64 (got {value!r})")
    config.update(baseModel=base_model, loraRank=lora_rank, maxContextLength=max_context)
    if ranks_per_node > 1:
        config["acceleratorCount"] = ranks_per_node
    # The sampler-delta format this job writes (README "Delta formats"): extraValues.compression_format,
    # else --compression-format in extraArgs, else the `workbench serve --compression-format` default.
    from workbench.checkpoints.formats import EXTRA_VALUES_KEY, choose_job_format

    extra_values = body.get("extraValues")
    try:
        delta_format = choose_job_format(extra_values, config.get("extraArgs"))
    except ValueError as e:
        raise ApiError(400, str(e)) from e

    now = rfc3339()
    job = {
        "name": cp.job_name(job_id),
        "displayName": field(body, "displayName", "string") or job_id,
        "createTime": now,
        "updateTime": now,
        "state": "JOB_STATE_CREATING",
        "status": {"code": "OK", "message": "queued"},
        "serviceMode": field(body, "serviceMode", "boolean", default=True),
        "keepAlive": field(body, "keepAlive", "boolean", default=False),
        "dataset": field(body, "dataset", "string", default=""),
        "trainingConfig": config,
        "nodeCount": nodes,
        "extraValues": {**(extra_values or {}), EXTRA_VALUES_KEY: delta_format},
    }
    if forward_only:
        job["forwardOnly"] = True
    if shape_ref:
        job["trainingShape"] = shape_ref
    if field(body, "hotLoadDeploymentId", "string"):
        job["hotLoadDeploymentId"] = body["hotLoadDeploymentId"]
    timeout = field(body, "inactivityTimeout", "string")
    if timeout is not None:
        require(bool(_DURATION_RE.fullmatch(timeout)), 400,
                f"inactivityTimeout must be a duration like '1800s' (got {timeout!r})")
        job["inactivityTimeout"] = timeout
    if field(body, "disableInactivityCleanup", "boolean"):
        job["disableInactivityCleanup"] = True
    if not cp.store.insert("jobs", job_id, job):
        # A deleted job's row is kept (promotion of its checkpoints needs it) but the id is free again, as
        # on the service (GET answers 404): the cookbook deletes its trainer after one phase and creates
        # the same id in the next, which then resumes from the checkpoints still in the job directory.
        previous = cp.store.get("jobs", job_id)
        require(previous is not None and previous["state"] == "JOB_STATE_DELETED", 409,
                f"rlorTrainerJob {job_id!r} already exists")
        cp.store.put("jobs", job_id, job)
    cp.start_trainer(job_id)
    return cp.store.get("jobs", job_id)


@router.get("/v1/accounts/{account}/rlorTrainerJobs")
async def list_jobs(request: Request, account: str, cp: AccountPlane) -> dict:
    # Deleted jobs are hidden (the SDK treats a listed DELETED job as a tombstone); `showDeleted=true` (the
    # AIP-164 flag) lists them too, for `workbench ls --all`.
    show_deleted = request.query_params.get("showDeleted", "").lower() == "true"
    jobs = [j for j in cp.store.list("jobs") if show_deleted or j["state"] != "JOB_STATE_DELETED"]
    return {"rlorTrainerJobs": jobs, "totalSize": len(jobs), "nextPageToken": ""}


@router.get("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
async def get_job(request: Request, account: str, job_id: str, cp: AccountPlane) -> dict:
    return await settled(lambda: _get_job(cp, job_id), "JOB_STATE_CREATING")


def _get_job(cp: ControlPlane, job_id: str) -> dict:
    """The job's row; 404 if there is none or the job was deleted (its row stays only for promotion)."""
    job = cp.store.get("jobs", job_id)
    require(job is not None and job["state"] != "JOB_STATE_DELETED", 404, f"rlorTrainerJob {job_id!r} not found")
    return job


@router.delete("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
async def delete_job(request: Request, account: str, job_id: str, cp: AccountPlane) -> dict:
    _get_job(cp, job_id)
    # The row and the checkpoint files stay: promotion only needs the row (seed 000).
    cp.stop_trainer(job_id)
    return cp.set_job_state(job_id, "JOB_STATE_DELETED", "deleted")


@router.post("/v1/accounts/{account}/rlorTrainerJobs/{job_action}")
async def job_action(request: Request, account: str, job_action: str, cp: AccountPlane) -> dict:
    job_id, _, action = job_action.partition(":")
    require(action == "resume", 404, f"unknown trainer job action {action!r} (supported: resume)")
    job = _get_job(cp, job_id)
    require(job["state"] != "JOB_STATE_ARCHIVED", 412,
            f"rlorTrainerJob {job_id!r} is {job['state']} and cannot be resumed")
    running = cp.supervisor.get("trainer", job_id) is not None
    if job["state"] in JOB_STOPPED_STATES or not running:
        cp.start_trainer(job_id)
    return cp.store.get("jobs", job_id)
