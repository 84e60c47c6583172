"""Sampler snapshots: the weights a deployment serves, written by the trainer, read by deployments.

Three kinds, told apart by the files they hold (`snapshot_kind`):

  base   a Hugging Face model directory: model.safetensors (bf16, tied lm_head omitted), config.json
         (dtype bfloat16) and the base model's tokenizer files and chat template, so
         `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` work as is.
         Promotable.
  delta  delta.wbd: the new bf16 weights encoded against the previous snapshot (see delta_codec).
         Only meaningful on top of that snapshot; not promotable.
  lora   a PEFT adapter directory (adapter_config.json + adapter_model.safetensors, bf16) plus the
         tokenizer files; loads with `PeftModel.from_pretrained(base, dir)`. Promotable.

Trainer side:

    weights = bf16_state(model)                                    # after an optimizer step
    save_sampler_base(root / "step-1-ab12cd34", weights, model_dir, meta)
    stats = save_sampler_delta(root / "step-2-ab12cd34", weights2, weights, "step-1-ab12cd34", meta)

Deployment side:

    current = load_base_weights(root / "step-1-ab12cd34")
    current = apply_delta(root / "step-2-ab12cd34", current, current_identity="step-1-ab12cd34")
    same = reconstruct([root / "step-1-ab12cd34", root / "step-2-ab12cd34"])

A snapshot's identity is its name (the manifest's "name", which is the directory name). Every save
is atomic (staging directory, manifest last, rename: see staging.py) and refuses to overwrite.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import delta_codec
from .delta_codec import DeltaError
from .manifest import read_manifest
from .staging import staged_checkpoint

BASE_FILE = "model.safetensors"
DELTA_FILE = "delta.wbd"
ADAPTER_FILE = "adapter_model.safetensors"

# Files copied from the base model's directory so a base/LoRA snapshot is a complete HF directory.
_TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "*.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json")

__all__ = ["DeltaError", "bf16_state", "save_sampler_base", "save_sampler_delta", "save_sampler_lora",
           "snapshot_kind", "load_base_weights", "apply_delta", "reconstruct", "snapshot_identity"]


def bf16_state(model) -> dict[str, torch.Tensor]:
    """Detached, contiguous bf16 CPU copies of `model.state_dict()`.

    With tied word embeddings the lm_head entry is the same tensor as embed_tokens; it is dropped
    (safetensors refuses shared tensors, and from_pretrained re-ties it from the config).
    """
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    seen = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tied and key in seen:
            continue
        seen.add(key)
        # to(..., copy=True) guarantees a private copy even when the tensor is already bf16 on CPU.
        out[name] = tensor.detach().to(device="cpu", dtype=torch.bfloat16, copy=True).contiguous()
    return out


def _copy_tokenizer_files(model_dir: Path, dest: Path) -> None:
    model_dir = Path(model_dir)
    for pattern in _TOKENIZER_PATTERNS:
        for f in model_dir.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dest / f.name)


def _sampler_meta(meta: dict, snapshot: str, **extra) -> dict:
    return {**meta, "kind": "sampler", "snapshot_kind": snapshot, **extra}


def save_sampler_base(dest: Path, weights_bf16: dict, model_dir: Path, meta: dict) -> None:
    """Write a full bf16 snapshot at `dest` as a Hugging Face model directory (see module docstring)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    # transformers 5 reads "dtype", older versions "torch_dtype": set both.
    config["dtype"] = "bfloat16"
    config["torch_dtype"] = "bfloat16"
    for name, t in weights_bf16.items():
        if t.dtype != torch.bfloat16:
            raise ValueError(f"weights must be bf16 (see bf16_state); {name} is {t.dtype}")
    with staged_checkpoint(dest, _sampler_meta(meta, "base")) as tmp:
        save_file(weights_bf16, str(tmp / BASE_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _copy_tokenizer_files(model_dir, tmp)


def save_sampler_delta(dest: Path, weights_bf16: dict, previous_bf16: dict, previous_identity: str,
                       meta: dict) -> dict:
    """Write `weights_bf16` as a delta over `previous_bf16` (the snapshot named `previous_identity`).

    Returns size stats: raw_bytes (bf16 size of the weights), delta_bytes, ratio, changed_elements,
    total_elements, layouts ({layout: tensor count}), encode_seconds.
    """
    started = time.perf_counter()
    blob = delta_codec.encode(weights_bf16, previous_bf16, previous_identity)
    encode_seconds = time.perf_counter() - started
    records = delta_codec.read_header(blob)["tensors"]
    raw = sum(t.numel() * 2 for t in weights_bf16.values())
    layouts: dict[str, int] = {}
    for rec in records:
        layouts[rec["layout"]] = layouts.get(rec["layout"], 0) + 1
    stats = {
        "raw_bytes": raw,
        "delta_bytes": len(blob),
        "ratio": raw / len(blob) if blob else 0.0,
        "changed_elements": sum(rec["changed"] for rec in records),
        "total_elements": raw // 2,
        "layouts": layouts,
        "encode_seconds": encode_seconds,
    }
    full_meta = _sampler_meta(meta, "delta", base_identity=previous_identity,
                              delta_format_version=delta_codec.FORMAT_VERSION,
                              delta_bytes=len(blob), raw_bytes=raw)
    with staged_checkpoint(dest, full_meta) as tmp:
        (tmp / DELTA_FILE).write_bytes(blob)
    return stats


def save_sampler_lora(dest: Path, peft_model, model_dir: Path, meta: dict) -> None:
    """Write the PEFT adapter of `peft_model` (bf16) at `dest`, with the base model's tokenizer files.

    The adapter config's base_model_name_or_path is the base model's local directory (so PEFT can
    resolve it offline); the manifest records the catalog name as "base_model".
    """
    from peft import get_peft_model_state_dict

    adapter_name = getattr(peft_model, "active_adapter", "default")
    if isinstance(adapter_name, list):
        adapter_name = adapter_name[0]
    config = peft_model.peft_config[adapter_name]
    # Same keys as PeftModel.save_pretrained writes; bf16 like every sampler snapshot.
    state = {k: v.detach().to(device="cpu", dtype=torch.bfloat16, copy=True).contiguous()
             for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    config = copy.deepcopy(config)  # the live model's config stays untouched
    config.base_model_name_or_path = str(model_dir)
    full_meta = _sampler_meta(meta, "lora", lora_rank=int(meta.get("lora_rank") or config.r))
    with staged_checkpoint(dest, full_meta) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        _copy_tokenizer_files(Path(model_dir), tmp)


def snapshot_kind(src: Path) -> str:
    """"base", "delta" or "lora", from the files in `src`. Raises ValueError if it is none of them."""
    src = Path(src)
    if (src / BASE_FILE).is_file():
        return "base"
    if (src / DELTA_FILE).is_file():
        return "delta"
    if (src / ADAPTER_FILE).is_file():
        return "lora"
    raise ValueError(f"{src} is not a sampler snapshot (no {BASE_FILE}, {DELTA_FILE} or {ADAPTER_FILE})")


def snapshot_identity(src: Path) -> str:
    """The identity deltas refer to: the manifest's name (the directory name if there is no manifest)."""
    meta = read_manifest(src) or {}
    return str(meta.get("name") or Path(src).name)


def load_base_weights(src: Path) -> dict[str, torch.Tensor]:
    """The bf16 weights of a base snapshot, keyed like bf16_state()."""
    src = Path(src)
    if not (src / BASE_FILE).is_file():
        raise ValueError(f"{src} is not a base snapshot (no {BASE_FILE})")
    return load_file(str(src / BASE_FILE))


def apply_delta(src: Path, current_bf16: dict, current_identity: str) -> dict:
    """NEW bf16 dict: the delta snapshot at `src` applied to `current_bf16` (the snapshot `current_identity`).

    Raises DeltaError if the delta was made against another snapshot, its version is unknown, its
    file is missing, truncated or corrupted, or a tensor fails its checksum. `current_bf16` is never
    modified.
    """
    path = Path(src) / DELTA_FILE
    try:
        blob = path.read_bytes()
    except FileNotFoundError as e:
        raise DeltaError(f"{src} is not a delta snapshot: {DELTA_FILE} is missing") from e
    except OSError as e:
        raise DeltaError(f"cannot read {path}: {e}") from e
    return delta_codec.decode(blob, current_bf16, current_identity)


def reconstruct(chain: list[Path]) -> dict:
    """bf16 weights of the last snapshot of `chain`: a base snapshot followed by deltas, each on the previous."""
    if not chain:
        raise ValueError("reconstruct needs at least a base snapshot")
    first = Path(chain[0])
    if snapshot_kind(first) != "base":
        raise ValueError(f"a delta chain must start with a base snapshot; {first} is a {snapshot_kind(first)} snapshot")
    weights = load_base_weights(first)
    identity = snapshot_identity(first)
    for link in chain[1:]:
        weights = apply_delta(link, weights, identity)
        identity = snapshot_identity(link)
    return weights
