"""The trainer's compute engine: one model, one optimizer, and the operations the Tinker surface runs.

`server.py` parses HTTP requests and calls these methods from ONE worker thread, in `seq_id` order, so
the engine itself is single-threaded and keeps no locks. Every method takes plain JSON-shaped dicts
(the request bodies of wire contract §7) and returns the JSON-shaped result of the future.

    engine = Engine(job_dir, JobConfig.load(job_dir / "job.json"), load_model(base_model), model_dir)
    created = engine.create_model({"base_model": ..., "lora_config": {"rank": 0}}, model_id="model-..")
    out = engine.forward_backward(created["model_id"], {"data": [...], "loss_fn": "cross_entropy"})
    engine.optim_step(created["model_id"], {"learning_rate": 1e-4, ...}, "num_loss_tokens")

Model state. A trainer job owns exactly one trainable model (full-parameter, or the base wrapped in
PEFT LoRA adapters when the job's `lora_rank` > 0) and one persistent `torch.optim.AdamW` over its
trainable parameters. Every `create_model` returns a new handle (`model_id`), but all training handles
share that model and optimizer: a client that reconnects continues from the same weights and moments.
`base_only` handles get a separate frozen copy of the base model (reference logprobs).

Errors. Anything wrong with what the caller sent raises `UserError` with a message naming the field
(e.g. `data[3].loss_fn_inputs.weights`); the server reports it as a `user` future error. Any other
exception (a failure inside torch) is reported as a `server` error.

Gradients accumulate across `forward_backward` calls until `optim_step`, which optionally normalizes
them by the loss tokens / sequences accumulated since the previous step, clips, steps and zeroes them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import losses

log = logging.getLogger("workbench.trainer.engine")

# Datums of equal length run together in one micro-batch (no padding, so the result is that of a
# plain batched torch step on the same rows). A positive WORKBENCH_TRAINER_EXACT_DATUMS makes requests
# of up to that many datums run datum by datum instead, matching a per-datum reference loop to float
# rounding (batching changes matmul blocking: ~1e-7 relative in gradients) at a large cost in speed:
# a batch of 16 x 128 tokens takes ~2x longer one row at a time on these CPUs.
DEFAULT_EXACT_MAX_DATUMS = 0
# Upper bound on the logits a micro-batch may materialize (B * T * V fp32 values): keeps the peak
# memory flat for large vocabularies.
_MAX_LOGIT_BYTES = 256 * 1024 * 1024
_MAX_BATCH_TOKENS = 16384

# Same rule the SDK applies client-side to checkpoint names (client.py:977-1018): a DNS label.
_NAME_SEGMENT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Job ids in cross_job:// references are resolved to directories: allow only safe characters.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_DEFAULT_LORA_ALPHA = 32
_NORMALIZATIONS = ("none", "num_loss_tokens", "num_sequences")
_SAMPLER_TYPES = ("base", "delta", "merged_base")


class UserError(ValueError):
    """The request is wrong (bad field, missing checkpoint, ...): reported with category "user"."""


@dataclass(frozen=True)
class JobConfig:
    """`DIR/job.json`, written by the control plane before it spawns the trainer."""

    job_id: str
    account: str
    base_model: str
    lora_rank: int
    learning_rate: float
    max_context_length: int | None
    home: Path

    @classmethod
    def load(cls, path: Path) -> "JobConfig":
        raw = json.loads(Path(path).read_text())
        max_ctx = raw.get("max_context_length")
        return cls(
            job_id=str(raw["job_id"]),
            account=str(raw.get("account") or ""),
            base_model=str(raw["base_model"]),
            lora_rank=int(raw.get("lora_rank") or 0),
            learning_rate=float(raw.get("learning_rate") or 1e-4),
            max_context_length=int(max_ctx) if max_ctx else None,
            home=Path(raw["home"]).expanduser() if raw.get("home") else Path(path).parent.parent.parent,
        )


@dataclass
class Handle:
    """One `model_id` returned by create_model; training handles all share the job's model."""

    model_id: str
    base_only: bool
    session_id: str | None
    created: float


@dataclass
class _Datum:
    index: int
    tokens: torch.Tensor                 # (T,) int64 model input
    inputs: dict[str, torch.Tensor]      # loss_fn_inputs, each shaped like target_tokens


def _tensor_data(t: torch.Tensor) -> dict:
    t = t.detach().to(torch.float32)
    return {"data": t.reshape(-1).tolist(), "dtype": "float32", "shape": list(t.shape)}


def _number(value: Any, field: str, *, low: float | None = None, high: float | None = None,
            high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{field} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and value < low:
        raise UserError(f"{field} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise UserError(f"{field} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def parse_tensor_data(value: Any, field: str, *, want_int: bool) -> torch.Tensor:
    """Wire TensorData (`{"data","dtype","shape"?}`, optionally CSR) -> a dense torch tensor.

    `want_int` selects int64 (token ids) versus float32 (everything else). Raises UserError naming
    `field` for anything malformed.
    """
    if not isinstance(value, dict):
        raise UserError(f"{field} must be a TensorData object {{data, dtype, shape}}, got {type(value).__name__}")
    extra = set(value) - {"data", "dtype", "shape", "sparse_crow_indices", "sparse_col_indices"}
    if extra:
        raise UserError(f"{field} has unknown TensorData keys {sorted(extra)}")
    dtype = value.get("dtype")
    if dtype not in ("int64", "float32"):
        raise UserError(f"{field}.dtype must be 'int64' or 'float32', got {dtype!r}")
    if want_int and dtype != "int64":
        raise UserError(f"{field}.dtype must be 'int64' (token ids), got {dtype!r}")
    data = value.get("data")
    if not isinstance(data, list):
        raise UserError(f"{field}.data must be a flat list of numbers")
    arr = np.asarray(data) if data else np.zeros(0, dtype=np.int64 if want_int else np.float32)
    if arr.ndim != 1 or arr.dtype.kind not in ("i", "u", "f"):
        raise UserError(f"{field}.data must be a flat list of numbers")
    if dtype == "int64" and arr.dtype.kind == "f":
        raise UserError(f"{field}.data holds non-integer values but dtype is 'int64'")
    if dtype == "float32" and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise UserError(f"{field}.data holds NaN or infinite values")
    shape = value.get("shape")
    if shape is not None and (not isinstance(shape, list)
                              or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise UserError(f"{field}.shape must be a list of non-negative integers, got {shape!r}")
    torch_dtype = torch.int64 if dtype == "int64" else torch.float32

    crow, col = value.get("sparse_crow_indices"), value.get("sparse_col_indices")
    if crow is not None or col is not None:
        if crow is None or col is None:
            raise UserError(f"{field}: sparse_crow_indices and sparse_col_indices must be given together")
        if shape is None or len(shape) != 2:
            raise UserError(f"{field}: a sparse CSR tensor needs a 2-D shape, got {shape!r}")
        rows, cols = shape
        try:
            crow_t = torch.as_tensor(crow, dtype=torch.int64)
            col_t = torch.as_tensor(col, dtype=torch.int64)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise UserError(f"{field}: sparse indices must be lists of integers") from None
        if (crow_t.dim() != 1 or col_t.dim() != 1 or len(crow_t) != rows + 1 or len(col_t) != len(arr)
                or (len(crow_t) and (crow_t[0] != 0 or crow_t[-1] != len(arr)))
                or bool((crow_t[1:] < crow_t[:-1]).any()) or bool(((col_t < 0) | (col_t >= cols)).any())):
            raise UserError(f"{field}: inconsistent CSR encoding (crow_indices needs {rows + 1} non-decreasing "
                            f"entries from 0 to nnz={len(arr)}; col_indices needs nnz entries in [0, {cols}))")
        dense = torch.zeros(rows, cols, dtype=torch_dtype)
        row_idx = torch.repeat_interleave(torch.arange(rows), crow_t[1:] - crow_t[:-1])
        dense[row_idx, col_t] = torch.as_tensor(arr).to(torch_dtype)
        return dense

    if shape is None:
        shape = [len(arr)]
    if int(np.prod(shape)) != len(arr):
        raise UserError(f"{field}: shape {shape} needs {int(np.prod(shape))} values, data has {len(arr)}")
    return torch.as_tensor(arr).to(torch_dtype).reshape(shape)


class Engine:
    """Owns the model, the optimizer, the step counter and the sampler-delta base; see module doc."""

    def __init__(self, job_dir: Path, job: JobConfig, model: torch.nn.Module, model_dir: Path | None = None,
                 base_loader: Callable[[], torch.nn.Module] | None = None,
                 exact_max_datums: int = DEFAULT_EXACT_MAX_DATUMS):
        self.job_dir = Path(job_dir)
        self.exact_max_datums = exact_max_datums
        self.job = job
        self.model_dir = model_dir
        self.base_model = model.eval()
        self._base_loader = base_loader
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        self.handles: dict[str, Handle] = {}
        self._handles_lock = threading.Lock()   # get_info / list run on the event loop, not the worker
        # Set by the first training create_model.
        self.train_model: torch.nn.Module | None = None
        self.lora_signature: dict | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self._frozen_base: torch.nn.Module | None = None
        self.step = 0
        # Accumulated since the last optim_step, for grad_accumulation_normalization.
        self.pending_loss_tokens = 0
        self.pending_sequences = 0
        # bf16 weights + identity of the last sampler snapshot this process wrote (delta base).
        self._last_sampler: tuple[dict, str] | None = None

    # ---- handles ---------------------------------------------------------------------------------
    @property
    def is_lora(self) -> bool:
        return self.job.lora_rank > 0

    def get_handle(self, model_id: str) -> Handle | None:
        with self._handles_lock:
            return self.handles.get(model_id)

    def _require(self, model_id: str, *, train: bool) -> tuple[Handle, torch.nn.Module]:
        handle = self.get_handle(model_id)
        if handle is None:
            raise UserError(f"model_id {model_id!r} is not loaded on this trainer (unloaded, or never created): "
                            "create a training client first")
        if handle.base_only:
            if train:
                raise UserError(f"model_id {model_id!r} is a base-only (frozen) model: it supports forward only")
            return handle, self._frozen_base
        return handle, self.train_model

    def create_model(self, body: dict, model_id: str) -> dict:
        """create_model (§7.5): validate against the job, build the model once, register a handle."""
        base_model = body.get("base_model")
        if base_model != self.job.base_model:
            raise UserError(f"base_model {base_model!r} does not match this trainer job's base_model "
                            f"{self.job.base_model!r}")
        base_only = bool(body.get("base_only"))
        if body.get("projection_head_dim") is not None:
            raise UserError("projection_head_dim is not supported by this trainer")
        if base_only:
            if self._frozen_base is None:
                self._frozen_base = self._load_frozen_base()
        else:
            lora = body.get("lora_config") or {}
            if not isinstance(lora, dict):
                raise UserError("lora_config must be an object")
            rank = lora.get("rank", 0)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise UserError(f"lora_config.rank must be a non-negative integer, got {rank!r}")
            if rank != self.job.lora_rank:
                raise UserError(f"lora_config.rank={rank} does not match this trainer job's lora_rank="
                                f"{self.job.lora_rank}: create the training client with lora_rank="
                                f"{self.job.lora_rank}")
            signature = self._lora_signature(lora)
            if self.train_model is None:
                self._build_train_model(signature)
            else:
                # Reconnecting to the existing model: its structure must match. seed / init_method only
                # shaped the initial adapter weights, which exist already, so they are not compared.
                diff = [f"lora_config.{k}={signature[k]!r} (model has {self.lora_signature[k]!r})"
                        for k in ("train_attn", "train_mlp", "train_unembed", "alpha")
                        if k in signature and signature[k] != self.lora_signature[k]]
                if diff:
                    raise UserError("this trainer's model was created with a different configuration: "
                                    + ", ".join(diff))
        with self._handles_lock:
            self.handles[model_id] = Handle(model_id, base_only, body.get("session_id"), time.time())
        log.info("create_model %s (base_only=%s, lora_rank=%d, step=%d)", model_id, base_only,
                 self.job.lora_rank, self.step)
        return {"type": "create_model", "model_id": model_id}

    def _lora_signature(self, lora: dict) -> dict:
        sig = {k: bool(lora.get(k, True)) for k in ("train_attn", "train_mlp", "train_unembed")}
        if self.is_lora:
            alpha = lora.get("alpha")
            sig["alpha"] = _DEFAULT_LORA_ALPHA if alpha is None else _number(alpha, "lora_config.alpha", low=0)
            sig["seed"] = lora.get("seed")
            init = lora.get("init_method") or "kaiming"
            if init not in ("kaiming", "gaussian"):
                raise UserError(f"lora_config.init_method={init!r} is not supported (supported: kaiming, gaussian)")
            sig["init_method"] = init
        return sig

    def _build_train_model(self, sig: dict) -> None:
        model = self.base_model
        if not self.is_lora:
            # Full-parameter: train everything except the parts the caller switched off.
            for name, p in model.named_parameters():
                p.requires_grad_(self._full_param_trainable(name, sig))
        else:
            from peft import LoraConfig, get_peft_model

            targets = list(_ATTN_MODULES if sig["train_attn"] else ()) + list(_MLP_MODULES if sig["train_mlp"] else ())
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in targets if t in present]
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            if not targets:
                raise UserError("lora_config needs train_attn or train_mlp: LoRA adapters go on the attention "
                                "and/or MLP projections (train_unembed alone has nothing to adapt)")
            kwargs: dict[str, Any] = {}
            if sig["train_unembed"]:
                # The unembedding becomes a trainable full copy saved with the adapter. With tied
                # embeddings PEFT keeps the input embedding tied to that copy (ensure_weight_tying),
                # so the model stays one consistent set of weights.
                kwargs["modules_to_save"] = ["lm_head"]
                if tied:
                    kwargs["ensure_weight_tying"] = True
            config = LoraConfig(r=self.job.lora_rank, lora_alpha=sig["alpha"], lora_dropout=0.0,
                                target_modules=targets, bias="none",
                                init_lora_weights=True if sig["init_method"] == "kaiming" else "gaussian",
                                **kwargs)
            seed = sig["seed"] if isinstance(sig["seed"], int) else 0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_peft_model(model, config)
        model.eval()   # no dropout in these models anyway; eval keeps forward deterministic
        self.train_model = model
        self.lora_signature = sig
        self.optimizer = self._new_optimizer()
        log.info("built %s model: %d trainable parameters", "LoRA" if self.is_lora else "full-parameter",
                 sum(p.numel() for p in self._trainable()))

    @staticmethod
    def _full_param_trainable(name: str, sig: dict) -> bool:
        if ".self_attn." in name:
            return sig["train_attn"]
        if ".mlp." in name:
            return sig["train_mlp"]
        if "embed_tokens" in name or "lm_head" in name:
            return sig["train_unembed"]
        return True

    def _load_frozen_base(self) -> torch.nn.Module:
        if self._base_loader is None:
            raise UserError("base_only models are not available on this trainer")
        model = self._base_loader().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.train_model.parameters() if p.requires_grad]

    def _new_optimizer(self) -> torch.optim.AdamW:
        # Hyperparameters are overwritten by every optim_step from its AdamParams.
        return torch.optim.AdamW(self._trainable(), lr=self.job.learning_rate)

    def unload_model(self, model_id: str) -> dict:
        with self._handles_lock:
            if self.handles.pop(model_id, None) is None:
                raise UserError(f"model_id {model_id!r} is not loaded on this trainer")
        log.info("unload_model %s", model_id)
        return {"type": "unload_model", "model_id": model_id}

    def get_info(self, model_id: str) -> dict:
        handle = self._require(model_id, train=False)[0]
        lora = self.is_lora and not handle.base_only
        return {"type": "get_info", "model_id": model_id,
                "model_data": {"model_name": self.job.base_model, "arch": self.arch,
                               "tokenizer_id": self.job.base_model},
                "is_lora": lora, "lora_rank": self.job.lora_rank if lora else None,
                "model_name": self.job.base_model}

    def capabilities(self) -> dict:
        return {"supported_models": [{"model_name": self.job.base_model,
                                      "max_context_length": self.job.max_context_length}]}

    # ---- forward / forward_backward --------------------------------------------------------------
    def forward(self, model_id: str, fwd_input: Any) -> dict:
        _, model = self._require(model_id, train=False)
        return self._run(model, fwd_input, "forward_input", backward=False)

    def forward_backward(self, model_id: str, fb_input: Any) -> dict:
        _, model = self._require(model_id, train=True)
        return self._run(model, fb_input, "forward_backward_input", backward=True)

    def _parse_input(self, body: Any, where: str) -> tuple[str, dict, list[_Datum]]:
        if not isinstance(body, dict):
            raise UserError(f"{where} must be an object with data and loss_fn")
        loss_fn = body.get("loss_fn")
        if loss_fn not in losses.SUPPORTED_LOSSES:
            raise UserError(f"{where}.loss_fn={loss_fn!r} is not supported by this trainer "
                            f"(supported: {', '.join(losses.SUPPORTED_LOSSES)})")
        try:
            config = losses.resolve_config(loss_fn, body.get("loss_fn_config"))
        except losses.LossConfigError as e:
            raise UserError(f"{where}.{e}") from None
        data = body.get("data")
        if not isinstance(data, list):
            raise UserError(f"{where}.data must be a list of datums")
        return loss_fn, config, [self._parse_datum(i, d, loss_fn) for i, d in enumerate(data)]

    def _parse_datum(self, i: int, datum: Any, loss_fn: str) -> _Datum:
        where = f"data[{i}]"
        if not isinstance(datum, dict):
            raise UserError(f"{where} must be an object with model_input and loss_fn_inputs")
        chunks = (datum.get("model_input") or {}).get("chunks") if isinstance(datum.get("model_input"), dict) else None
        if not isinstance(chunks, list) or not chunks:
            raise UserError(f"{where}.model_input.chunks must be a non-empty list")
        ids: list = []
        for j, chunk in enumerate(chunks):
            kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
            if kind != "encoded_text":
                raise UserError(f"{where}.model_input.chunks[{j}].type={kind!r} is not supported "
                                "(this trainer accepts encoded_text chunks only)")
            toks = chunk.get("tokens")
            if not isinstance(toks, list):
                raise UserError(f"{where}.model_input.chunks[{j}].tokens must be a list of token ids")
            ids.extend(toks)
        arr = np.asarray(ids)
        if arr.ndim != 1 or (len(arr) and arr.dtype.kind not in ("i", "u")):
            raise UserError(f"{where}.model_input tokens must be integers")
        if len(arr) == 0:
            raise UserError(f"{where}.model_input has no tokens")
        bad = np.nonzero((arr < 0) | (arr >= self.vocab_size))[0]
        if len(bad):
            raise UserError(f"{where}.model_input token {int(arr[bad[0]])} at position {int(bad[0])} is outside "
                            f"the vocabulary [0, {self.vocab_size})")
        max_ctx = self.job.max_context_length
        if max_ctx and len(arr) > max_ctx:
            raise UserError(f"{where}.model_input has {len(arr)} tokens, more than this trainer's "
                            f"max_context_length={max_ctx}")
        tokens = torch.as_tensor(arr, dtype=torch.int64)

        raw = datum.get("loss_fn_inputs")
        if not isinstance(raw, dict):
            raise UserError(f"{where}.loss_fn_inputs must be an object of TensorData")
        required, optional = losses.REQUIRED_INPUTS[loss_fn], losses.OPTIONAL_INPUTS[loss_fn]
        for key in required:
            if key not in raw:
                raise UserError(f"{where}.loss_fn_inputs.{key} is missing (loss_fn={loss_fn!r} requires "
                                f"{', '.join(required)})")
        inputs: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            field = f"{where}.loss_fn_inputs.{key}"
            if key not in required and key not in optional:
                raise UserError(f"{field} is not an input of loss_fn={loss_fn!r} "
                                f"(accepted: {', '.join(required + optional)})")
            inputs[key] = parse_tensor_data(value, field, want_int=key in losses.INT_INPUTS)
        targets = inputs["target_tokens"]
        if targets.dim() not in (1, 2) or targets.shape[0] != len(tokens):
            raise UserError(f"{where}.loss_fn_inputs.target_tokens has shape {list(targets.shape)} but "
                            f"{where}.model_input has {len(tokens)} tokens: target_tokens needs one row per "
                            "input token (position t predicts target t)")
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.vocab_size):
            bad_tok = int(targets[(targets < 0) | (targets >= self.vocab_size)][0])
            raise UserError(f"{where}.loss_fn_inputs.target_tokens holds token {bad_tok}, outside the "
                            f"vocabulary [0, {self.vocab_size})")
        for key, t in inputs.items():
            if key != "target_tokens" and t.shape != targets.shape:
                raise UserError(f"{where}.loss_fn_inputs.{key} has shape {list(t.shape)}, but target_tokens has "
                                f"shape {list(targets.shape)}: they must match")
        return _Datum(i, tokens, inputs)

    def _micro_batches(self, datums: list[_Datum]) -> list[list[_Datum]]:
        # Small requests: one datum per micro-batch (exact, see DEFAULT_EXACT_MAX_DATUMS). Large ones:
        # datums of equal length (and equal target layout) together, so a micro-batch needs no padding
        # and its targets stack into one gather; results agree with the per-datum ones to float rounding.
        if len(datums) <= self.exact_max_datums:
            return [[d] for d in datums]
        groups: dict[tuple, list[_Datum]] = {}
        for d in datums:
            groups.setdefault((len(d.tokens), tuple(d.inputs["target_tokens"].shape[1:])), []).append(d)
        max_tokens = max(1, min(_MAX_BATCH_TOKENS, _MAX_LOGIT_BYTES // (4 * self.vocab_size)))
        batches = []
        for (length, _), group in groups.items():
            per = max(1, max_tokens // length)
            batches.extend(group[k:k + per] for k in range(0, len(group), per))
        return batches

    def _run(self, model: torch.nn.Module, body: Any, where: str, *, backward: bool) -> dict:
        loss_fn, config, datums = self._parse_input(body, where)   # all validation before any compute
        outputs: list[dict | None] = [None] * len(datums)
        total_loss = 0.0
        loss_tokens = 0
        for batch in self._micro_batches(datums):
            ids = torch.stack([d.tokens for d in batch])
            targets = torch.stack([d.inputs["target_tokens"] for d in batch])
            with torch.set_grad_enabled(backward):
                logits = model(input_ids=ids, use_cache=False).logits
                # One log_softmax + gather for the whole micro-batch, then per-datum slices of the small
                # (B, T[, K]) result: slicing the (B, T, V) logits per datum would make backward
                # materialize a full-size zero gradient for every datum.
                lp_batch = losses.target_logprobs(logits, targets)
                del logits
                batch_loss = None
                for row, d in enumerate(batch):
                    lp = lp_batch[row]
                    elementwise = losses.compute_loss(loss_fn, lp, d.inputs, config)
                    datum_loss = elementwise.sum()
                    batch_loss = datum_loss if batch_loss is None else batch_loss + datum_loss
                    outputs[d.index] = {"logprobs": _tensor_data(lp), "elementwise_loss": _tensor_data(elementwise)}
                    loss_tokens += losses.loss_token_count(d.inputs)
                if backward and batch_loss.requires_grad:
                    batch_loss.backward()
            total_loss += float(batch_loss.detach())
        if backward:
            self.pending_loss_tokens += loss_tokens
            self.pending_sequences += len(datums)
        return {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": outputs,
                "metrics": {"loss:sum": total_loss, "num_loss_tokens:sum": float(loss_tokens),
                            "num_sequences:sum": float(len(datums))}}

    # ---- optim_step ------------------------------------------------------------------------------
    def optim_step(self, model_id: str, adam: Any, normalization: Any = None) -> dict:
        self._require(model_id, train=True)
        if not isinstance(adam, dict):
            raise UserError("adam_params must be an object")
        lr = _number(adam.get("learning_rate", 1e-4), "adam_params.learning_rate", low=0)
        beta1 = _number(adam.get("beta1", 0.9), "adam_params.beta1", low=0, high=1, high_open=True)
        beta2 = _number(adam.get("beta2", 0.95), "adam_params.beta2", low=0, high=1, high_open=True)
        eps = _number(adam.get("eps", 1e-12), "adam_params.eps", low=0)
        weight_decay = _number(adam.get("weight_decay", 0.0), "adam_params.weight_decay", low=0)
        clip = _number(adam.get("grad_clip_norm", 0.0) or 0.0, "adam_params.grad_clip_norm", low=0)
        emit = adam.get("emit_grad_norm_metrics")
        if normalization is None:
            normalization = "none"
        if normalization not in _NORMALIZATIONS:
            raise UserError(f"grad_accumulation_normalization={normalization!r} is not one of "
                            f"{', '.join(_NORMALIZATIONS)}")

        params = self._trainable()
        grads = [p.grad for p in params if p.grad is not None]
        divisor = {"num_loss_tokens": self.pending_loss_tokens, "num_sequences": self.pending_sequences}.get(
            normalization, 0)
        if divisor > 0:
            for g in grads:
                g.div_(divisor)
        metrics: dict[str, float] = {"learning_rate:mean": lr}
        if grads:
            # Norm after normalization, before clipping: what clipping compares against.
            total_norm = torch.nn.utils.get_total_norm(grads)
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, clip, total_norm)
            if emit not in (False, "off"):
                metrics["grad_norm:mean"] = float(total_norm)
        for group in self.optimizer.param_groups:
            group.update(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        log.info("optim_step %d (lr=%g, normalization=%s over %d, grads=%d)", self.step, lr, normalization,
                 divisor, len(grads))
        self.pending_loss_tokens = 0
        self.pending_sequences = 0
        return {"metrics": metrics}

    def _reset_accumulation(self) -> None:
        if self.train_model is not None:
            self.train_model.zero_grad(set_to_none=True)
        self.pending_loss_tokens = 0
        self.pending_sequences = 0

    # ---- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    @property
    def sampler_dir(self) -> Path:
        return self.job_dir / "sampler"

    def _meta(self, name: str, kind: str) -> dict:
        # created_time: float epoch seconds, the manifest convention of workbench.checkpoints.
        return {"name": name, "kind": kind, "created_time": time.time(), "expire_time": None,
                "base_model": self.job.base_model, "lora_rank": self.job.lora_rank, "step": self.step}

    @staticmethod
    def _validate_name(name: Any, field: str) -> str:
        from workbench import checkpoints as ckpt

        if not isinstance(name, str) or not name:
            raise UserError(f"{field} must be a non-empty checkpoint name")
        try:
            ckpt.validate_checkpoint_name(name, field)
        except ValueError as e:
            raise UserError(str(e)) from None
        return name

    def save_weights(self, model_id: str, path: Any) -> dict:
        """save_state: the full train state (weights + optimizer) as `DIR/checkpoints/<path>/`."""
        from workbench import checkpoints as ckpt

        self._require(model_id, train=True)
        name = self._validate_name(path, "path")
        dest = self.checkpoints_dir / name
        if dest.exists():
            raise UserError(f"path: checkpoint {name!r} already exists in this job; choose a new name")
        ckpt.save_train_state(dest, self.train_model, self.optimizer, self._meta(name, "train_state"))
        log.info("save_weights %s (step %d)", name, self.step)
        return {"type": "save_weights", "path": name}

    def resolve_train_state(self, path: Any) -> Path:
        """A load_weights `path` -> its checkpoint directory (bare name, or cross_job://<job>/<name>)."""
        if not isinstance(path, str) or not path:
            raise UserError("path must be a non-empty checkpoint reference")
        if path.startswith("cross_job://"):
            job_id, _, name = path[len("cross_job://"):].partition("/")
            if not _JOB_ID.match(job_id) or not _NAME_SEGMENT.match(name):
                raise UserError(f"path {path!r} must look like cross_job://<job_id>/<checkpoint-name>")
            root = (self.checkpoints_dir if job_id == self.job.job_id
                    else self.job.home / "jobs" / job_id / "checkpoints")
        else:
            if not _NAME_SEGMENT.match(path):
                raise UserError(f"path {path!r} is not a checkpoint name of this job (a lowercase DNS label) "
                                "nor a cross_job://<job_id>/<name> reference")
            root, name = self.checkpoints_dir, path
        src = root / name
        if not src.is_dir():
            raise UserError(f"path {path!r}: checkpoint not found ({src} does not exist)")
        return src

    def load_weights(self, model_id: str, path: Any, optimizer: Any) -> dict:
        """load_state / load_state_with_optimizer; optimizer=false resets the optimizer state."""
        from workbench import checkpoints as ckpt

        from workbench.checkpoints.manifest import read_manifest

        self._require(model_id, train=True)
        src = self.resolve_train_state(path)
        meta = read_manifest(src)
        if meta is None or meta.get("kind") != "train_state":
            raise UserError(f"path {path!r}: {src} is not a committed train-state checkpoint")
        if meta.get("base_model") != self.job.base_model or int(meta.get("lora_rank") or 0) != self.job.lora_rank:
            raise UserError(f"path {path!r} holds {meta.get('base_model')!r} with lora_rank={meta.get('lora_rank')}; "
                            f"this trainer trains {self.job.base_model!r} with lora_rank={self.job.lora_rank}")
        with_optimizer = bool(optimizer)
        self._reset_accumulation()
        try:
            ckpt.load_train_state(src, self.train_model, self.optimizer if with_optimizer else None)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise UserError(f"path {path!r}: cannot load this checkpoint into this trainer: {e}") from None
        if not with_optimizer:
            self.optimizer = self._new_optimizer()   # load_state: weights only, optimizer state reset
        if src.parent == self.checkpoints_dir and isinstance(meta.get("step"), int):
            # Resuming this job: continue its step count. A cross-job load starts this job's own history.
            self.step = meta["step"]
        log.info("load_weights %s (optimizer=%s, step now %d)", path, with_optimizer, self.step)
        return {"type": "load_weights", "path": path}

    def list_checkpoints(self) -> list[str]:
        """Names of this job's committed train states (manifest present), oldest first."""
        from workbench.checkpoints.manifest import read_manifest

        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for d in self.checkpoints_dir.iterdir():
            if d.name.startswith(".") or not d.is_dir():   # staging leftovers are never checkpoints
                continue
            meta = read_manifest(d)
            if meta is not None and meta.get("kind") == "train_state":
                created = meta.get("created_time")
                found.append((created if isinstance(created, (int, float)) else 0.0, d.name))
        return [name for _, name in sorted(found)]

    def save_weights_for_sampler(self, model_id: str, path: Any, checkpoint_type: Any) -> dict:
        """A sampler snapshot `DIR/sampler/<path>/`: HF base, XOR delta over the last one, or LoRA adapter."""
        from workbench import checkpoints as ckpt

        self._require(model_id, train=True)
        name = self._validate_name(path, "path")
        ctype = "base" if checkpoint_type is None else checkpoint_type
        if ctype not in _SAMPLER_TYPES:
            raise UserError(f"checkpoint_type={checkpoint_type!r} is not one of {', '.join(_SAMPLER_TYPES)}")
        dest = self.sampler_dir / name
        if dest.exists():
            raise UserError(f"path: sampler snapshot {name!r} already exists in this job")
        meta = self._meta(name, "sampler")
        if self.is_lora and ctype != "merged_base":
            # LoRA snapshots always hold the whole adapter, whatever type was asked for.
            ckpt.save_sampler_lora(dest, self.train_model, self.model_dir, meta)
            written = "lora"
        else:
            if self.is_lora:   # merged_base: fold the adapter into a copy of the base, export that
                weights = ckpt.bf16_state(copy.deepcopy(self.train_model).merge_and_unload())
            else:
                weights = ckpt.bf16_state(self.train_model)
            if ctype == "delta" and self._last_sampler is not None and not self.is_lora:
                prev_weights, prev_identity = self._last_sampler
                ckpt.save_sampler_delta(dest, weights, prev_weights, prev_identity, meta)
                written = f"delta over {prev_identity}"
            else:
                # No previous snapshot in this process: a delta has nothing to be relative to, so the
                # snapshot is written as a full base (and its row honestly shows BASE).
                ckpt.save_sampler_base(dest, weights, self.model_dir, meta)
                written = "base"
            if not self.is_lora:
                self._last_sampler = (weights, name)
        log.info("save_weights_for_sampler %s (%s requested, wrote %s, step %d)", name, ctype, written, self.step)
        return {"type": "save_weights_for_sampler", "path": name}

    def load_adapter(self, model_id: str, adapter_path: Any) -> dict:
        """Load PEFT adapter weights (weights only) into the LoRA model; the optimizer starts fresh."""
        self._require(model_id, train=True)
        if not self.is_lora:
            raise UserError("load_adapter needs a LoRA trainer (this job has lora_rank=0)")
        if not isinstance(adapter_path, str) or not adapter_path.strip():
            raise UserError("adapter_path must be a non-empty string")
        directory = self._resolve_adapter(adapter_path.strip())
        cfg_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
        if not cfg_file.exists() or not weights_file.exists():
            raise UserError(f"adapter_path {adapter_path!r}: {directory} is not a PEFT adapter directory "
                            "(needs adapter_config.json and adapter_model.safetensors)")
        config = json.loads(cfg_file.read_text())
        if int(config.get("r", -1)) != self.job.lora_rank:
            raise UserError(f"adapter_path {adapter_path!r} has LoRA rank {config.get('r')}, this trainer has "
                            f"lora_rank={self.job.lora_rank}")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(weights_file))
        result = set_peft_model_state_dict(self.train_model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise UserError(f"adapter_path {adapter_path!r} holds tensors this model does not have: {unexpected[:5]}")
        self._reset_accumulation()
        self.optimizer = self._new_optimizer()
        log.info("load_adapter %s from %s", adapter_path, directory)
        return {"type": "load_adapter", "model_id": model_id, "adapter_path": adapter_path}

    def _resolve_adapter(self, adapter_path: str) -> Path:
        parts = adapter_path.split("/")
        if len(parts) == 4 and parts[0] == "accounts" and parts[2] == "models":
            if not all(_JOB_ID.match(p) for p in parts):
                raise UserError(f"adapter_path {adapter_path!r} is not a valid model name")
            directory = self.job.home / "models" / parts[1] / parts[3]
        elif adapter_path.startswith("/"):
            directory = Path(adapter_path)
        else:
            raise UserError(f"adapter_path {adapter_path!r} must be a model name accounts/<a>/models/<id> or an "
                            "absolute local directory")
        if not directory.is_dir():
            raise UserError(f"adapter_path {adapter_path!r}: not found ({directory} does not exist)")
        return directory
