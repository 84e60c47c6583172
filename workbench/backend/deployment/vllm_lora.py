"""PEFT adapter snapshots on vLLM: a LoRA trainer's sampler save, made servable by vLLM's LoRA support.

    adapter = prepare_adapter(snapshot_dir, out_dir, param_shapes, tied_embeddings=True, max_lora_rank=64)
    adapter.path    # out_dir: the adapter as vLLM loads it (LoRARequest(lora_path=adapter.path))
    adapter.full    # {base parameter name: tensor} the adapter replaces whole (PEFT modules_to_save)
    adapter.tensors # every tensor of the snapshot (the replica refuses non-finite ones)

Runs in the vLLM replica process (vLLM's environment: torch, safetensors, vllm; no peft). What a LoRA
trainer saves (`checkpoints.sampler.save_sampler_lora`): `adapter_config.json` + `adapter_model.safetensors`
(bf16), low-rank A/B pairs for the attention/MLP projections, and - when the trainer trains the
unembedding (`train_unembed`, its default) - whole copies of `lm_head` / `embed_tokens`
(PEFT `modules_to_save`; with tied embeddings PEFT saves both names, one value).

vLLM 0.32 serves the low-rank part (its CPU backend too: `PunicaWrapperCPU`), but refuses
`modules_to_save` other than a classifier head (`PEFTHelper._validate_features`). So an adapter is split:
the A/B pairs are written to `out_dir` as an adapter vLLM accepts (the same config without
`modules_to_save`), and the whole modules are returned in `full`, for the replica to push into the base
weights with the existing in-place reload before it activates the adapter. Together that is exactly
the model PEFT builds from the snapshot (`PeftModel.from_pretrained(base, snapshot)`).

Everything vLLM would refuse later is refused here first, with HTTP 422 and the reason (vLLM's own
`PEFTHelper` feature and rank checks, names and shapes against the base model, non-finite values), so
a bad adapter never reaches the engine and nothing is written for it.
"""

from __future__ import annotations

import json
import os
import shutil
import types
from dataclasses import dataclass, field
from pathlib import Path

from .replica import HotloadError
from .weights import check_finite

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class PreparedAdapter:
    path: Path
    """The adapter directory vLLM loads (low-rank tensors only)."""
    rank: int
    full: dict = field(default_factory=dict)
    """Base parameter name -> tensor, for modules the adapter replaces whole (modules_to_save)."""
    tensors: dict = field(default_factory=dict)
    """Every tensor of the snapshot's adapter file, by its name there."""


def prepare_adapter(src: Path, out_dir: Path, param_shapes: dict[str, tuple], tied_embeddings: bool,
                    max_lora_rank: int) -> PreparedAdapter:
    """Validate the PEFT adapter in `src` against the base model and write vLLM's copy to `out_dir`
    (atomically: a temp dir renamed into place). Raises HotloadError(422) naming what does not fit."""
    from safetensors.torch import load_file, save_file

    src = Path(src)
    try:
        config = json.loads((src / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(src / ADAPTER_FILE))
    except (OSError, ValueError) as e:
        raise HotloadError(422, f"{src.name}: not a readable PEFT adapter ({type(e).__name__}: {e})")
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise HotloadError(422, f"{src.name}: adapter_config.json is not a LoRA adapter config")
    saved = [m for m in (config.get("modules_to_save") or [])]
    vllm_config = {k: v for k, v in config.items() if k != "modules_to_save"}
    _check_with_vllm(src.name, vllm_config, max_lora_rank)
    rank = int(config["r"])

    low_rank, full = {}, {}
    for name, t in tensors.items():
        if ".lora_A." in name or ".lora_B." in name:
            low_rank[name] = t
        else:
            full[name.removeprefix(_PREFIX)] = t
    if not low_rank:
        raise HotloadError(422, f"{src.name}: the adapter has no LoRA (lora_A/lora_B) tensors")
    check_finite(tensors, src.name)
    _check_low_rank(src.name, low_rank, param_shapes, rank, config)
    full = _check_full(src.name, full, saved, param_shapes, tied_embeddings)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(vllm_config, indent=1))
        save_file({k: v.contiguous() for k, v in low_rank.items()}, str(tmp / ADAPTER_FILE),
                  metadata={"format": "pt"})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedAdapter(out_dir, rank, full, tensors)


def _check_with_vllm(name: str, config: dict, max_lora_rank: int) -> None:
    """vLLM's own adapter checks (supported PEFT features, rank <= max_lora_rank), before the engine
    sees the adapter: the same messages vLLM would raise from its worker, as a 422."""
    from vllm.lora.peft_helper import PEFTHelper

    try:
        helper = PEFTHelper.from_dict(dict(config))
        helper.validate_legal(types.SimpleNamespace(max_lora_rank=max_lora_rank))
    except (ValueError, TypeError) as e:
        hint = (" (raise WORKBENCH_VLLM_MAX_LORA_RANK for this deployment)" if "max_lora_rank" in str(e) else "")
        raise HotloadError(422, f"{name}: vLLM cannot serve this adapter: {e}{hint}")


def _check_low_rank(name: str, tensors: dict, param_shapes: dict, rank: int, config: dict) -> None:
    """Each A/B pair names a linear weight of the base model and has its shape: A (r, in), B (out, r)."""
    patterns = config.get("rank_pattern") or {}
    bad = []
    for key, t in tensors.items():
        module, ab = key.removeprefix(_PREFIX).rsplit(".lora_", 1)
        base = param_shapes.get(module + ".weight")
        if base is None or len(base) != 2 or t.dim() != 2:
            bad.append(f"{key}: no linear weight {module}.weight in the base model")
            continue
        out_features, in_features = base
        r = t.shape[0] if ab.startswith("A") else t.shape[1]
        want = (r, in_features) if ab.startswith("A") else (out_features, r)
        if tuple(t.shape) != want or (not patterns and r != rank):
            bad.append(f"{key}: shape {tuple(t.shape)}, expected {(rank, in_features) if ab.startswith('A') else (out_features, rank)}")
    if bad:
        raise HotloadError(422, f"{name}: adapter does not fit the base model: {'; '.join(bad[:5])}")


def _check_full(name: str, full: dict, saved: list, param_shapes: dict, tied: bool) -> dict:
    """The whole-module tensors (modules_to_save) as base parameter names, checked against the base.

    With tied embeddings the base has one tensor for `model.embed_tokens.weight` and `lm_head.weight`
    (vLLM loads only the former); PEFT's `ensure_weight_tying` saves both with one value, so the copy
    of `lm_head` is dropped when it equals the embedding, and refused when it does not (a tied model
    cannot hold two different matrices there)."""
    import torch

    out, bad = {}, []
    for key, t in full.items():
        if key in param_shapes:
            if tuple(t.shape) != tuple(param_shapes[key]):
                bad.append(f"{key}: shape {tuple(t.shape)} vs {tuple(param_shapes[key])}")
            out[key] = t
        elif tied and key == "lm_head.weight":
            continue
        else:
            bad.append(f"{key}: not a parameter of the base model")
    if tied and "lm_head.weight" in full:
        embed = full.get("model.embed_tokens.weight")
        if embed is None or not torch.equal(embed, full["lm_head.weight"]):
            bad.append("lm_head.weight differs from model.embed_tokens.weight, but the base model ties them")
    if bad:
        raise HotloadError(422, f"{name}: adapter modules_to_save {saved} do not fit the base model: "
                                f"{'; '.join(bad[:5])}")
    return out
