"""Checkpoint types as the server reports them, detected from the files, and a trainer job's checkpoint list.

The control plane's checkpoint rows carry `checkpointType` and `promotable`; the real service derives
both from the blob's contents, not from what the client claimed when saving, and so does this module:

  DCP .metadata, train-state manifest with "lora": true -> CHECKPOINT_TYPE_TRAINING_LORA   (resumable)
  DCP .metadata otherwise                               -> CHECKPOINT_TYPE_TRAINING        (resumable)
  model.safetensors (full HF directory: readable header
    matching the file size, and config.json)            -> CHECKPOINT_TYPE_INFERENCE_BASE  (promotable)
  adapter_model.safetensors (PEFT adapter)              -> CHECKPOINT_TYPE_INFERENCE_LORA  (promotable)
  a delta in any format (delta.safetensors: arc_v1/v2/v3,
    delta.wbd: workbench_v1)                            -> CHECKPOINT_TYPE_INFERENCE_ARC_V2 (neither)

Every delta format is ARC_V2 on the wire (the type the real service reports for incremental
snapshots); the row's `deltaFormat` says which one it is. Listing never unpickles anything: a DCP
checkpoint's LoRA-ness comes from the manifest workbench wrote (a crafted `.metadata` pickle in a job
directory is never read here), and safetensors are judged by their JSON headers. A directory whose
files are unreadable or truncated is skipped with a warning rather than listed as promotable.

    rows = list_checkpoints(job_dir)     # committed checkpoints, oldest first
    rows[-1]["checkpointType"], rows[-1]["promotable"], rows[-1]["createTime"]

A job directory holds job_dir/checkpoints/<name>/ (train states) and job_dir/sampler/<name>/ (sampler
snapshots). Only committed directories (with a readable manifest) are listed; staging leftovers
(.tmp-*) and anything else are skipped.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from workbench.common import rfc3339

from . import formats
from .layout import SAMPLER_DIR, TRAIN_STATE_DIR  # one spelling of the directory names, in layout.py
from .manifest import read_manifest
from .sampler import ADAPTER_FILE, BASE_FILE, delta_format_of, snapshot_kind

log = logging.getLogger(__name__)

TRAINING = "CHECKPOINT_TYPE_TRAINING"
TRAINING_LORA = "CHECKPOINT_TYPE_TRAINING_LORA"
INFERENCE_BASE = "CHECKPOINT_TYPE_INFERENCE_BASE"
INFERENCE_LORA = "CHECKPOINT_TYPE_INFERENCE_LORA"
INFERENCE_ARC_V2 = "CHECKPOINT_TYPE_INFERENCE_ARC_V2"
CHECKPOINT_TYPES = (TRAINING, TRAINING_LORA, INFERENCE_BASE, INFERENCE_LORA, INFERENCE_ARC_V2)


def detect_checkpoint_type(directory: Path) -> str:
    """The checkpoint type of `directory`, from its files (and, for DCP, workbench's manifest); never unpickles.

    ValueError if it holds no known checkpoint, or its files are unreadable, truncated or incomplete.
    """
    directory = Path(directory)
    if (directory / ".metadata").is_file():
        # save_train_state records whether it saved only LoRA adapter keys; reading the keys themselves
        # would unpickle .metadata.
        meta = read_manifest(directory) or {}
        return TRAINING_LORA if meta.get("lora") is True else TRAINING
    if not any(directory.glob("*.safetensors")) and not (directory / formats.WORKBENCH_DELTA_FILE).is_file():
        raise ValueError(f"{directory} holds no checkpoint files (.metadata, {BASE_FILE}, {ADAPTER_FILE}, "
                         f"{formats.LIBRARY_DELTA_FILE} or {formats.WORKBENCH_DELTA_FILE})")
    try:
        kind = snapshot_kind(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: {e}") from e
    if kind == "lora":
        if not (directory / "adapter_config.json").is_file():
            raise ValueError(f"{directory}: {ADAPTER_FILE} without adapter_config.json")
        return INFERENCE_LORA
    if kind == "delta":
        return INFERENCE_ARC_V2
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: weights without config.json are not a Hugging Face model directory")
    for f in directory.glob("*.safetensors"):       # every shard's header must match its size
        formats.safetensors_header(f)
    return INFERENCE_BASE


def is_promotable(checkpoint_type) -> bool:
    return checkpoint_type in (INFERENCE_BASE, INFERENCE_LORA)


def is_resumable(checkpoint_type) -> bool:
    return checkpoint_type in (TRAINING, TRAINING_LORA)


def _wire_extras(directory: Path, checkpoint_type: str, meta: dict) -> dict:
    """Fields a checkpoint row adds for a delta: its format and what the notebook shows per sync."""
    if checkpoint_type != INFERENCE_ARC_V2:
        return {}
    try:
        extras = {"deltaFormat": delta_format_of(directory)}
    except (OSError, ValueError) as e:
        log.warning("%s: delta format unreadable: %s", directory, e)
        extras = {"deltaFormat": "unknown"}
    for key, wire_key in (("delta_bytes", "deltaBytes"), ("changed_fraction", "changedFraction"),
                          ("chain_length", "chainLength"), ("base_identity", "baseSnapshot")):
        if meta.get(key) is not None:
            extras[wire_key] = meta[key]
    return extras


def list_checkpoints(job_dir: Path) -> list[dict]:
    """Committed checkpoints of a trainer job, oldest first by created_time (then id).

    Each row: id, path, checkpointType, promotable, resumable, createTime/updateTime, created_time,
    expire_time, manifest, and `wire` (fields for the wire row: deltaFormat, deltaBytes,
    changedFraction, chainLength, baseSnapshot for a delta; empty otherwise).
    """
    job_dir = Path(job_dir)
    rows = []
    for sub in (TRAIN_STATE_DIR, SAMPLER_DIR):
        parent = job_dir / sub
        if not parent.is_dir():
            continue
        for directory in sorted(parent.iterdir()):
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            meta = read_manifest(directory)
            if meta is None:  # not committed (or not a checkpoint at all)
                continue
            try:
                checkpoint_type = detect_checkpoint_type(directory)
            except ValueError as e:
                log.warning("skipping %s: %s", directory, e)
                continue
            try:
                created = float(meta.get("created_time"))
                rfc3339(created)
            except (TypeError, ValueError, OverflowError, OSError):
                created = directory.stat().st_mtime  # a manifest without a usable time: the directory's
            expire = meta.get("expire_time")
            if isinstance(expire, bool) or not isinstance(expire, (int, float)) or not math.isfinite(expire):
                if expire is not None:
                    log.warning("%s: ignoring invalid expire_time %r in its manifest", directory, expire)
                expire = None
            rows.append({
                "id": directory.name,
                "path": str(directory),
                "checkpointType": checkpoint_type,
                "promotable": is_promotable(checkpoint_type),
                "resumable": is_resumable(checkpoint_type),
                "createTime": rfc3339(created),
                "updateTime": rfc3339(created),
                "created_time": created,
                "expire_time": float(expire) if expire is not None else None,
                "manifest": meta,
                "wire": _wire_extras(directory, checkpoint_type, meta),
            })
    rows.sort(key=lambda row: (row["created_time"], row["id"]))
    return rows
