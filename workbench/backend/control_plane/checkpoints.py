"""REST routes for checkpoint rows, promotion, operations and models (wire contract §4.3, §4.4).

    GET    /v1/accounts/{a}/rlorTrainerJobs/{job}/checkpoints?pageSize=&pageToken=   rows, oldest first
    PATCH  /v1/accounts/{a}/rlorTrainerJobs/{job}/checkpoints/{id}   {"ttl": "3600s"}   (workbench extension: TTL)
    DELETE /v1/accounts/{a}/rlorTrainerJobs/{job}/checkpoints/{id}
    POST   /v1/accounts/{a}/checkpoints/{id}:promote     -> operation (done inline for local copies)
    GET    /v1/accounts/{a}/operations/{op}
    GET    /v1/accounts/{a}/models[/{id}]

Rows are read from the files under `jobs/<job>/` (type and promotability detected from the blobs by
`workbench.checkpoints.detect`), never from what a client claimed when saving. Promotion copies a
promotable snapshot into the model registry `models/<account>/<id>/` through a temporary directory,
so a refused or failed promotion leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from fastapi import APIRouter, Request

from workbench.common import is_resource_id
from workbench.models import registry_dir

from .core import AccountPlane, ControlPlane, delete_checkpoint_dir, plane, read_body_json, rfc3339
from .errors import ApiError, require

router = APIRouter()
log = logging.getLogger("workbench.control_plane")
MAX_PAGE_SIZE = 200
PROMOTE_INLINE_WAIT_S = 25.0


def job_rows(cp: ControlPlane, job_id: str) -> list[dict]:
    """Live (not expired) checkpoint rows of a job, oldest first, in wire form plus `_path`/`_type`."""
    from workbench.checkpoints import detect

    now = time.time()
    rows = []
    for row in detect.list_checkpoints(cp.job_dir(job_id)):
        if row.get("expire_time") and row["expire_time"] <= now:
            continue  # expired: the sweeper deletes it; it must already be gone for clients
        try:
            wire = {
                "name": f"{cp.job_name(job_id)}/checkpoints/{row['id']}",
                "createTime": row["createTime"],
                "updateTime": row["updateTime"],
                "checkpointType": row["checkpointType"],
                "promotable": bool(row["promotable"]),
            }
            manifest = row.get("manifest") or {}
            wire["sizeBytes"] = sum(f.stat().st_size for f in Path(row["path"]).rglob("*") if f.is_file())
            if isinstance(manifest.get("step"), int) and not isinstance(manifest["step"], bool):
                wire["step"] = manifest["step"]
            if row.get("expire_time"):
                wire["expireTime"] = rfc3339(row["expire_time"])
            wire.update(row.get("wire") or {})      # a delta's deltaFormat and per-sync stats
        except (OSError, ValueError, OverflowError) as e:
            # One unreadable checkpoint must not hide the others (resume and promotion list them).
            log.warning("checkpoint listing of job %s: skipping %s (%s: %s)", job_id, row.get("path"),
                        type(e).__name__, e)
            continue
        wire["_path"] = row["path"]
        rows.append(wire)
    return rows


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _find_row(cp: ControlPlane, job_id: str, checkpoint_id: str) -> dict:
    for row in job_rows(cp, job_id):
        if row["name"].split("/")[-1] == checkpoint_id:
            return row
    raise ApiError(404, f"checkpoint {checkpoint_id!r} not found on rlorTrainerJob {job_id!r}")


@router.get("/v1/accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints")
async def list_checkpoint_rows(request: Request, account: str, job_id: str, cp: AccountPlane) -> dict:
    require(cp.store.get("jobs", job_id) is not None, 404, f"rlorTrainerJob {job_id!r} not found")
    q = request.query_params
    try:
        page_size = int(q.get("pageSize") or 50)
        offset = int(q.get("pageToken") or 0)
    except ValueError as e:
        raise ApiError(400, "pageSize and pageToken must be integers") from e
    require(page_size > 0, 400, f"pageSize must be positive (got {page_size})")
    page_size = min(page_size, MAX_PAGE_SIZE)
    rows = job_rows(cp, job_id)
    page = rows[offset:offset + page_size]
    next_token = str(offset + page_size) if offset + page_size < len(rows) else ""
    return {"checkpoints": [_public(r) for r in page], "nextPageToken": next_token, "totalSize": len(rows)}


MAX_TTL_S = 10 * 365 * 24 * 3600.0
"""Longest TTL a checkpoint may be given (ten years): its expiry must stay a representable time."""


def parse_duration(value) -> float:
    """`"3600s"`, `"3600"` or a number -> seconds in (0, MAX_TTL_S]; a 400 naming `ttl` otherwise.
    Validated before anything is written."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d{1,12}(\.\d{1,9})?s?", value.strip()):
        seconds = float(value.strip().rstrip("s"))
    else:
        raise ApiError(400, f"ttl must be a duration like '3600s' (got {value!r})")
    require(math.isfinite(seconds) and 0 < seconds <= MAX_TTL_S, 400,
            f"ttl must be a positive duration of at most {MAX_TTL_S:.0f}s (got {value!r})")
    return seconds


@router.patch("/v1/accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints/{checkpoint_id}")
async def update_checkpoint(request: Request, account: str, job_id: str, checkpoint_id: str, cp: AccountPlane) -> dict:
    row = _find_row(cp, job_id, checkpoint_id)
    from workbench.checkpoints.manifest import read_manifest, write_manifest

    body = read_body_json(await request.body())
    require("ttl" in body, 400, "ttl is required (e.g. {\"ttl\": \"3600s\"})")
    expire_time = time.time() + parse_duration(body["ttl"])
    path = Path(row["_path"])
    manifest = read_manifest(path) or {}
    manifest["expire_time"] = expire_time
    write_manifest(path, manifest)
    return _public(_find_row(cp, job_id, checkpoint_id))


@router.delete("/v1/accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints/{checkpoint_id}")
async def delete_checkpoint(request: Request, account: str, job_id: str, checkpoint_id: str, cp: AccountPlane) -> dict:
    row = _find_row(cp, job_id, checkpoint_id)
    delete_checkpoint_dir(Path(row["_path"]))
    return {}


# ---- promotion --------------------------------------------------------------------------------
@router.post("/v1/accounts/{account}/checkpoints/{checkpoint_action}")
async def promote_checkpoint(request: Request, account: str, checkpoint_action: str, cp: AccountPlane) -> dict:
    checkpoint_id, _, action = checkpoint_action.partition(":")
    require(action == "promote", 404, f"unknown checkpoint action {action!r} (supported: promote)")
    body = read_body_json(await request.body())

    output_model = body.get("output_model")
    require(isinstance(output_model, str) and bool(output_model), 400, "output_model is required")
    parts = output_model.split("/")
    require(len(parts) == 4 and parts[0] == "accounts" and parts[2] == "models", 400,
            f"output_model must be accounts/{cp.account}/models/<id> (got {output_model!r})")
    require(parts[1] == cp.account, 400, f"output_model must be in account {cp.account!r} (got {parts[1]!r})")
    model_id = parts[3]
    require(is_resource_id(model_id), 400,
            f"output_model id {model_id!r} is invalid: 1-63 characters of a-z, 0-9 and '-'")
    trainer = body.get("trainer_job_id")
    require(isinstance(trainer, str) and bool(trainer), 400, "trainer_job_id is required")
    job_id = trainer.split("/")[-1]
    require(cp.store.get("jobs", job_id) is not None, 404, f"trainer_job_id {trainer!r} not found")
    row = _find_row(cp, job_id, checkpoint_id)
    require(row["promotable"], 412,
            f"checkpoint {checkpoint_id!r} has checkpointType {row['checkpointType']} which is not promotable: "
            "only INFERENCE_BASE and INFERENCE_LORA checkpoints can be promoted. Save a base snapshot "
            "(save_weights_for_sampler(..., checkpoint_type='base')) and promote that instead.")
    target = registry_dir(cp.home) / cp.account / model_id
    from workbench.models import embedded_names

    require(cp.store.get("models", model_id) is None and not target.exists()
            and output_model not in embedded_names(), 409,
            f"model {output_model!r} already exists")
    from workbench.checkpoints.manifest import read_manifest

    base_model = body.get("base_model") or (read_manifest(Path(row["_path"])) or {}).get("base_model", "")

    now = rfc3339()
    model = {
        "name": output_model,
        "displayName": model_id,
        "createTime": now,
        "updateTime": now,
        "state": "UPLOADING",
        "kind": "HF_PEFT_ADDON" if row["checkpointType"].endswith("INFERENCE_LORA") else "HF_BASE_MODEL",
        "baseModel": base_model,
        "sourceCheckpoint": row["name"],
        "checkpointType": row["checkpointType"],
        "localPath": str(target),
    }
    if model["kind"] == "HF_PEFT_ADDON":
        adapter = json.loads((Path(row["_path"]) / "adapter_config.json").read_text())
        model["peftDetails"] = {"baseModel": base_model, "r": adapter.get("r"),
                                "targetModules": sorted(adapter.get("target_modules") or [])}
    if not cp.store.insert("models", model_id, model):
        raise ApiError(409, f"model {output_model!r} already exists")
    op_id = f"promote-{secrets.token_hex(6)}"
    op_name = f"accounts/{cp.account}/operations/{op_id}"
    cp.store.put("operations", op_id, {"name": op_name, "done": False,
                                        "metadata": {"statusMessage": f"copying {checkpoint_id}"}})
    task = asyncio.get_running_loop().run_in_executor(
        None, _copy_into_registry, cp, Path(row["_path"]), target, model, op_id)
    try:
        await asyncio.wait_for(asyncio.shield(task), PROMOTE_INLINE_WAIT_S)
    except asyncio.TimeoutError:
        pass  # large copy: the client polls the operation
    op = cp.store.get("operations", op_id)
    if not body.get("async_promotion", False) and op["done"]:
        if "error" in op:
            raise ApiError(500, op["error"]["message"])
        return {"model": op["response"]}
    return {"operation": op}


def _copy_into_registry(cp: ControlPlane, source: Path, target: Path, model: dict, op_id: str) -> None:
    model_id = model["name"].split("/")[-1]
    tmp = target.parent / f".tmp-{target.name}-{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, tmp)
        (tmp / "workbench_checkpoint.json").unlink(missing_ok=True)
        if model["kind"] == "HF_PEFT_ADDON":
            _point_adapter_at_local_base(tmp, model["baseModel"])
        (tmp / "workbench_model.json").write_text(json.dumps(
            {k: model[k] for k in ("name", "baseModel", "sourceCheckpoint", "checkpointType", "kind")}, indent=2))
        os.rename(tmp, target)
    except Exception as e:  # leave nothing behind: no directory, no model row
        shutil.rmtree(tmp, ignore_errors=True)
        cp.store.delete("models", model_id)
        cp.store.update("operations", op_id, done=True, error={"code": 13, "message": f"promotion failed: {e}"})
        return
    model = cp.store.update("models", model_id, state="READY", updateTime=rfc3339())
    cp.store.update("operations", op_id, done=True,
                    response=dict(model, **{"@type": "type.googleapis.com/gateway.Model"}))


def _point_adapter_at_local_base(adapter_dir: Path, base_model: str) -> None:
    """A promoted LoRA model loads with `from_pretrained` only if its adapter names a base it can find
    offline: record the base model's local directory (and keep the catalog name beside it)."""
    from workbench.models import local_path

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    try:
        config["base_model_name_or_path"] = str(local_path(base_model))
    except LookupError:
        pass
    config["workbench_base_model"] = base_model
    config_path.write_text(json.dumps(config, indent=2))


@router.get("/v1/accounts/{account}/operations/{op_id}")
async def get_operation(request: Request, account: str, op_id: str, cp: AccountPlane) -> dict:
    op = cp.store.get("operations", op_id)
    require(op is not None, 404, f"operation {op_id!r} not found")
    return op


@router.get("/v1/accounts/{account}/models")
async def list_models(request: Request, account: str, cp: AccountPlane) -> dict:
    models = cp.store.list("models")
    return {"models": models, "totalSize": len(models), "nextPageToken": ""}


@router.get("/v1/accounts/{account}/models/{model_id}")
async def get_model(request: Request, account: str, model_id: str) -> dict:
    cp = plane(request)
    model = cp.store.get("models", model_id) if account == cp.account else None
    if model is None:
        from workbench.models import EMBEDDED_ACCOUNT, embedded_names

        name = f"accounts/{account}/models/{model_id}"
        require(name in embedded_names() and name.startswith(EMBEDDED_ACCOUNT), 404, f"model {name!r} not found")
        return {"name": name, "state": "READY", "kind": "HF_BASE_MODEL", "baseModelDetails": {"moe": False}}
    return model


@router.delete("/v1/accounts/{account}/models/{model_id}")
async def delete_model(request: Request, account: str, model_id: str, cp: AccountPlane) -> dict:
    model = cp.store.get("models", model_id)
    require(model is not None, 404, f"model {model_id!r} not found")
    cp.store.delete("models", model_id)
    shutil.rmtree(registry_dir(cp.home) / cp.account / model_id, ignore_errors=True)
    return {}
