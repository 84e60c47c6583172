"""The N-rank trainer engine: the single-process `Engine` with its model sharded by FSDP2.

    dist.init_process_group("gloo")                       # one process per rank (see launch.py)
    engine = ShardedEngine(job_dir, job, load_model(base), model_dir, base_loader=...)
    engine.create_model({...}, model_id)                   # every rank, same arguments, same order
    engine.forward_backward(model_id, body)                 # (ranks.py broadcasts rank 0's calls)

Every rank runs every operation with the same arguments (rank 0 receives them over HTTP and
broadcasts them, `ranks.py`), so everything that only validates or reads job files is inherited
unchanged from `Engine`. What differs:

* Sharding. The trainable model is wrapped with `fully_shard` per decoder layer plus the root, so
  parameters, gradients and AdamW state are `DTensor` shards (fp32, no mixed precision: the master
  weights are the weights). Gradients are reduce-scattered as plain SUMS (divide factor 1): the loss of
  a request is the sum of its datums' losses, exactly as on one rank.
* Data parallelism. The datums of a request are split into contiguous blocks, one per rank; each rank
  runs its block through the same micro-batching as `Engine`. FSDP's collectives need every rank to
  run the same number of forward (and backward) passes, so ranks with fewer micro-batches run padding
  passes on a one-token input whose loss is multiplied by zero. Outputs are gathered on rank 0 in
  datum order; token and sequence counts are all-reduced so `optim_step`'s normalization divides by the
  request-wide counts on every rank.
* Checkpoints. `save_train_state` / `load_train_state` are collective inside a process group (sharded
  DCP, resharding on load: see workbench/checkpoints/train_state.py). Sampler exports gather one full
  tensor at a time and keep only its bf16 copy, on rank 0; LoRA exports go through an unsharded PEFT
  replica that only rank 0 holds (the single-process engine holds the same model once, too).
* `base_only` handles (frozen reference model) are served by rank 0 alone: it needs no collectives.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist

from workbench.backend.trainer import losses
from workbench.backend.trainer.engine import Engine, UserError, _tensor_data

log = logging.getLogger("workbench.trainer.distributed")

_PAD_TOKENS = torch.zeros(1, 1, dtype=torch.int64)   # the padding pass's input (any valid token id)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (each gets its own FSDP unit, so only one is unsharded at a time)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


class ShardedEngine(Engine):
    """`Engine` on one rank of an FSDP2 process group; see the module docstring for what changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._replica: torch.nn.Module | None = None    # rank 0's unsharded PEFT copy (LoRA exports)

    # ---- model -----------------------------------------------------------------------------------
    def _build_train_model(self, sig: dict) -> None:
        # Engine builds the (PEFT) model unsharded and identically on every rank (same seed), then the
        # shards are cut from those identical full tensors.
        super()._build_train_model(sig)
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(self.train_model):
            fully_shard(layer)
        fully_shard(self.train_model)
        for unit in [*_decoder_layers(self.train_model), self.train_model]:   # per FSDP unit, not inherited
            # A sum, like one rank's backward over all datums (the default would average over ranks).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)   # gloo has no PREMUL_SUM
        self.optimizer = self._new_optimizer()   # over the DTensor shards
        log.info("rank %d/%d: model sharded with FSDP2 (%d decoder layers)", self.rank, self.world,
                 len(_decoder_layers(self.train_model)))

    def _load_frozen_base(self) -> torch.nn.Module:
        # Only rank 0 answers base_only forwards; the other ranks keep a placeholder handle.
        return super()._load_frozen_base() if self.rank == 0 else torch.nn.Identity()

    # ---- forward / forward_backward --------------------------------------------------------------
    def _run(self, model: torch.nn.Module, body: Any, where: str, *, backward: bool) -> dict:
        if model is self._frozen_base:   # unsharded reference model: rank 0 alone, no collectives
            return super()._run(model, body, where, backward=False) if self.rank == 0 else {}
        loss_fn, config, datums = self._parse_input(body, where)   # same validation on every rank
        plan = self._pass_plan(datums)
        outputs: dict[int, dict] = {}
        pass_losses: list[tuple[int, float]] = []     # (first datum index, micro-batch loss)
        local = torch.zeros(2, dtype=torch.float64)    # loss tokens, sequences
        for batch in plan:
            with torch.set_grad_enabled(backward):
                if batch is None:   # padding pass: same collectives, zero contribution
                    logits = model(input_ids=_PAD_TOKENS, use_cache=False).logits
                    if backward:
                        (logits.sum() * 0.0).backward()
                    continue
                ids = torch.stack([d.tokens for d in batch])
                targets = torch.stack([d.inputs["target_tokens"] for d in batch])
                logits = model(input_ids=ids, use_cache=False).logits
                lp_batch = losses.target_logprobs(logits, targets)
                del logits
                batch_loss = None
                for row, d in enumerate(batch):
                    lp = lp_batch[row]
                    elementwise = losses.compute_loss(loss_fn, lp, d.inputs, config)
                    datum_loss = elementwise.sum()
                    batch_loss = datum_loss if batch_loss is None else batch_loss + datum_loss
                    outputs[d.index] = {"logprobs": _tensor_data(lp), "elementwise_loss": _tensor_data(elementwise)}
                    local[0] += losses.loss_token_count(d.inputs)
                if backward:
                    # Even a loss that does not depend on the weights must run backward: FSDP's
                    # reduce-scatter is collective.
                    (batch_loss if batch_loss.requires_grad else lp_batch.sum() * 0.0).backward()
            pass_losses.append((batch[0].index, float(batch_loss.detach())))
            local[1] += len(batch)
        totals = local.clone()
        dist.all_reduce(totals)
        gathered: list = [None] * self.world if self.rank == 0 else None
        dist.gather_object((outputs, pass_losses), gathered, dst=0)
        if backward:
            self.pending_loss_tokens += int(totals[0])
            self.pending_sequences += int(totals[1])
        if self.rank != 0:
            return {}
        merged: dict[int, dict] = {}
        for part, _ in gathered:
            merged.update(part)
        loss_sum = 0.0
        for _, value in sorted(p for _, parts in gathered for p in parts):   # in datum order, as one rank sums
            loss_sum += value
        return {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": [merged[i] for i in range(len(datums))],
                "metrics": {"loss:sum": loss_sum, "num_loss_tokens:sum": float(totals[0]),
                            "num_sequences:sum": float(totals[1])}}

    def _pass_plan(self, datums: list) -> list[list | None]:
        """This rank's micro-batches, one per forward pass; None = a padding pass. Same length on all ranks.

        Up to `exact_max_datums` datums (Engine's exact mode): pass k runs datum k on rank k % world and
        padding elsewhere, so every gradient reduction adds exactly one datum's gradient to zeros and
        the shards accumulate datum by datum in request order — bit for bit what one rank computes.
        Larger requests: a contiguous block of datums per rank, micro-batched as by `Engine`, all ranks
        computing at once (the sums then associate differently: float rounding, ~1e-7 relative).
        """
        if len(datums) <= self.exact_max_datums:
            return [[d] if k % self.world == self.rank else None for k, d in enumerate(datums)]
        lo, hi = (len(datums) * self.rank) // self.world, (len(datums) * (self.rank + 1)) // self.world
        batches: list = self._micro_batches(datums[lo:hi]) if hi > lo else []
        count = torch.tensor([len(batches)], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return batches + [None] * (int(count) - len(batches))

    # ---- optim_step ------------------------------------------------------------------------------
    def _total_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """`get_total_norm` of the full gradients: from the shards' sums of squares, or, in exact mode,
        from each full gradient gathered in turn (bit for bit what one rank computes)."""
        from torch.distributed.tensor import DTensor

        if self.exact_max_datums > 0:
            norms = []
            for g in grads:
                full = g.full_tensor() if isinstance(g, DTensor) else g
                norms.append(torch.linalg.vector_norm(full))
                del full
            return torch.linalg.vector_norm(torch.stack(norms))
        local = torch.stack([(g.to_local() if isinstance(g, DTensor) else g).double().pow(2).sum() for g in grads])
        dist.all_reduce(local)
        return torch.linalg.vector_norm(local.sqrt().float())

    # ---- sampler exports -------------------------------------------------------------------------
    def _full_bf16(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """bf16 copies of `model`'s full tensors on rank 0 ({} elsewhere), gathered one at a time."""
        from torch.distributed.tensor import DTensor

        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        seen: set[int] = set()
        out: dict[str, torch.Tensor] = {}
        for name, tensor in model.state_dict().items():
            if tied and id(tensor) in seen:   # lm_head aliases embed_tokens (see checkpoints.bf16_state)
                continue
            seen.add(id(tensor))
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if self.rank == 0:
                out[name] = full.detach().to(device="cpu", dtype=torch.bfloat16, copy=True).contiguous()
            del full
        return out

    def _unsharded_replica(self) -> torch.nn.Module:
        """Rank 0's unsharded PEFT model, its trainable tensors refreshed from the shards (collective)."""
        full = self._gather_trainable()
        if self.rank != 0:
            return None
        if self._replica is None:
            from peft import get_peft_model

            base = self._base_loader()
            config = copy.deepcopy(self.train_model.peft_config["default"])
            self._replica = get_peft_model(base, config).eval()
        self._replica.load_state_dict(full, strict=False)
        return self._replica

    def _gather_trainable(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.train_model, options=options)

    def save_weights_for_sampler(self, model_id: str, path: Any, checkpoint_type: Any) -> dict:
        from workbench import checkpoints as ckpt
        from workbench.backend.trainer.engine import _SAMPLER_TYPES

        self._require(model_id, train=True)
        name = self._validate_name(path, "path")
        ctype = "base" if checkpoint_type is None else checkpoint_type
        if ctype not in _SAMPLER_TYPES:
            raise UserError(f"checkpoint_type={checkpoint_type!r} is not one of {', '.join(_SAMPLER_TYPES)}")
        dest = self.sampler_dir / name
        exists = [dest.exists()]
        dist.broadcast_object_list(exists, src=0)   # rank 0's view decides, so all ranks agree
        if exists[0]:
            raise UserError(f"path: sampler snapshot {name!r} already exists in this job")
        meta = self._meta(name, "sampler")
        if self.is_lora:
            replica = self._unsharded_replica()
            if self.rank != 0:
                return {}
            if ctype != "merged_base":
                ckpt.save_sampler_lora(dest, replica, self.model_dir, meta)
                written = "lora"
            else:
                ckpt.save_sampler_base(dest, ckpt.bf16_state(copy.deepcopy(replica).merge_and_unload()),
                                       self.model_dir, meta)
                written = "merged base"
        else:
            weights = self._full_bf16(self.train_model)
            if self.rank != 0:
                return {}
            if ctype == "delta" and self._last_sampler is not None:
                prev_weights, prev_identity = self._last_sampler
                ckpt.save_sampler_delta(dest, weights, prev_weights, prev_identity, meta)
                written = f"delta over {prev_identity}"
            else:
                ckpt.save_sampler_base(dest, weights, self.model_dir, meta)
                written = "base"
            self._last_sampler = (weights, name)
        log.info("save_weights_for_sampler %s (%s requested, wrote %s, step %d)", name, ctype, written, self.step)
        return {"type": "save_weights_for_sampler", "path": name}

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_weights(self, model_id: str, path: Any) -> dict:
        self._require(model_id, train=True)
        name = self._validate_name(path, "path")
        exists = [(self.checkpoints_dir / name).exists()]
        dist.broadcast_object_list(exists, src=0)
        if exists[0]:
            raise UserError(f"path: checkpoint {name!r} already exists in this job; choose a new name")
        return super().save_weights(model_id, path)   # collective sharded DCP save (train_state.py)

    def load_adapter(self, model_id: str, adapter_path: Any) -> dict:
        """PEFT adapter weights into the sharded model: rank 0 reads them through its replica, broadcasts."""
        self._require(model_id, train=True)
        if not self.is_lora:
            raise UserError("load_adapter needs a LoRA trainer (this job has lora_rank=0)")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        box: list = [None]
        if self.rank == 0:
            try:
                replica = self._replica_for_load()
                box[0] = ("ok", adapter_path)
                replica_engine = _ReplicaLoader(self, replica)
                replica_engine.load_adapter(model_id, adapter_path)
                trainable = {n for n, p in self.train_model.named_parameters() if p.requires_grad}
                full = {k: v for k, v in replica.state_dict().items() if k in trainable}
            except UserError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise UserError(box[0][1])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.train_model, full if self.rank == 0 else {}, options=options)
        self._reset_accumulation()
        self.optimizer = self._new_optimizer()
        log.info("load_adapter %s", adapter_path)
        return {"type": "load_adapter", "model_id": model_id, "adapter_path": adapter_path}

    def _replica_for_load(self) -> torch.nn.Module:
        if self._replica is None:
            from peft import get_peft_model

            config = copy.deepcopy(self.train_model.peft_config["default"])
            self._replica = get_peft_model(self._base_loader(), config).eval()
        return self._replica


class _ReplicaLoader(Engine):
    """Engine.load_adapter's validation and PEFT loading, pointed at rank 0's unsharded replica."""

    def __init__(self, owner: ShardedEngine, replica: torch.nn.Module):   # noqa: D107 - shares owner's state
        self.__dict__.update({k: v for k, v in owner.__dict__.items() if k not in ("train_model", "optimizer")})
        self.train_model = replica
        self.optimizer = None

    def _new_optimizer(self):   # the replica is never trained
        return None
