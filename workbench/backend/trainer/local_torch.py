"""The local torch trainer backend: one model and one optimizer in this process (`TrainerBackend`).

`server.py` validates requests with `protocol.py` and calls these methods from ONE worker thread, in
`seq_id` order, so the backend itself is single-threaded and keeps no locks (except around the handle
table, which the event loop reads). Methods take the typed requests of `protocol.py` and return the
JSON-shaped result of the future.

    trainer = LocalTorchTrainer(job_dir, JobConfig.load(job_dir / "job.json"), load_model(base), model_dir)
    trainer.create_model("model-..", protocol.parse_create_model({"base_model": ..., "lora_config": {"rank": 0}}))
    fb = protocol.parse_forward_input({"data": [...], "loss_fn": "cross_entropy"}, "forward_backward_input",
                                      trainer.limits)
    trainer.forward_backward("model-..", fb)
    trainer.optim_step("model-..", protocol.parse_adam_step({"learning_rate": 1e-4}, "num_loss_tokens"))

Model state. A trainer job owns exactly one trainable model (full-parameter, or the base wrapped in
PEFT LoRA adapters when the job's `lora_rank` > 0) and one persistent `torch.optim.AdamW` over its
trainable parameters (`optim.AdamW`: torch's own, minus its torch._dynamo import). Every `create_model` returns a new handle (`model_id`), but all training handles
share that model and optimizer: a client that reconnects continues from the same weights and moments.
`base_only` handles get a separate frozen copy of the base model (reference logprobs).

Errors. A request that is wrong for this trainer's state (unknown model_id, missing checkpoint) raises
`UserError`; the server reports it as a `user` future error. Any other exception (a failure inside
torch) is reported as a `server` error.

Gradients accumulate across `forward_backward` calls until `optim_step`, which optionally normalizes
them by the loss tokens / sequences accumulated since the previous step, clips, steps and zeroes them.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from workbench.checkpoints.layout import HomeLayout, JobLayout

from . import losses
from .optim import AdamW
from .protocol import (AdamStep, CreateModel, Datum, ForwardInput, JobConfig, LoraSpec, ModelLimits,
                       SamplerSave, TrainStateRef, UserError, describe_failure)
from .replace import replacing, sampler_dependants

log = logging.getLogger("workbench.trainer.local_torch")

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

_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Handle:
    """One `model_id` returned by create_model; training handles all share the job's model."""

    model_id: str
    base_only: bool
    session_id: str | None
    created: float


def check_finite(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """UserError naming the first tensor holding NaN or inf (`what` starts the message)."""
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{what} {name} holds NaN or infinite values; nothing was written")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); nothing was committed."""


@contextmanager
def _writing(what: str, where: Path) -> Iterator[None]:
    # torch's own message for a full disk is e.g. "unexpected pos 704 vs 598": say what failed and
    # how much space there is. The staging directory is already gone; the previous content stays.
    try:
        yield
    except (KeyboardInterrupt, SystemExit, UserError):
        raise
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteError(f"{what} was not written ({free} on the filesystem of {where}): "
                                   f"{describe_failure(e)}") from e


def _tensor_data(t: torch.Tensor) -> dict:
    t = t.detach().to(torch.float32)
    return {"data": t.reshape(-1).tolist(), "dtype": "float32", "shape": list(t.shape)}


def add_into_fp64(total: torch.Tensor, g: torch.Tensor) -> None:
    """total (fp64) += g (fp32), in place. On CPU through numpy, which casts in small buffers: torch's
    mixed-dtype add_ makes a full fp64 copy of g first (~7x slower for a 5M-parameter model)."""
    if total.device.type == "cpu" and g.device.type == "cpu":
        import numpy as np

        np.add(total.numpy(), g.detach().numpy(), out=total.numpy())
    else:
        total.add_(g)


def squared_norm_fp64(g: torch.Tensor) -> float:
    """sum(g**2) accumulated in fp64 (on CPU through numpy, without an fp64 copy of g; see add_into_fp64)."""
    if g.device.type == "cpu":
        import numpy as np

        flat = g.detach().reshape(-1).numpy()
        return float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return float(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2)


class GradSum:
    """The gradient of a request of several micro-batches, summed in fp64, applied to `.grad` once.

        grad_sum = GradSum(trainable_params)
        for loss in micro_batch_losses:
            grad_sum.add(loss)      # this micro-batch's fp32 gradients, added into fp64 sums
        grad_sum.apply()            # .grad += the sums rounded to fp32 (or = them when .grad is None)

    Why fp64: a sum of fp32 gradients in fp32 depends on the order it is added in, and an N-rank trainer
    adds the same micro-batches in another order (each rank its own, then a reduce-scatter). Added in
    fp64, the sum of a request's micro-batch gradients is exact (short of pathological cancellation), so
    it rounds to the same fp32 gradient whatever the order: the sharded trainer reduces in fp64 too
    (FSDP2 reduce_dtype=float64) and gets the same bits. Cost: an fp64 copy of the trainable parameters
    while a request of several micro-batches runs (requests of one micro-batch use plain backward).
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.sums: list[torch.Tensor | None] = [None] * len(params)

    def add(self, loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.sums[i] is None:
                self.sums[i] = g.to(torch.float64)
            else:
                add_into_fp64(self.sums[i], g)

    def apply(self) -> None:
        for p, s in zip(self.params, self.sums):
            if s is None:
                continue
            g = s.to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)


class LocalTorchTrainer:
    """Owns the model, the optimizer, the step counter and the sampler-delta base; see module doc."""

    def __init__(self, job_dir: Path, job: JobConfig, model: torch.nn.Module, model_dir: Path | None = None,
                 base_loader: Callable[[], torch.nn.Module] | None = None,
                 exact_max_datums: int = DEFAULT_EXACT_MAX_DATUMS):
        self.job_dir = Path(job_dir)
        self.layout = JobLayout(self.job_dir)
        self.home = HomeLayout(job.home)
        self.exact_max_datums = exact_max_datums
        self.job = job
        self.model_dir = model_dir
        self.base_model = model.eval()
        self._base_loader = base_loader
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._limits = ModelLimits(self.vocab_size, job.max_context_length)
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
        # Bumped by everything that changes the weights; a sampler name -> the version it was saved at.
        self._weights_version = 0
        self._saved_samplers: dict[str, int] = {}

    # ---- handles ---------------------------------------------------------------------------------
    @property
    def is_lora(self) -> bool:
        return self.job.lora_rank > 0

    @property
    def limits(self) -> ModelLimits:
        return self._limits

    def get_handle(self, model_id: str) -> Handle | None:
        with self._handles_lock:
            return self.handles.get(model_id)

    def has_model(self, model_id: str) -> bool:
        return self.get_handle(model_id) is not None

    def close(self) -> None:
        pass   # nothing beyond memory: the process exits

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

    def create_model(self, model_id: str, request: CreateModel) -> dict:
        """create_model (§7.5): check against the job, build the model once, register a handle."""
        if request.base_model != self.job.base_model:
            raise UserError(f"base_model {request.base_model!r} does not match this trainer job's base_model "
                            f"{self.job.base_model!r}")
        if request.base_only:
            if self._frozen_base is None:
                self._frozen_base = self._load_frozen_base()
        else:
            lora = request.lora
            if lora.rank != self.job.lora_rank:
                raise UserError(f"lora_config.rank={lora.rank} does not match this trainer job's lora_rank="
                                f"{self.job.lora_rank}: create the training client with lora_rank="
                                f"{self.job.lora_rank}")
            if self.train_model is None:
                self._build_train_model(lora)
            else:
                # Reconnecting to the existing model: its structure must match. seed / init_method only
                # shaped the initial adapter weights, which exist already, so they are not compared.
                keys = ("train_attn", "train_mlp", "train_unembed") + (("alpha",) if self.is_lora else ())
                diff = [f"lora_config.{k}={getattr(lora, k)!r} (model has {getattr(self.lora_signature, k)!r})"
                        for k in keys if getattr(lora, k) != getattr(self.lora_signature, k)]
                if diff:
                    raise UserError("this trainer's model was created with a different configuration: "
                                    + ", ".join(diff))
        with self._handles_lock:
            self.handles[model_id] = Handle(model_id, request.base_only, request.session_id, time.time())
        log.info("create_model %s (base_only=%s, lora_rank=%d, step=%d)", model_id, request.base_only,
                 self.job.lora_rank, self.step)
        return {"type": "create_model", "model_id": model_id}

    def _build_train_model(self, sig: LoraSpec) -> None:
        model = self.base_model
        if not self.is_lora:
            # Full-parameter: train everything except the parts the caller switched off.
            for name, p in model.named_parameters():
                p.requires_grad_(self._full_param_trainable(name, sig))
        else:
            from peft import LoraConfig, get_peft_model

            targets = list(_ATTN_MODULES if sig.train_attn else ()) + list(_MLP_MODULES if sig.train_mlp else ())
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in targets if t in present]
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            if not targets:
                raise UserError("lora_config needs train_attn or train_mlp: LoRA adapters go on the attention "
                                "and/or MLP projections (train_unembed alone has nothing to adapt)")
            kwargs: dict[str, Any] = {}
            if sig.train_unembed:
                # The unembedding becomes a trainable full copy saved with the adapter. With tied
                # embeddings PEFT keeps the input embedding tied to that copy (ensure_weight_tying),
                # so the model stays one consistent set of weights.
                kwargs["modules_to_save"] = ["lm_head"]
                if tied:
                    kwargs["ensure_weight_tying"] = True
            config = LoraConfig(r=self.job.lora_rank, lora_alpha=sig.alpha, lora_dropout=0.0,
                                target_modules=targets, bias="none",
                                init_lora_weights=True if sig.init_method == "kaiming" else "gaussian",
                                **kwargs)
            seed = sig.seed if sig.seed is not None else 0
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
    def _full_param_trainable(name: str, sig: LoraSpec) -> bool:
        if ".self_attn." in name:
            return sig.train_attn
        if ".mlp." in name:
            return sig.train_mlp
        if "embed_tokens" in name or "lm_head" in name:
            return sig.train_unembed
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
        # Hyperparameters are overwritten by every optim_step from its AdamParams. optim.AdamW: torch's,
        # without its torch._dynamo import (~71 MiB, ~3 s at the first step).
        return AdamW(self._trainable(), lr=self.job.learning_rate)

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
    def forward(self, model_id: str, request: ForwardInput) -> dict:
        _, model = self._require(model_id, train=False)
        return self._run(model, request, backward=False)

    def forward_backward(self, model_id: str, request: ForwardInput) -> dict:
        _, model = self._require(model_id, train=True)
        return self._run(model, request, backward=True)

    def _micro_batches(self, datums: list[Datum]) -> list[list[Datum]]:
        # Small requests: one datum per micro-batch (exact, see DEFAULT_EXACT_MAX_DATUMS). Large ones:
        # datums of equal length (and equal target layout) together, so a micro-batch needs no padding
        # and its targets stack into one gather; results agree with the per-datum ones to float rounding.
        if len(datums) <= self.exact_max_datums:
            return [[d] for d in datums]
        groups: dict[tuple, list[Datum]] = {}
        for d in datums:
            groups.setdefault((len(d.tokens), tuple(d.inputs["target_tokens"].shape[1:])), []).append(d)
        max_tokens = max(1, min(_MAX_BATCH_TOKENS, _MAX_LOGIT_BYTES // (4 * self.vocab_size)))
        batches = []
        for (length, _), group in groups.items():
            per = max(1, max_tokens // length)
            batches.extend(group[k:k + per] for k in range(0, len(group), per))
        return batches

    def _run(self, model: torch.nn.Module, request: ForwardInput, *, backward: bool) -> dict:
        datums = request.data
        outputs: list[dict | None] = [None] * len(datums)
        total_loss = 0.0
        loss_tokens = 0
        contributed = False   # whether this request already back-propagated part of itself into .grad
        batches = self._micro_batches(datums)
        # Several micro-batches: their gradients are summed in fp64 and reach .grad once, at the end (so a
        # refusal part-way leaves .grad as it was). See GradSum for why (equality with the N-rank trainer).
        grad_sum = GradSum(self._trainable()) if backward and len(batches) > 1 else None
        try:
            for batch in batches:
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
                        elementwise = request.loss.fn(lp, d.inputs, request.config)
                        # Checked before backward: one non-finite datum must not poison the gradients.
                        self._check_finite_loss(d, lp, elementwise, backward and contributed)
                        datum_loss = elementwise.sum()
                        batch_loss = datum_loss if batch_loss is None else batch_loss + datum_loss
                        outputs[d.index] = {"logprobs": _tensor_data(lp),
                                            "elementwise_loss": _tensor_data(elementwise)}
                        loss_tokens += losses.loss_token_count(d.inputs)
                    if not torch.isfinite(batch_loss.detach()):   # finite per datum, overflowing in the sum
                        self._refuse_non_finite(f"the summed loss of data[{batch[0].index}..{batch[-1].index}] "
                                                f"is {float(batch_loss.detach())}", backward and contributed)
                    if backward and batch_loss.requires_grad:
                        if grad_sum is not None:
                            grad_sum.add(batch_loss)
                        else:
                            batch_loss.backward()
                            contributed = True
                total_loss += float(batch_loss.detach())
            if grad_sum is not None:
                grad_sum.apply()
        except UserError:
            raise
        except BaseException:
            if backward and contributed:
                # A part of this request's gradients is in .grad: a retry would count it twice.
                log.warning("forward_backward failed mid-request: discarding the accumulated gradients")
                self._reset_accumulation()
            raise
        if backward:
            self.pending_loss_tokens += loss_tokens
            self.pending_sequences += len(datums)
        return {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": outputs,
                "metrics": {"loss:sum": total_loss, "num_loss_tokens:sum": float(loss_tokens),
                            "num_sequences:sum": float(len(datums))}}

    def _check_finite_loss(self, d: Datum, lp: torch.Tensor, elementwise: torch.Tensor, discard: bool) -> None:
        if bool(torch.isfinite(elementwise).all()) and bool(torch.isfinite(lp).all()):
            return
        # Name the input most likely responsible: the float input with the largest magnitude.
        floats = {k: float(t.abs().max()) for k, t in d.inputs.items() if k != "target_tokens" and t.numel()}
        hint = ""
        if floats:
            key = max(floats, key=floats.get)
            hint = f"; its largest input is loss_fn_inputs.{key} (|value| up to {floats[key]:.3g})"
        self._refuse_non_finite(f"data[{d.index}].loss_fn_inputs: the loss of data[{d.index}] is not finite"
                                f"{hint}", discard)

    def _refuse_non_finite(self, what: str, discard: bool) -> None:
        if discard:
            self._reset_accumulation()
        raise UserError(f"{what}: refused before backward, nothing was applied"
                        + (" (the gradients accumulated since the last optim_step were discarded, because "
                           "part of this request had already been back-propagated)" if discard else ""))

    # ---- optim_step ------------------------------------------------------------------------------
    def optim_step(self, model_id: str, request: AdamStep) -> dict:
        self._require(model_id, train=True)
        lr, clip, normalization = request.learning_rate, request.grad_clip_norm, request.normalization

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
            total_norm = self._total_grad_norm(grads)
            if not torch.isfinite(total_norm):
                # Stepping would write NaN into every weight and moment: refuse, keep the weights.
                self._reset_accumulation()
                raise UserError(f"optim_step refused: the gradient norm is {float(total_norm)}; the weights and "
                                "optimizer state are unchanged and the accumulated gradients were discarded")
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, clip, total_norm)
            if request.emit_grad_norm:
                metrics["grad_norm:mean"] = float(total_norm)
        for group in self.optimizer.param_groups:
            group.update(lr=lr, betas=(request.beta1, request.beta2), eps=request.eps,
                         weight_decay=request.weight_decay)
        self._weights_version += 1   # before the step: a failure inside it may have changed weights
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        log.info("optim_step %d (lr=%g, normalization=%s over %d, grads=%d)", self.step, lr, normalization,
                 divisor, len(grads))
        self.pending_loss_tokens = 0
        self.pending_sequences = 0
        return {"metrics": metrics}

    @staticmethod
    def _total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
        """The L2 norm of all gradients together, summed in fp64 and returned as fp32.

        fp64 so that a sharded backend, which adds its shards' squared norms in another order, gets the
        same fp32 value (the clipping factor must agree to the bit for N ranks to train like one).
        """
        squares = torch.tensor([squared_norm_fp64(g) for g in grads], dtype=torch.float64)
        return squares.sum().sqrt().to(torch.float32)

    def _reset_accumulation(self) -> None:
        if self.train_model is not None:
            self.train_model.zero_grad(set_to_none=True)
        self.pending_loss_tokens = 0
        self.pending_sequences = 0

    # ---- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.layout.train_states

    @property
    def sampler_dir(self) -> Path:
        return self.layout.samplers

    def _meta(self, name: str, kind: str) -> dict:
        # created_time: float epoch seconds, the manifest convention of workbench.checkpoints.
        return {"name": name, "kind": kind, "created_time": time.time(), "expire_time": None,
                "base_model": self.job.base_model, "lora_rank": self.job.lora_rank, "step": self.step}

    def save_state(self, model_id: str, name: str) -> dict:
        """save_state: the full train state (weights + optimizer) as `DIR/checkpoints/<name>/`.

        An existing state of that name is replaced atomically (the SDK re-saves `step-N` when a run's
        last step is also a save interval): nothing depends on a train state's files after its load.
        """
        from workbench import checkpoints as ckpt

        self._require(model_id, train=True)
        dest = self.layout.train_state(name)
        meta = self._meta(name, "train_state")
        with replacing(dest) as target, _writing(f"train state {name!r}", dest.parent):
            ckpt.save_train_state(target, self.train_model, self.optimizer, meta)
        log.info("save_weights %s (step %d)", name, self.step)
        return {"type": "save_weights", "path": name}

    def resolve_train_state(self, ref: TrainStateRef) -> Path:
        """A load_state reference -> its checkpoint directory (this job's, or another job's)."""
        if ref.job_id is not None and ref.job_id != self.job.job_id:
            root = self.home.job(ref.job_id).train_states
        else:
            root = self.checkpoints_dir
        name, path = ref.name, ref.raw
        src = root / name
        if not src.is_dir():
            raise UserError(f"path {path!r}: checkpoint not found ({src} does not exist)")
        return src

    def load_state(self, model_id: str, ref: TrainStateRef, with_optimizer: bool) -> dict:
        """load_state / load_state_with_optimizer; optimizer=false resets the optimizer state."""
        from workbench import checkpoints as ckpt

        from workbench.checkpoints.manifest import read_manifest

        self._require(model_id, train=True)
        src = self.resolve_train_state(ref)
        path = ref.raw
        meta = read_manifest(src)
        if meta is None or meta.get("kind") != "train_state":
            raise UserError(f"path {path!r}: {src} is not a committed train-state checkpoint")
        if meta.get("base_model") != self.job.base_model or int(meta.get("lora_rank") or 0) != self.job.lora_rank:
            raise UserError(f"path {path!r} holds {meta.get('base_model')!r} with lora_rank={meta.get('lora_rank')}; "
                            f"this trainer trains {self.job.base_model!r} with lora_rank={self.job.lora_rank}")
        self._reset_accumulation()
        self._weights_version += 1
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

    def save_sampler(self, model_id: str, request: SamplerSave) -> dict:
        """A sampler snapshot `DIR/sampler/<name>/`: HF base, a delta over the last one, or LoRA adapter.

        Re-saving a name replaces the snapshot atomically. Saving the same weights again under the name
        this process last gave them (a recipe re-saving its final step) is a no-op, except that a base asked
        for where they were saved as a delta rewrites the snapshot as a full copy (so it can be promoted;
        what depends on the name sees the same content). Replacing different
        weights is refused, naming the dependant, when something live relies on the old content: a
        deployment that holds it (its state.json chain replays it on restart) or a delta snapshot
        encoded against it (the name is the identity deltas refer to).
        """
        self._require(model_id, train=True)
        name, ctype = request.name, request.checkpoint_type
        dest = self.layout.sampler(name)
        if dest.exists():
            unchanged = self._saved_samplers.get(name) == self._weights_version
            if unchanged and not self._full_copy_wanted(dest, ctype):
                log.info("save_weights_for_sampler %s: unchanged weights already saved under this name", name)
                return {"type": "save_weights_for_sampler", "path": name}
            # Unchanged weights reach here only when a full (base) copy is asked for where they are saved as a
            # delta (the cookbook's full-parameter RL re-saves its final step as a base to promote it): the
            # content under this name stays bit-identical, so what depends on it is unaffected (a deployment's
            # restart replays a base where its chain recorded a delta) and it is rewritten below.
            dependants = [] if unchanged else sampler_dependants(self.home, self.layout, dest)
            if dependants:
                raise UserError(f"path: sampler snapshot {name!r} cannot be replaced: "
                                f"{'; '.join(dependants)}. Save under a new name")
        weights = self._sampler_weights(ctype)
        if weights is not None:
            check_finite(weights.items(), "save_weights_for_sampler refused: the model weight")
        with replacing(dest) as target, _writing(f"sampler snapshot {name!r}", dest.parent):
            written = self._export_sampler(target, ctype, weights, self._meta(name, "sampler"))
        if weights is not None and not self.is_lora:
            self._last_sampler = (weights, name)
        self._saved_samplers[name] = self._weights_version
        log.info("save_weights_for_sampler %s (%s requested, wrote %s, step %d)", name, ctype, written, self.step)
        return {"type": "save_weights_for_sampler", "path": name}

    def _full_copy_wanted(self, dest: Path, ctype: str) -> bool:
        """True if a full (base) snapshot is asked for where the same weights are saved as a delta."""
        from workbench import checkpoints as ckpt

        if ctype != "base" or self.is_lora:
            return False
        try:
            return ckpt.snapshot_kind(dest) == "delta"
        except ValueError:
            return False

    def _sampler_weights(self, ctype: str) -> dict | None:
        """bf16 weights a full (or delta) snapshot exports; None for a LoRA adapter snapshot."""
        from workbench import checkpoints as ckpt

        if self.is_lora and ctype != "merged_base":
            check_finite(((n, p) for n, p in self.train_model.named_parameters() if p.requires_grad),
                         "save_weights_for_sampler refused: the adapter weight")
            return None
        if self.is_lora:   # merged_base: fold the adapter into a copy of the base, export that
            return ckpt.bf16_state(copy.deepcopy(self.train_model).merge_and_unload())
        return ckpt.bf16_state(self.train_model)

    def _export_sampler(self, dest: Path, ctype: str, weights: dict | None, meta: dict) -> str:
        """The one call into the snapshot formats (workbench.checkpoints); returns what was written."""
        from workbench import checkpoints as ckpt

        if weights is None:
            # LoRA snapshots always hold the whole adapter, whatever type was asked for.
            ckpt.save_sampler_lora(dest, self.train_model, self.model_dir, meta)
            return "lora"
        if ctype == "delta" and self._last_sampler is not None and not self.is_lora:
            prev_weights, prev_identity = self._last_sampler
            ckpt.save_sampler_delta(dest, weights, prev_weights, prev_identity, meta, delta_format=self.job.delta_format)
            return f"{self.job.delta_format} delta over {prev_identity}"
        # No previous snapshot in this process: a delta has nothing to be relative to, so the snapshot
        # is written as a full base (and its row honestly shows BASE).
        ckpt.save_sampler_base(dest, weights, self.model_dir, meta)
        return "base"

    def load_adapter(self, model_id: str, adapter_path: str) -> dict:
        """Load PEFT adapter weights (weights only) into the LoRA model; the optimizer starts fresh."""
        self._require(model_id, train=True)
        if not self.is_lora:
            raise UserError("load_adapter needs a LoRA trainer (this job has lora_rank=0)")
        directory = self._resolve_adapter(adapter_path)
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
        self._weights_version += 1
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
            try:
                directory = self.home.model(parts[1], parts[3])
            except ValueError as e:
                raise UserError(f"adapter_path {adapter_path!r} is not a valid model name: {e}") from None
        elif adapter_path.startswith("/"):
            directory = Path(adapter_path)
        else:
            raise UserError(f"adapter_path {adapter_path!r} must be a model name accounts/<a>/models/<id> or an "
                            "absolute local directory")
        if not directory.is_dir():
            raise UserError(f"adapter_path {adapter_path!r}: not found ({directory} does not exist)")
        return directory
