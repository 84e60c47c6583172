"""Sampler snapshots: the weights a deployment serves, written by the trainer, read by deployments.

Three kinds, told apart by the files they hold (`snapshot_kind`):

  base   a Hugging Face model directory: model.safetensors (bf16, tied lm_head omitted; a foreign base
         may be sharded), config.json (dtype bfloat16) and the base model's tokenizer files and chat
         template, so `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`
         work as is. Promotable.
  delta  the new bf16 weights encoded against the previous snapshot, in the trainer job's delta format
         (formats.py: delta.safetensors for arc_v1/arc_v2/arc_v3 via fireworks_delta_compression,
         delta.wbd for workbench_v1). Only meaningful on top of that snapshot; not promotable. A
         directory of library-written *.safetensors patches without a manifest (Fireworks' own
         pipeline) is a delta too.
  lora   a PEFT adapter directory (adapter_config.json + adapter_model.safetensors, bf16) plus the
         tokenizer files; loads with `PeftModel.from_pretrained(base, dir)`. Promotable.

Trainer side:

    weights = bf16_state(model)                                    # after an optimizer step
    save_sampler_base(root / "step-1-ab12cd34", weights, model_dir, meta)
    stats = save_sampler_delta(root / "step-2-ab12cd34", weights2, weights, "step-1-ab12cd34", meta,
                               delta_format="arc_v2")

Deployment side:

    current = load_base_weights(root / "step-1-ab12cd34")                     # out=: read into spare tensors
    current = apply_delta(root / "step-2-ab12cd34", current, current_identity="step-1-ab12cd34",
                          compression_format="arc_v2")   # the hot-load request's; must match the snapshot's
    same = reconstruct([root / "step-1-ab12cd34", root / "step-2-ab12cd34"])

A delta's manifest records what the notebook shows per sync: delta_format, delta_bytes, raw_bytes,
changed_elements / total_elements (changed_fraction) and chain_length (deltas since the base,
this one included) with chain_base.

A snapshot's identity is its name (the manifest's "name", which is the directory name). Every save
is atomic (staging directory, manifest last, rename: see staging.py) and refuses to overwrite.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from workbench.common import LazyModule

torch = LazyModule("torch")  # imported on first use: the control plane detects snapshot kinds without tensors
_st = LazyModule("safetensors.torch")


def load_file(*args, **kwargs):
    return _st.load_file(*args, **kwargs)


def save_file(*args, **kwargs):
    return _st.save_file(*args, **kwargs)

from . import formats
from .delta_codec import DeltaError
from .formats import DeltaFormatError, read_tensors
from .manifest import read_manifest
from .staging import staged_checkpoint

BASE_FILE = "model.safetensors"
DELTA_FILE = formats.WORKBENCH_DELTA_FILE       # workbench_v1; arc_* deltas are formats.LIBRARY_DELTA_FILE
ADAPTER_FILE = "adapter_model.safetensors"

# Files copied from the base model's directory so a base/LoRA snapshot is a complete HF directory.
_TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "*.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json")

__all__ = ["DeltaError", "DeltaFormatError", "bf16_state", "save_sampler_base", "save_sampler_delta", "save_sampler_lora",
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
                       meta: dict, delta_format: str = formats.DEFAULT_DELTA_FORMAT) -> dict:
    """Write `weights_bf16` as a delta over `previous_bf16` (the snapshot named `previous_identity`, a
    sibling of `dest`) in `delta_format`. Returns the stats its manifest records (see module docstring)
    plus encode_seconds."""
    started = time.perf_counter()
    previous = read_manifest(Path(dest).parent / previous_identity) or {}
    if previous.get("snapshot_kind") == "delta":
        chain_length = int(previous.get("chain_length") or 0) + 1
        chain_base = previous.get("chain_base") or previous.get("base_identity")
    else:
        chain_length, chain_base = 1, previous_identity
    stats = None
    # The stats go into the manifest, which is written when the block exits: fill them in first.
    full_meta = _sampler_meta(meta, "delta", base_identity=previous_identity, chain_base=chain_base,
                              chain_length=chain_length, checksum_format=formats.CHECKSUM_FORMAT)
    with staged_checkpoint(dest, full_meta) as tmp:
        stats = formats.write_delta(tmp, weights_bf16, previous_bf16, previous_identity, delta_format)
        stats["changed_fraction"] = stats["changed_elements"] / max(1, stats["total_elements"])
        stats["ratio"] = stats["raw_bytes"] / max(1, stats["delta_bytes"])
        full_meta.update({k: v for k, v in stats.items() if k != "file"}, delta_file=stats["file"])
    stats["encode_seconds"] = time.perf_counter() - started
    stats.update(chain_length=chain_length, chain_base=chain_base)
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


def _weight_files(src: Path) -> list[Path]:
    return sorted(p for p in Path(src).glob("*.safetensors") if p.is_file() and p.name != ADAPTER_FILE)


def snapshot_kind(src: Path) -> str:
    """"base", "delta" or "lora", from the files in `src`. Raises ValueError if it is none of them.

    A safetensors file counts only if its header is readable and matches its size: a truncated or
    garbled model.safetensors is not a base.
    """
    src = Path(src)
    if (src / DELTA_FILE).is_file():
        return "delta"
    if (src / ADAPTER_FILE).is_file():
        formats.safetensors_header(src / ADAPTER_FILE)
        return "lora"
    if formats.library_delta_files(src):         # raises ValueError on an unreadable file
        return "delta"
    if (src / BASE_FILE).is_file() or _weight_files(src):
        return "base"
    raise ValueError(f"{src} is not a sampler snapshot (no {BASE_FILE}, {DELTA_FILE}, "
                     f"{formats.LIBRARY_DELTA_FILE} or {ADAPTER_FILE})")


def snapshot_identity(src: Path) -> str:
    """The identity deltas refer to: the manifest's name (the directory name if there is no manifest)."""
    meta = read_manifest(src) or {}
    return str(meta.get("name") or Path(src).name)


def delta_format_of(src: Path) -> str:
    """The format a delta snapshot was written in: its manifest's delta_format, else what its files are."""
    meta = read_manifest(src) or {}
    recorded = meta.get("delta_format")
    if recorded is None and meta.get("delta_format_version") == 1 and (Path(src) / DELTA_FILE).is_file():
        recorded = formats.WORKBENCH_DELTA_FORMAT          # written before formats were recorded
    return recorded if isinstance(recorded, str) else formats.sniff_delta_format(src)


def load_base_weights(src: Path, out: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights of a base snapshot (bf16 for workbench's own), keyed like bf16_state(); shards merged.

    `out`: bf16 tensors the caller no longer needs; those matching a tensor's name and shape are read
    into and returned in its place (formats.read_tensors)."""
    src = Path(src)
    files = _weight_files(src)
    if not files:
        raise ValueError(f"{src} is not a base snapshot (no {BASE_FILE})")
    return read_tensors(files, out=out)


def apply_delta(src: Path, current_bf16: dict, current_identity: str, compression_format: str | None = None,
                checksum_format: str | None = None, out: dict | None = None) -> dict:
    """NEW bf16 dict: the delta snapshot at `src` applied to `current_bf16` (the snapshot `current_identity`).

    `compression_format` / `checksum_format` are what the hot-load request named (None: not named);
    one that disagrees with the snapshot raises DeltaFormatError (http_status 400) naming both.
    Raises DeltaError if the delta was made against another snapshot, its files are missing,
    truncated or corrupted, or a tensor fails its checksum. `current_bf16` is never modified; `out`
    (tensors the caller no longer needs) may be overwritten with the result (formats.read_delta).
    """
    src = Path(src)
    name = snapshot_identity(src)
    try:
        recorded = delta_format_of(src)
    except DeltaError as e:
        raise DeltaError(f"{src} is not a readable delta snapshot: {e}") from e
    if compression_format is not None and compression_format != recorded:
        raise DeltaFormatError(f"incremental_snapshot_metadata.compression_format is {compression_format!r}, but "
                               f"snapshot {name!r} was written as {recorded!r}: hot-load it with "
                               f"compression_format={recorded!r}, or {formats.HOW_TO_CHOOSE}")
    if checksum_format is not None and checksum_format not in formats.CHECKSUM_FORMATS:
        raise DeltaFormatError(f"incremental_snapshot_metadata.checksum_format is {checksum_format!r}, but snapshot "
                               f"{name!r} carries {formats.CHECKSUM_FORMAT!r} checksums (the only kind every delta "
                               f"format uses): send checksum_format={formats.CHECKSUM_FORMAT!r}")
    base = (read_manifest(src) or {}).get("base_identity")
    if isinstance(base, str) and base != current_identity:
        raise DeltaError(f"delta applies to snapshot {base!r}, but the current weights are {current_identity!r}: "
                         "load that snapshot (or a full base) first")
    return formats.read_delta(src, current_bf16, recorded, current_identity, out=out)


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
        # A link may have been rewritten as a full copy of the same weights (a trainer re-saving an
        # unchanged delta as a base): its own weights are the link's content.
        weights = load_base_weights(link) if snapshot_kind(link) == "base" else apply_delta(link, weights, identity)
        identity = snapshot_identity(link)
    return weights
