"""REST routes for deployments (wire contract §4.5).

    POST   /v1/accounts/{a}/deployments?deploymentId=ID     create (409 if ID exists); starts a replica
    GET    /v1/accounts/{a}/deployments[/{id}]              list / get (a CREATING one is waited on briefly)
    PATCH  /v1/accounts/{a}/deployments/{id}[?updateMask=]  update; without a mask the given fields are merged
    DELETE /v1/accounts/{a}/deployments/{id}                stop the replica and forget the deployment

A deployment has at most one replica locally: it runs while `maxReplicaCount > 0` (so the seed's
`min_replica_count=0, max_replica_count=1` serves at once); `scale_to_zero` stops it and keeps the record,
and scaling up again restarts it on its last good snapshot.
"""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request

from workbench.common import is_resource_id
from workbench.models import ModelNotFoundError, local_path

from ..deployment.engines import shape_engine, vllm_available
from .core import AccountPlane, ControlPlane, field, read_body_json, rfc3339, settled
from .errors import ApiError, require

router = APIRouter()

# Fields a client may set, camelCase as on the wire; updateMask uses their snake_case spelling.
_MUTABLE = ("displayName", "description", "minReplicaCount", "maxReplicaCount", "hotLoadTrainerJob",
            "hotLoadTransitionType", "annotations", "extraArgs", "extraValues")


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _get(cp: ControlPlane, deployment_id: str) -> dict:
    dep = cp.store.get("deployments", deployment_id)
    require(dep is not None, 404, f"deployment {deployment_id!r} not found")
    return dep


def _check_trainer_link(cp: ControlPlane, value) -> None:
    if value in (None, ""):
        return
    parts = str(value).split("/")
    require(len(parts) == 4 and parts[0] == "accounts" and parts[2] == "rlorTrainerJobs", 400,
            f"hotLoadTrainerJob must be accounts/{cp.account}/rlorTrainerJobs/<id> (got {value!r})")
    require(cp.store.get("jobs", parts[3]) is not None, 400, f"hotLoadTrainerJob {value!r} does not exist")


MAX_REPLICAS = 100
# Every field a client may send, with its JSON type (validated on create and on update).
_FIELD_KINDS = {
    "displayName": "string", "description": "string", "baseModel": "string", "minReplicaCount": "integer",
    "maxReplicaCount": "integer", "enableHotLoad": "boolean", "hotLoadBucketType": "string",
    "hotLoadTrainerJob": "string", "hotLoadTransitionType": "string", "acceleratorType": "string",
    "deploymentShape": "string", "annotations": "object", "extraArgs": "array", "extraValues": "object",
    "placement": "object",
}


_ZERO = {"string": "", "integer": 0, "boolean": False, "object": {}, "array": []}


def _check_fields(body: dict) -> None:
    """Each known field has its JSON type (replica counts within 0..MAX_REPLICAS): a 400 naming it otherwise."""
    for name, kind in _FIELD_KINDS.items():
        bounds = {"minimum": 0, "maximum": MAX_REPLICAS} if name.endswith("ReplicaCount") else {}
        field(body, name, kind, **bounds)
    if body.get("minReplicaCount") is not None and body.get("maxReplicaCount") is not None:
        require(body["minReplicaCount"] <= body["maxReplicaCount"], 400,
                f"minReplicaCount ({body['minReplicaCount']}) must not exceed maxReplicaCount "
                f"({body['maxReplicaCount']})")


@router.post("/v1/accounts/{account}/deployments")
async def create_deployment(request: Request, account: str, cp: AccountPlane) -> dict:
    body = read_body_json(await request.body())
    deployment_id = request.query_params.get("deploymentId")
    require(bool(deployment_id), 400, "deploymentId (query parameter) is required")
    require(is_resource_id(deployment_id), 400,
            f"deploymentId {deployment_id!r} is invalid: use 1-63 lowercase letters, digits and hyphens")
    return create_deployment_record(cp, deployment_id, body)


def create_deployment_record(cp: ControlPlane, deployment_id: str, body: dict) -> dict:
    """Validate `body` (the wire's Deployment fields), store the deployment and start its replica; 409 if the id
    exists. The create route and the serverless sampling routes (serverless.py) both create deployments here."""
    _check_fields(body)
    base_model = body.get("baseModel")
    require(bool(base_model), 400, "baseModel is required")
    try:
        local_path(base_model)
    except ModelNotFoundError as e:
        raise ApiError(400, f"baseModel: {e}") from e
    _check_trainer_link(cp, body.get("hotLoadTrainerJob"))
    if shape_engine(body.get("deploymentShape")) == "vllm":
        ok, why = vllm_available()
        require(ok, 400, f"deploymentShape {body['deploymentShape']!r} runs on vLLM, but {why}")
    now = rfc3339()
    dep = {
        "name": cp.deployment_name(deployment_id),
        "displayName": body.get("displayName") or deployment_id,
        "description": body.get("description", ""),
        "createTime": now,
        "updateTime": now,
        "state": "CREATING",
        "status": {"code": "OK", "message": "starting replica"},
        "baseModel": base_model,
        "minReplicaCount": body.get("minReplicaCount", 0),
        "maxReplicaCount": body.get("maxReplicaCount", 1),
        "enableHotLoad": body.get("enableHotLoad", True),
        "hotLoadBucketType": body.get("hotLoadBucketType", "FW_HOSTED"),
        "hotLoadTrainerJob": body.get("hotLoadTrainerJob", ""),
        "hotLoadTransitionType": body.get("hotLoadTransitionType", "ASYNC"),
        "acceleratorType": body.get("acceleratorType", "CPU"),
    }
    for key in ("deploymentShape", "annotations", "extraArgs", "extraValues", "placement"):
        if key in body:
            dep[key] = body[key]
    _set_bucket_url(cp, dep)
    if not cp.store.insert("deployments", deployment_id, dep):
        raise ApiError(409, f"deployment {deployment_id!r} already exists")
    if dep["maxReplicaCount"] > 0:
        cp.start_deployment(deployment_id)
    else:
        cp.set_deployment_state(deployment_id, "READY", "scaled to zero")
    return cp.store.get("deployments", deployment_id)


def _set_bucket_url(cp: ControlPlane, dep: dict) -> None:
    trainer = dep.get("hotLoadTrainerJob")
    dep["hotLoadBucketUrl"] = (f"file://{cp.job_layout(trainer.split('/')[-1]).samplers}" if trainer else "")


@router.get("/v1/accounts/{account}/deployments")
async def list_deployments(request: Request, account: str, cp: AccountPlane) -> dict:
    deps = cp.store.list("deployments")
    return {"deployments": deps, "totalSize": len(deps), "nextPageToken": ""}


@router.get("/v1/accounts/{account}/deployments/{deployment_id}")
async def get_deployment(request: Request, account: str, deployment_id: str, cp: AccountPlane) -> dict:
    return await settled(lambda: _get(cp, deployment_id), "CREATING")


@router.patch("/v1/accounts/{account}/deployments/{deployment_id}")
async def update_deployment(request: Request, account: str, deployment_id: str, cp: AccountPlane) -> dict:
    dep = _get(cp, deployment_id)
    body = read_body_json(await request.body())
    mask = request.query_params.get("updateMask")
    if mask:
        by_snake = {_snake(f): f for f in _MUTABLE}
        names = []
        for item in (m.strip() for m in mask.split(",") if m.strip()):
            name = by_snake.get(item) or (item if item in _MUTABLE else None)
            require(name is not None, 400, f"updateMask: field {item!r} cannot be updated "
                                           f"(updatable: {sorted(by_snake)})")
            names.append(name)
        # A masked field absent from the body is cleared to its zero value (protobuf field-mask semantics).
        changes = {n: body[n] if body.get(n) is not None else _ZERO[_FIELD_KINDS[n]] for n in names}
    else:
        # No mask (DeploymentManager.scale_to_zero): merge the given fields, never replace the whole object.
        unknown = [k for k in body if k not in _MUTABLE]
        require(not unknown, 400, f"fields {unknown} cannot be updated (updatable: {list(_MUTABLE)})")
        changes = {k: v for k, v in body.items() if v is not None}
    _check_fields(changes)
    if "hotLoadTrainerJob" in changes:
        _check_trainer_link(cp, changes["hotLoadTrainerJob"])
    dep.update(changes)
    _set_bucket_url(cp, dep)
    dep["updateTime"] = rfc3339()
    if dep["state"] == "FAILED" and dep.get("maxReplicaCount", 0) > 0:
        dep["state"] = "CREATING"  # an update is a chance to recover a failed replica
    cp.store.put("deployments", deployment_id, dep)
    cp.reconcile_replicas(deployment_id)
    if dep.get("maxReplicaCount", 0) == 0:
        cp.set_deployment_state(deployment_id, "READY", "scaled to zero")
    return cp.store.get("deployments", deployment_id)


@router.delete("/v1/accounts/{account}/deployments/{deployment_id}")
async def delete_deployment(request: Request, account: str, deployment_id: str, cp: AccountPlane) -> dict:
    dep = _get(cp, deployment_id)
    cp.store.delete("deployments", deployment_id)
    cp.supervisor.stop("deployment", deployment_id)
    # The replica's snapshot chain belongs to this deployment only; the snapshots themselves stay with the trainer.
    shutil.rmtree(cp.deployment_dir(deployment_id), ignore_errors=True)
    dep.update(state="DELETED", updateTime=rfc3339())
    return dep
