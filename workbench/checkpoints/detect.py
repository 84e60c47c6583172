"""Checkpoint types as the server reports them, detected from the files, and a trainer job's checkpoint list.

The control plane's checkpoint rows carry `checkpointType` and `promotable`; the real service derives
both from the blob's contents, not from what the client claimed when saving, and so does this module:

  DCP .metadata whose model keys are LoRA adapter keys  -> CHECKPOINT_TYPE_TRAINING_LORA   (resumable)
  DCP .metadata otherwise                               -> CHECKPOINT_TYPE_TRAINING        (resumable)
  model.safetensors (full bf16 HF directory)            -> CHECKPOINT_TYPE_INFERENCE_BASE  (promotable)
  adapter_model.safetensors (PEFT adapter)              -> CHECKPOINT_TYPE_INFERENCE_LORA  (promotable)
  delta.wbd (delta over a previous snapshot)            -> CHECKPOINT_TYPE_INFERENCE_ARC_V2 (neither)

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

from .layout import SAMPLER_DIR, TRAIN_STATE_DIR  # one spelling of the directory names, in layout.py
from .manifest import read_manifest
from .sampler import ADAPTER_FILE, BASE_FILE, DELTA_FILE
from .train_state import dcp_keys, is_lora_key

log = logging.getLogger(__name__)

TRAINING = "CHECKPOINT_TYPE_TRAINING"
TRAINING_LORA = "CHECKPOINT_TYPE_TRAINING_LORA"
INFERENCE_BASE = "CHECKPOINT_TYPE_INFERENCE_BASE"
INFERENCE_LORA = "CHECKPOINT_TYPE_INFERENCE_LORA"
INFERENCE_ARC_V2 = "CHECKPOINT_TYPE_INFERENCE_ARC_V2"
CHECKPOINT_TYPES = (TRAINING, TRAINING_LORA, INFERENCE_BASE, INFERENCE_LORA, INFERENCE_ARC_V2)


def detect_checkpoint_type(directory: Path) -> str:
    """The checkpoint type of `directory`, from its files. ValueError if it holds no known checkpoint."""
    directory = Path(directory)
    if (directory / ".metadata").is_file():
        try:
            keys = dcp_keys(directory)
        except Exception as e:  # unreadable/corrupted .metadata: not something we can resume from
            raise ValueError(f"{directory}: unreadable DCP metadata ({type(e).__name__}: {e})") from e
        model_keys = [k for k in keys if k.startswith("model.")]
        return TRAINING_LORA if any(is_lora_key(k) for k in model_keys) else TRAINING
    if (directory / BASE_FILE).is_file():
        return INFERENCE_BASE
    if (directory / ADAPTER_FILE).is_file():
        return INFERENCE_LORA
    if (directory / DELTA_FILE).is_file():
        return INFERENCE_ARC_V2
    raise ValueError(f"{directory} holds no checkpoint files (.metadata, {BASE_FILE}, {ADAPTER_FILE} or {DELTA_FILE})")


def is_promotable(checkpoint_type) -> bool:
    return checkpoint_type in (INFERENCE_BASE, INFERENCE_LORA)


def is_resumable(checkpoint_type) -> bool:
    return checkpoint_type in (TRAINING, TRAINING_LORA)


def list_checkpoints(job_dir: Path) -> list[dict]:
    """Committed checkpoints of a trainer job, oldest first by created_time (then id)."""
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
            })
    rows.sort(key=lambda row: (row["created_time"], row["id"]))
    return rows
