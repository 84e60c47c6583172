"""Train-state checkpoints: model weights + optimizer state with torch.distributed.checkpoint (DCP).

What `save_state` / `load_state_with_optimizer` / `load_state` persist. DCP is the format the real
service uses; it also works in a single process without `init_process_group` (no_dist=True), and a
sharded multi-GPU trainer could later write the same layout.

    save_train_state(job / "checkpoints" / "step-4", model, optimizer, {"step": 4, "base_model": ..., "lora_rank": 0})
    meta = load_train_state(job / "checkpoints" / "step-4", model, optimizer)   # weights + optimizer
    meta = load_train_state(job / "checkpoints" / "step-4", model, None)        # weights only

On disk: the DCP files (`.metadata` and `__0_0.distcp`) plus the manifest. DCP keys are
"model.<parameter FQN>" and "optim.state.<FQN>.<exp_avg|exp_avg_sq|step>" / "optim.param_groups...".
For a PEFT (LoRA) model only the trainable adapter parameters and their optimizer state are saved:
the frozen base weights come from the base model, and saving them would make every LoRA checkpoint
as large as the model. detect.py tells TRAINING from TRAINING_LORA by those keys.

Inside an initialized process group (the N-rank trainer, FSDP2 models) the same calls save and load
sharded: each rank writes its own `__<rank>_0.distcp`, and DCP reshards on load, so a state saved at
one world size loads at any other.

Saving is atomic (staging directory, manifest last, rename; see staging.py) and refuses to
overwrite an existing checkpoint (FileExistsError): the caller decides what a reused name means.
An optimizer that has not stepped yet has no state; it is recorded as "empty" rather than letting
DCP initialise it (which would run a zero-lr step and change the live optimizer's step count).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .manifest import read_manifest
from .safe_pickle import check_dcp_metadata
from .staging import cleanup_partial, staged_checkpoint


def _distributed() -> bool:
    """True inside an initialized process group (the N-rank trainer): DCP then saves/loads sharded."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()

# Single-process DCP is intended here (no_dist=True); its "assuming the intent is to save in a single
# process" warning would otherwise be printed on every save and load.
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")

__all__ = ["save_train_state", "load_train_state", "cleanup_partial", "dcp_keys", "is_lora_key"]

# PEFT adapter parameter names: ...q_proj.lora_A.default.weight, ...lora_embedding_B..., DoRA magnitudes.
_LORA_KEY = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def is_lora_key(key: str) -> bool:
    return bool(_LORA_KEY.search(key))


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain model needs no peft to checkpoint
        return False
    return isinstance(model, PeftModel)


def _has_optimizer_state(optimizer) -> bool:
    return any(bool(s) for s in optimizer.state.values())


def _state_dicts(model, optimizer):
    """(model state, optimizer state or None) keyed by parameter FQN, as DCP saves and loads them."""
    lora = _is_peft(model)
    options = StateDictOptions(ignore_frozen_params=lora)
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model, options=options), None
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if lora:
        # ignore_frozen_params still lets the tied lm_head alias through; keep exactly the trainable ones.
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    return model_state, optim_state


def dcp_keys(directory: Path) -> list[str]:
    """The state-dict keys recorded in a DCP checkpoint's .metadata (raises if there is none).

    Read with safe_pickle's DCP-only unpickler: a .metadata naming anything but DCP's own classes
    raises UnsafePickleError before anything runs, so load_train_state never hands torch's plain
    pickle.load a crafted file (dcp.load reads the same bytes only after this check passed).
    """
    return list(check_dcp_metadata(directory).state_dict_metadata)


def save_train_state(dest: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict) -> None:
    """Save weights (+ optimizer state) at `dest` atomically. FileExistsError if `dest` exists."""
    lora = _is_peft(model)
    if optimizer is None:
        optimizer_status = "none"
    elif _has_optimizer_state(optimizer):
        optimizer_status = "saved"
    else:
        optimizer_status = "empty"
    model_state, optim_state = _state_dicts(model, optimizer if optimizer_status == "saved" else None)
    state = {"model": model_state}
    if optim_state is not None:
        state["optim"] = optim_state
    full_meta = {**meta, "kind": "train_state", "format": "torch.distributed.checkpoint",
                 "lora": lora, "optimizer": optimizer_status}
    if _distributed():
        _save_sharded(dest, state, full_meta)
        return
    with staged_checkpoint(dest, full_meta) as tmp:
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True, thread_count=1)
        dcp.save(state, storage_writer=writer, no_dist=True)


def _save_sharded(dest: Path, state: dict, full_meta: dict) -> None:
    """Every rank writes its shards into rank 0's staging directory; rank 0 commits once all succeeded.

    Collective: every rank of the process group calls it with the same `dest`. Rank 0 alone stages and
    commits (manifest last, rename), so the checkpoint appears once, complete, as in one process.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    with contextlib.ExitStack() as stack:
        box: list = [None]
        if rank == 0:
            try:
                box[0] = str(stack.enter_context(staged_checkpoint(dest, full_meta)))
            except Exception as e:  # e.g. FileExistsError: tell the other ranks before raising
                box[0] = e
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        error = None
        try:
            writer = dcp.FileSystemWriter(box[0], single_file_per_rank=True, sync_files=True, thread_count=1)
            dcp.save(state, storage_writer=writer)
        except Exception as e:
            error = e
        failures: list = [None] * dist.get_world_size()
        dist.all_gather_object(failures, None if error is None else f"rank {rank}: {type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [f for f in failures if f]
        if failed:  # raising inside the ExitStack on rank 0 removes the staging directory
            raise RuntimeError("sharded save failed on " + "; ".join(failed))


def load_train_state(src: Path, model, optimizer=None) -> dict:
    """Load a train state saved by save_train_state into `model` (and `optimizer`); return its manifest.

    optimizer=None loads weights only (the caller's optimizer, if any, is left alone: `load_state`
    semantics are "fresh optimizer", so create one). With an optimizer, its state and param-group
    hyperparameters are restored; ValueError if the checkpoint was saved without optimizer state.
    """
    src = Path(src)
    meta = read_manifest(src)
    if meta is None:
        raise FileNotFoundError(f"{src} is not a committed checkpoint (no readable manifest)")
    if meta.get("kind") != "train_state":
        raise ValueError(f"{src} is a {meta.get('kind')!r} checkpoint, not a train state")
    keys = dcp_keys(src)
    saved_lora = any(is_lora_key(k) for k in keys)
    if saved_lora != _is_peft(model):
        raise ValueError(f"{src} holds {'LoRA adapter' if saved_lora else 'full-model'} weights, but the model is "
                         f"{'a PEFT model' if _is_peft(model) else 'not a PEFT model'}")
    saved_optimizer = any(k.startswith("optim.") for k in keys)
    if optimizer is not None and not saved_optimizer and meta.get("optimizer") != "empty":
        raise ValueError(f"{src} was saved without optimizer state; load it weights-only (optimizer=None)")
    with_optimizer = optimizer is not None and saved_optimizer

    model_state, optim_state = _state_dicts(model, optimizer if with_optimizer else None)
    state = {"model": model_state}
    if with_optimizer:
        state["optim"] = optim_state
    dcp.load(state, checkpoint_id=str(src), no_dist=not _distributed())
    # A LoRA checkpoint holds only the adapter, so loading it must not demand the frozen base keys.
    options = StateDictOptions(strict=not saved_lora)
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
    else:
        set_model_state_dict(model, model_state, options=options)
        if optimizer is not None:  # checkpoint taken before the first step: its optimizer state was empty
            optimizer.state.clear()
    return meta
