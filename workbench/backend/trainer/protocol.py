"""The trainer's wire protocol: request parsing/validation into typed objects, and the backend seam.

    from workbench.backend.trainer import protocol as p
    fb = p.parse_forward_input(body["forward_backward_input"], "forward_backward_input", backend.limits)
    out = backend.forward_backward(model_id, fb)          # any TrainerBackend

Everything a client sends is checked here, before any compute, and turned into frozen dataclasses
(`ForwardInput` of `Datum`s with its `LossSpec`, `AdamStep`, `CreateModel`, checkpoint names). Anything
wrong raises `UserError` with a message naming the field (e.g. `data[3].loss_fn_inputs.weights`); the
server reports it as a `user` future error. `TrainerBackend` is the whole surface the HTTP server
(`server.py`) and its futures queue use; `local_torch.LocalTorchTrainer` is the single-process torch
implementation. A backend receives only validated objects and returns the JSON-shaped result of the
future (wire contract §7); it raises `UserError` for requests that are wrong for *its* state (unknown
model_id, checkpoint not found, name in use by a live dependant) and anything else for its own failures.

Names. Train-state names (save_state / load_state) are DNS labels, the rule the SDK applies when it
sends a load path (client.py `_validate_checkpoint_ref`), so a state that saves can be loaded again.
Sampler snapshot names are not checked by the SDK (seed 003 saves `step_{step:05d}`): they only have
to be one safe path segment (`SAMPLER_NAME_RE`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from workbench.common import RESOURCE_ID_RE, is_resource_id

from . import losses

NORMALIZATIONS = ("none", "num_loss_tokens", "num_sequences")
SAMPLER_TYPES = ("base", "delta", "merged_base")
# Train states: the SDK's own rule for checkpoint path segments, a DNS label (= a resource id's rule).
STATE_NAME_RE = RESOURCE_ID_RE
# Sampler snapshots: one path segment that cannot be '.', '..' or hidden; the SDK appends a session
# suffix (`-<12 hex>`) to names from save_weights_for_sampler_ext, hence the generous length.
SAMPLER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
# Upper bound on the values one loss_fn_inputs tensor may hold once dense (checked from its declared
# shape, before anything is allocated): a 444-byte sparse request must not allocate gigabytes.
MAX_TENSOR_ELEMENTS = 1 << 24
_DEFAULT_LORA_ALPHA = 32


class UserError(ValueError):
    """The request is wrong (bad field, missing checkpoint, ...): reported with category "user"."""


class TrainerCannotContinue(Exception):
    """Raised by a backend whose state can no longer be trusted (a lost rank, a half-applied step):
    the operation's future fails, every later one too, and the trainer process exits non-zero."""


def describe_failure(exc: BaseException) -> str:
    """`Type: message` of an exception, looking through torch.distributed.checkpoint's
    CheckpointException (its own text is only "ranks: ..."; the cause is in its per-rank failures)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        cause = cause[0] if isinstance(cause, tuple) and cause else cause
        if isinstance(cause, BaseException):
            return f"{type(exc).__name__}: {type(cause).__name__}: {str(cause).strip()}"
    return f"{type(exc).__name__}: {str(exc).strip()}"


# ---- typed requests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelLimits:
    """What request validation needs to know about the backend's model."""

    vocab_size: int
    """Token ids (inputs and targets) must lie in [0, vocab_size)."""
    max_context_length: int | None
    """Most tokens one datum's model_input may hold; None = unlimited."""


@dataclass(frozen=True)
class Datum:
    """One validated datum: model input tokens and its loss inputs, all shaped like target_tokens."""

    index: int
    """Position in the request's `data` list (errors and results are reported by it)."""
    tokens: torch.Tensor
    """(T,) int64 model input."""
    inputs: dict[str, torch.Tensor]
    """The loss's inputs only (keys the loss does not use are dropped), each shaped like target_tokens."""


@dataclass(frozen=True)
class ForwardInput:
    """A forward / forward_backward input: datums plus the loss they are scored with."""

    loss: losses.LossSpec
    """The registry entry of `loss_fn`."""
    config: dict[str, float]
    """The loss's config defaults overlaid with the request's loss_fn_config."""
    data: list[Datum]

    @property
    def loss_fn(self) -> str:
        return self.loss.name


@dataclass(frozen=True)
class AdamStep:
    """optim_step: AdamW hyperparameters (applied to every step) and the accumulation normalization."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the total gradient norm to this (0 = no clipping)."""
    emit_grad_norm: bool = True
    """Report `grad_norm:mean` in the step's metrics."""
    normalization: str = "none"
    """Divide accumulated gradients by: "none", "num_loss_tokens" or "num_sequences" since the last step."""


@dataclass(frozen=True)
class LoraSpec:
    """create_model's lora_config (alpha / seed / init_method only matter when rank > 0)."""

    rank: int
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    alpha: float = _DEFAULT_LORA_ALPHA
    seed: int | None = None
    init_method: str = "kaiming"


@dataclass(frozen=True)
class CreateModel:
    base_model: Any
    """As sent; the backend compares it with its job's base model."""
    base_only: bool
    """A frozen copy of the base model (reference logprobs), forward only."""
    lora: LoraSpec
    session_id: str | None = None


@dataclass(frozen=True)
class TrainStateRef:
    """A load_state path: a train state of this job (job_id None) or of another job (cross_job://)."""

    name: str
    job_id: str | None = None
    raw: str = ""
    """The path as the client sent it (echoed in results and errors)."""


@dataclass(frozen=True)
class SamplerSave:
    name: str
    checkpoint_type: str
    """"base", "delta" or "merged_base" (None on the wire means "base")."""


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
    delta_format: str = "arc_v2"
    """Format of the sampler deltas this job writes (workbench.checkpoints.formats; chosen at job creation)."""

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
            delta_format=str(raw.get("delta_format") or "arc_v2"),
        )


# ---- the backend seam ---------------------------------------------------------------------------------
@runtime_checkable
class TrainerBackend(Protocol):
    """Everything server.py needs from a trainer engine; this protocol is the whole of that surface.

    Training operations (create_model .. load_adapter) are called from ONE worker thread, in seq_id
    order, so an implementation needs no locks for them. `has_model`, `get_info`, `capabilities` and
    `list_checkpoints` are called from the event loop (or a thread of it) concurrently with the
    worker and must be safe there. Results are the JSON-shaped future results of wire contract §7.
    """

    @property
    def limits(self) -> ModelLimits: ...

    def has_model(self, model_id: str) -> bool: ...

    def create_model(self, model_id: str, request: CreateModel) -> dict: ...

    def unload_model(self, model_id: str) -> dict: ...

    def get_info(self, model_id: str) -> dict:
        """Raises UserError for an unknown model_id (answered 404)."""
        ...

    def capabilities(self) -> dict: ...

    def forward(self, model_id: str, request: ForwardInput) -> dict: ...

    def forward_backward(self, model_id: str, request: ForwardInput) -> dict: ...

    def optim_step(self, model_id: str, request: AdamStep) -> dict: ...

    def save_state(self, model_id: str, name: str) -> dict: ...

    def load_state(self, model_id: str, ref: TrainStateRef, with_optimizer: bool) -> dict: ...

    def save_sampler(self, model_id: str, request: SamplerSave) -> dict: ...

    def load_adapter(self, model_id: str, adapter_path: str) -> dict: ...

    def list_checkpoints(self) -> list[str]: ...

    def close(self) -> None:
        """Release resources at shutdown (process groups, file handles); idempotent."""
        ...


# ---- scalars --------------------------------------------------------------------------------------------
def number(value: Any, field: str, *, low: float | None = None, high: float | None = None,
           high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{field} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and value < low:
        raise UserError(f"{field} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise UserError(f"{field} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _as_array(data: list, field: str) -> np.ndarray:
    try:
        return np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"{field} must be a flat list of numbers") from None


def _shape(shape: Any, field: str) -> list[int] | None:
    if shape is not None and (not isinstance(shape, list)
                              or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise UserError(f"{field}.shape must be a list of non-negative integers, got {shape!r}")
    # math.prod on Python ints: numpy's product would silently wrap around at 2**64.
    if shape is not None and math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise UserError(f"{field}.shape {shape} holds {math.prod(shape)} values, more than this trainer's "
                        f"limit of {MAX_TENSOR_ELEMENTS} per tensor")
    return shape


def parse_tensor_data(value: Any, field: str, *, want_int: bool) -> torch.Tensor:
    """Wire TensorData (`{"data","dtype","shape"?}`, optionally CSR) -> a dense torch tensor.

    `want_int` selects int64 (token ids) versus float32 (everything else). Raises UserError naming
    `field` for anything malformed, for values that are not finite in float32, and for shapes over
    MAX_TENSOR_ELEMENTS (checked before anything is densified).
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
    arr = _as_array(data, f"{field}.data") if data else np.zeros(0, dtype=np.int64 if want_int else np.float32)
    if arr.ndim != 1 or arr.dtype.kind not in ("i", "u", "f"):
        raise UserError(f"{field}.data must be a flat list of numbers")
    if dtype == "int64" and arr.dtype.kind == "f":
        raise UserError(f"{field}.data holds non-integer values but dtype is 'int64'")
    if dtype == "float32":
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32)
        bad = np.nonzero(~np.isfinite(arr))[0]
        if len(bad):
            raise UserError(f"{field}.data holds NaN or infinite values (as float32): {data[int(bad[0])]!r} "
                            f"at index {int(bad[0])}")
    shape = _shape(value.get("shape"), field)
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
    if math.prod(shape) != len(arr):
        raise UserError(f"{field}: shape {shape} needs {math.prod(shape)} values, data has {len(arr)}")
    return torch.as_tensor(arr).to(torch_dtype).reshape(shape)


# ---- forward / forward_backward ----------------------------------------------------------------------
def parse_forward_input(body: Any, where: str, limits: ModelLimits) -> ForwardInput:
    """`forward_input` / `forward_backward_input` -> ForwardInput; `where` names the field in errors."""
    if not isinstance(body, dict):
        raise UserError(f"{where} must be an object with data and loss_fn")
    loss_fn = body.get("loss_fn")
    spec = losses.LOSSES.get(loss_fn) if isinstance(loss_fn, str) else None
    if spec is None:
        raise UserError(f"{where}.loss_fn={loss_fn!r} is not supported by this trainer "
                        f"(supported: {', '.join(losses.supported_losses())})")
    config_raw = body.get("loss_fn_config")
    if config_raw is not None and not isinstance(config_raw, dict):
        raise UserError(f"{where}.loss_fn_config must be an object")
    try:
        config = losses.resolve_config(loss_fn, config_raw)
    except losses.LossConfigError as e:
        raise UserError(f"{where}.{e}") from None
    data = body.get("data")
    if not isinstance(data, list):
        raise UserError(f"{where}.data must be a list of datums")
    return ForwardInput(spec, config, [parse_datum(i, d, spec, limits) for i, d in enumerate(data)])


def parse_datum(i: int, datum: Any, spec: losses.LossSpec, limits: ModelLimits) -> Datum:
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
    arr = _as_array(ids, f"{where}.model_input tokens")
    if arr.ndim != 1 or (len(arr) and arr.dtype.kind not in ("i", "u")):
        raise UserError(f"{where}.model_input tokens must be integers")
    if len(arr) == 0:
        raise UserError(f"{where}.model_input has no tokens")
    bad = np.nonzero((arr < 0) | (arr >= limits.vocab_size))[0]
    if len(bad):
        raise UserError(f"{where}.model_input token {int(arr[bad[0]])} at position {int(bad[0])} is outside "
                        f"the vocabulary [0, {limits.vocab_size})")
    max_ctx = limits.max_context_length
    if max_ctx and len(arr) > max_ctx:
        raise UserError(f"{where}.model_input has {len(arr)} tokens, more than this trainer's "
                        f"max_context_length={max_ctx}")
    tokens = torch.as_tensor(arr, dtype=torch.int64)

    raw = datum.get("loss_fn_inputs")
    if not isinstance(raw, dict):
        raise UserError(f"{where}.loss_fn_inputs must be an object of TensorData")
    for key in spec.required:
        if key not in raw:
            raise UserError(f"{where}.loss_fn_inputs.{key} is missing (loss_fn={spec.name!r} requires "
                            f"{', '.join(spec.required)})")
    # Keys this loss does not use are ignored, unparsed (the service accepts them too).
    inputs = {key: parse_tensor_data(raw[key], f"{where}.loss_fn_inputs.{key}", want_int=key in spec.int_inputs)
              for key in spec.inputs if key in raw}
    targets = inputs["target_tokens"]
    if targets.dim() not in (1, 2) or targets.shape[0] != len(tokens):
        raise UserError(f"{where}.loss_fn_inputs.target_tokens has shape {list(targets.shape)} but "
                        f"{where}.model_input has {len(tokens)} tokens: target_tokens needs one row per "
                        "input token (position t predicts target t)")
    if targets.numel() and (targets.min() < 0 or targets.max() >= limits.vocab_size):
        bad_tok = int(targets[(targets < 0) | (targets >= limits.vocab_size)][0])
        raise UserError(f"{where}.loss_fn_inputs.target_tokens holds token {bad_tok}, outside the "
                        f"vocabulary [0, {limits.vocab_size})")
    for key, t in inputs.items():
        if key != "target_tokens" and t.shape != targets.shape:
            raise UserError(f"{where}.loss_fn_inputs.{key} has shape {list(t.shape)}, but target_tokens has "
                            f"shape {list(targets.shape)}: they must match")
    return Datum(i, tokens, inputs)


# ---- optim_step -----------------------------------------------------------------------------------------
def parse_adam_step(adam: Any, normalization: Any) -> AdamStep:
    if not isinstance(adam, dict):
        raise UserError("adam_params must be an object")
    if normalization is None:
        normalization = "none"
    if normalization not in NORMALIZATIONS:
        raise UserError(f"grad_accumulation_normalization={normalization!r} is not one of "
                        f"{', '.join(NORMALIZATIONS)}")
    emit = adam.get("emit_grad_norm_metrics")
    return AdamStep(
        learning_rate=number(adam.get("learning_rate", 1e-4), "adam_params.learning_rate", low=0),
        beta1=number(adam.get("beta1", 0.9), "adam_params.beta1", low=0, high=1, high_open=True),
        beta2=number(adam.get("beta2", 0.95), "adam_params.beta2", low=0, high=1, high_open=True),
        eps=number(adam.get("eps", 1e-12), "adam_params.eps", low=0),
        weight_decay=number(adam.get("weight_decay", 0.0), "adam_params.weight_decay", low=0),
        grad_clip_norm=number(adam.get("grad_clip_norm", 0.0) or 0.0, "adam_params.grad_clip_norm", low=0),
        emit_grad_norm=emit not in (False, "off"),
        normalization=normalization)


# ---- create_model ---------------------------------------------------------------------------------------
def parse_create_model(body: dict) -> CreateModel:
    if body.get("projection_head_dim") is not None:
        raise UserError("projection_head_dim is not supported by this trainer")
    base_only = bool(body.get("base_only"))
    lora = body.get("lora_config") or {}
    if not isinstance(lora, dict):
        raise UserError("lora_config must be an object")
    rank = lora.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"lora_config.rank must be a non-negative integer, got {rank!r}")
    flags = {k: bool(lora.get(k, True)) for k in ("train_attn", "train_mlp", "train_unembed")}
    extra: dict[str, Any] = {}
    if rank > 0 and not base_only:   # adapter shape options: meaningless (and unchecked) without adapters
        alpha = lora.get("alpha")
        extra["alpha"] = _DEFAULT_LORA_ALPHA if alpha is None else number(alpha, "lora_config.alpha", low=0)
        seed = lora.get("seed")
        extra["seed"] = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        init = lora.get("init_method") or "kaiming"
        if init not in ("kaiming", "gaussian"):
            raise UserError(f"lora_config.init_method={init!r} is not supported (supported: kaiming, gaussian)")
        extra["init_method"] = init
    session = body.get("session_id")
    return CreateModel(body.get("base_model"), base_only, LoraSpec(rank, **flags, **extra),
                       session if isinstance(session, str) else None)


# ---- checkpoint names -----------------------------------------------------------------------------------
def _parse_name(name: Any, field: str, what: str, pattern, rule: str) -> str:
    if not isinstance(name, str) or not name:
        raise UserError(f"{field} must be a non-empty {what}")
    if not pattern.fullmatch(name):
        raise UserError(f"{field} must be {rule} (got {name!r})")
    return name


def parse_state_name(name: Any, field: str = "path") -> str:
    """A train-state name for save_state: a DNS label (so that load_state can name it again)."""
    return _parse_name(name, field, "checkpoint name", STATE_NAME_RE,
                       "1-63 characters, start and end with a letter or digit, and contain only "
                       "lowercase letters, digits and hyphens")


def parse_sampler_name(name: Any, field: str = "path") -> str:
    """A sampler snapshot name: one safe path segment (letters, digits, '_', '-', '.'; not hidden)."""
    return _parse_name(name, field, "snapshot name", SAMPLER_NAME_RE,
                       "1-200 characters: letters, digits, '_', '-' and '.', starting with a letter or digit")


def parse_train_state_ref(path: Any, field: str = "path") -> TrainStateRef:
    """A load_state path: a bare train-state name, or cross_job://<job_id>/<name>."""
    if not isinstance(path, str) or not path:
        raise UserError(f"{field} must be a non-empty checkpoint reference")
    if path.startswith("cross_job://"):
        job_id, _, name = path[len("cross_job://"):].partition("/")
        # Job ids are resource ids (DNS labels) and become directory names: full match only.
        if not is_resource_id(job_id) or not STATE_NAME_RE.fullmatch(name):
            raise UserError(f"{field} {path!r} must look like cross_job://<job_id>/<checkpoint-name>")
        return TrainStateRef(name, job_id, path)
    if not STATE_NAME_RE.fullmatch(path):
        raise UserError(f"{field} {path!r} is not a checkpoint name of this job (a lowercase DNS label) "
                        "nor a cross_job://<job_id>/<name> reference")
    return TrainStateRef(path, None, path)


def _reject_unsupported_save_options(body: dict) -> None:
    # The SDK refuses ttl client-side (NotImplementedError), so only a hand-made request has it. (TTLs
    # are set through the control plane.) `overwrite` needs no check: an existing name is always
    # replaced, unless a live dependant makes the backend refuse.
    if body.get("ttl_seconds") is not None:
        raise UserError("ttl_seconds is not supported by this trainer (checkpoints never expire)")


def parse_save_state(body: dict) -> str:
    """save_weights: the train-state name (an existing state of that name is replaced)."""
    _reject_unsupported_save_options(body)
    return parse_state_name(body.get("path"))


def parse_save_sampler(body: dict) -> SamplerSave:
    _reject_unsupported_save_options(body)
    precision = body.get("export_precision")
    if precision not in (None, "source", "bf16"):
        raise UserError(f"export_precision={precision!r} is not supported (snapshots are bf16: use 'source' or 'bf16')")
    name = parse_sampler_name(body.get("path"))
    ctype = body.get("checkpoint_type")
    ctype = "base" if ctype is None else ctype
    if ctype not in SAMPLER_TYPES:
        raise UserError(f"checkpoint_type={body.get('checkpoint_type')!r} is not one of {', '.join(SAMPLER_TYPES)}")
    return SamplerSave(name, ctype)


def parse_load_state(body: dict) -> tuple[TrainStateRef, bool]:
    if body.get("weights_access_token") is not None:
        raise UserError("weights_access_token is not supported by this trainer")
    return parse_train_state_ref(body.get("path")), bool(body.get("optimizer", False))


def parse_adapter_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError("adapter_path must be a non-empty string")
    return value.strip()
