"""The N-rank trainer backend: the single-process `LocalTorchTrainer` with its model sharded by FSDP2.

    dist.init_process_group("gloo")                       # one process per rank (see launch.py)
    engine = ShardedTrainer(job_dir, job, load_model(base), model_dir, base_loader=...)
    engine.create_model(model_id, protocol.CreateModel(...))   # every rank, same arguments, same order
    engine.forward_backward(model_id, forward_input)            # (ranks.py broadcasts rank 0's calls)

Every rank runs every operation with the same arguments (rank 0 receives them over HTTP and
broadcasts them, `ranks.py`), so everything that only validates or reads job files is inherited
unchanged from `LocalTorchTrainer`. What differs:

* Sharding. The trainable model is wrapped with `fully_shard` per decoder layer plus the root, so
  parameters, gradients and AdamW state are `DTensor` shards (fp32 compute, no mixed precision: the
  master weights are the weights). Gradients are reduce-scattered as plain SUMS (divide factor 1) in
  fp64 (`reduce_dtype`): the loss of a request is the sum of its datums' losses, as on one rank.
* Data parallelism, same results as one rank. A request is cut into exactly the micro-batches one rank
  would run (`_micro_batches`: it depends on the request and the exact-mode setting, never on the world
  size), and the ranks share out those micro-batches whole, the largest first, one per rank per pass.
  A micro-batch computes the same fp32 gradient on any rank (the all-gathered parameters are the same
  bits), and the per-micro-batch gradients are summed in fp64 — locally with FSDP2's gradient sync
  off until the request's last pass, then by the fp64 reduce-scatter — exactly as `GradSum` sums them
  on one rank. An fp64 sum of fp32 gradients does not depend on its order (short of pathological
  cancellation), so the request's gradient rounds to the same fp32 bits as on one rank; with the
  fp64 gradient norm (`_total_grad_norm`) the whole step, and so the weights, losses and AdamW state,
  match one rank bit for bit. The parallelism is per micro-batch: a request that one rank runs as a
  single micro-batch (equal lengths, under the token cap) runs on one rank while the others pad.
  FSDP's collectives need every rank to run the same number of forward (and backward) passes, so
  ranks with fewer micro-batches run padding passes on a one-token input whose loss is multiplied by
  zero. Outputs are gathered on rank 0 in datum order; token and sequence counts are all-reduced so
  `optim_step`'s normalization divides by the request-wide counts on every rank.
* Checkpoints. `save_train_state` / `load_train_state` are collective inside a process group (sharded
  DCP, resharding on load: see workbench/checkpoints/train_state.py). Sampler exports gather one full
  tensor at a time and keep only its bf16 copy, on rank 0; LoRA exports go through an unsharded PEFT
  replica that only rank 0 holds (the single-process engine holds the same model once, too).
* `base_only` handles (frozen reference model) are served by rank 0 alone: it needs no collectives.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from workbench.backend.trainer import losses
from workbench.backend.trainer.local_torch import LocalTorchTrainer, _tensor_data
from workbench.backend.trainer.protocol import ForwardInput, SamplerSave, UserError

log = logging.getLogger("workbench.trainer.distributed")

_PAD_TOKENS = torch.zeros(1, 1, dtype=torch.int64)   # the padding pass's input (any valid token id)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (each gets its own FSDP unit, so only one is unsharded at a time)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


class ShardedTrainer(LocalTorchTrainer):
    """`LocalTorchTrainer` on one rank of an FSDP2 process group; see the module docstring for what changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # Every rank must plan the same passes: rank 0's setting wins (another node's environment may differ).
        box = [self.exact_max_datums]
        dist.broadcast_object_list(box, src=0)
        self.exact_max_datums = int(box[0])
        self._replica: torch.nn.Module | None = None    # rank 0's unsharded PEFT copy (LoRA exports)
        self._announced = False   # save_sampler: whether rank 0 told the others to join its gather

    # ---- model -----------------------------------------------------------------------------------
    def _build_train_model(self, sig: dict) -> None:
        # LocalTorchTrainer builds the (PEFT) model unsharded and identically on every rank (same seed), then the
        # shards are cut from those identical full tensors.
        super()._build_train_model(sig)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fp64 gradient reduction and no-sync accumulation (FSDP2 accumulates unsharded gradients in
        # reduce_dtype): the per-micro-batch gradients are summed as GradSum sums them on one rank.
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float64)
        for layer in _decoder_layers(self.train_model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.train_model, mp_policy=policy)
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
    def _run(self, model: torch.nn.Module, request: ForwardInput, *, backward: bool) -> dict:
        if model is self._frozen_base:   # unsharded reference model: rank 0 alone, no collectives
            return super()._run(model, request, backward=False) if self.rank == 0 else {}
        datums = request.data
        plan = self._pass_plan(self._micro_batches(datums))
        outputs: dict[int, dict] = {}
        batch_losses: list[tuple[int, float]] = []     # (micro-batch index, its loss), summed in index order
        local = torch.zeros(2, dtype=torch.float64)    # loss tokens, sequences
        # The gradients of earlier requests are set aside and added back once this request's are reduced
        # (as GradSum does on one rank): a refusal part-way leaves them as they were.
        earlier = self._set_aside_grads() if backward else None
        try:
            for position, item in enumerate(plan):
                if backward:   # local fp64 accumulation until the last pass, which reduce-scatters the sum
                    model.set_requires_gradient_sync(position == len(plan) - 1)
                with torch.set_grad_enabled(backward):
                    if item is None:   # padding pass: same collectives, zero contribution
                        logits = model(input_ids=_PAD_TOKENS, use_cache=False).logits
                        self._agree_finite(None, model, backward and position > 0)
                        if backward:
                            (logits.sum() * 0.0).backward()
                        continue
                    index, batch = item
                    ids = torch.stack([d.tokens for d in batch])
                    targets = torch.stack([d.inputs["target_tokens"] for d in batch])
                    logits = model(input_ids=ids, use_cache=False).logits
                    lp_batch = losses.target_logprobs(logits, targets)
                    del logits
                    batch_loss = None
                    problem = None
                    for row, d in enumerate(batch):
                        lp = lp_batch[row]
                        elementwise = request.loss.fn(lp, d.inputs, request.config)
                        if problem is None and not (bool(torch.isfinite(elementwise).all())
                                                    and bool(torch.isfinite(lp).all())):
                            problem = f"data[{d.index}].loss_fn_inputs: the loss of data[{d.index}] is not finite"
                        datum_loss = elementwise.sum()
                        batch_loss = datum_loss if batch_loss is None else batch_loss + datum_loss
                        outputs[d.index] = {"logprobs": _tensor_data(lp), "elementwise_loss": _tensor_data(elementwise)}
                        local[0] += losses.loss_token_count(d.inputs)
                    if problem is None and not torch.isfinite(batch_loss.detach()):
                        problem = f"the summed loss of data[{batch[0].index}..{batch[-1].index}] is not finite"
                    # Checked on every rank before backward: one non-finite datum must not poison the
                    # gradients, and all ranks must refuse together (backward is collective).
                    self._agree_finite(problem, model, backward and position > 0)
                    if backward:
                        (batch_loss if batch_loss.requires_grad else lp_batch.sum() * 0.0).backward()
                batch_losses.append((index, float(batch_loss.detach())))
                local[1] += len(batch)
        except UserError:
            if backward:
                self._restore_grads(earlier, replace=True)
            raise
        if backward:
            self._restore_grads(earlier, replace=False)
        totals = local.clone()
        dist.all_reduce(totals)
        gathered: list = [None] * self.world if self.rank == 0 else None
        dist.gather_object((outputs, batch_losses), gathered, dst=0)
        if backward:
            self.pending_loss_tokens += int(totals[0])
            self.pending_sequences += int(totals[1])
        if self.rank != 0:
            return {}
        merged: dict[int, dict] = {}
        for part, _ in gathered:
            merged.update(part)
        loss_sum = 0.0
        for _, value in sorted(p for _, parts in gathered for p in parts):   # in micro-batch order, as one rank
            loss_sum += value
        return {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": [merged[i] for i in range(len(datums))],
                "metrics": {"loss:sum": loss_sum, "num_loss_tokens:sum": float(totals[0]),
                            "num_sequences:sum": float(totals[1])}}

    def _agree_finite(self, problem: str | None, model: torch.nn.Module, pending: bool) -> None:
        """Every rank learns whether any rank's pass is non-finite; then all refuse together.

        `pending`: earlier passes of this request left unsharded gradients in FSDP2's no-sync
        accumulation; a padding pass with sync on flushes them into the sharded .grad, which the
        caller then replaces with the earlier requests' gradients (`_restore_grads`).
        """
        flag = torch.tensor([problem is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)   # one small collective per pass when all is well
        if not flag.item():
            return
        problems: list = [None] * self.world
        dist.all_gather_object(problems, problem)
        found = next(p for p in problems if p)
        if pending:
            model.set_requires_gradient_sync(True)
            (model(input_ids=_PAD_TOKENS, use_cache=False).logits.sum() * 0.0).backward()
        self._refuse_non_finite(found, False)

    def _set_aside_grads(self) -> list:
        params = self._trainable()
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        return earlier

    def _restore_grads(self, earlier: list, *, replace: bool) -> None:
        """.grad = earlier + this request's (as FSDP2 and GradSum accumulate), or = earlier (`replace`)."""
        with torch.no_grad():
            for p, old in zip(self._trainable(), earlier):
                if replace or p.grad is None:
                    p.grad = old
                elif old is not None:
                    old.to_local().add_(p.grad.to_local())
                    p.grad = old

    def _pass_plan(self, batches: list[list]) -> list[tuple[int, list] | None]:
        """This rank's (micro-batch index, micro-batch) per forward pass; None = a padding pass.

        Pass j runs the j-th group of `world` micro-batches in decreasing size (tokens), one per rank,
        so the ranks of a pass wait on each other as little as possible; every rank gets the same
        number of passes (ceil(micro-batches / world)). The order does not change the result: the
        gradients are summed in fp64 and the losses in micro-batch index order.
        """
        order = sorted(range(len(batches)), key=lambda k: (-len(batches[k]) * len(batches[k][0].tokens), k))
        passes = -(-len(batches) // self.world)
        plan: list = []
        for j in range(passes):
            slot = j * self.world + self.rank
            plan.append((order[slot], batches[order[slot]]) if slot < len(order) else None)
        return plan

    # ---- optim_step ------------------------------------------------------------------------------
    def _total_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """`LocalTorchTrainer._total_grad_norm` of the full gradients, from the shards: each shard's squared
        norm in fp64, summed over ranks, then over parameters, in fp64 (the same fp32 result as one rank)."""
        from torch.distributed.tensor import DTensor

        from workbench.backend.trainer.local_torch import squared_norm_fp64

        squares = torch.tensor([squared_norm_fp64(g.to_local() if isinstance(g, DTensor) else g) for g in grads],
                               dtype=torch.float64)
        dist.all_reduce(squares)
        return squares.sum().sqrt().to(torch.float32)

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
        replica = self._replica_model()
        replica.load_state_dict(full, strict=False)
        return replica

    def _gather_trainable(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.train_model, options=options)

    def save_sampler(self, model_id: str, request: SamplerSave) -> dict:
        """Rank 0 runs LocalTorchTrainer's checks and export; the others join its gather (collective).

        Rank 0 tells the others whether it reached the gather (`_sampler_weights`) or stopped before
        it (a user error, an unchanged re-save), so a refusal on rank 0 never leaves them waiting.
        """
        if self.rank != 0:
            self._require(model_id, train=True)
            box: list = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] == "gather":
                self._gather_for_sampler(request.checkpoint_type)
            return {}
        self._announced = False
        try:
            return super().save_sampler(model_id, request)
        finally:
            if not self._announced:
                dist.broadcast_object_list(["skip"], src=0)

    def _sampler_weights(self, ctype: str) -> dict | None:   # rank 0, from save_sampler
        dist.broadcast_object_list(["gather"], src=0)
        self._announced = True
        return self._gather_for_sampler(ctype)

    def _gather_for_sampler(self, ctype: str) -> dict | None:
        """Collective: the bf16 weights a snapshot exports (rank 0; None for a LoRA adapter snapshot)."""
        from workbench import checkpoints as ckpt
        from workbench.backend.trainer.local_torch import check_finite

        if self.is_lora:
            replica = self._unsharded_replica()
            if self.rank != 0:
                return None
            if ctype != "merged_base":
                check_finite(((n, p) for n, p in replica.named_parameters() if "lora_" in n),
                             "save_weights_for_sampler refused: the adapter weight")
                return None
            return ckpt.bf16_state(copy.deepcopy(replica).merge_and_unload())
        return self._full_bf16(self.train_model)

    def _export_sampler(self, dest, ctype: str, weights: dict | None, meta: dict) -> str:
        if weights is None:   # LoRA adapter: written from rank 0's unsharded replica
            from workbench import checkpoints as ckpt

            ckpt.save_sampler_lora(dest, self._replica, self.model_dir, meta)
            return "lora"
        return super()._export_sampler(dest, ctype, weights, meta)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_state(self, model_id: str, name: str) -> dict:
        """Sharded DCP save into the target rank 0 chose (`replacing`: a fresh name when replacing)."""
        import contextlib

        from workbench import checkpoints as ckpt
        from workbench.backend.trainer.local_torch import _writing
        from workbench.backend.trainer.replace import replacing

        self._require(model_id, train=True)
        dest = self.layout.train_state(name)
        meta = self._meta(name, "train_state")
        with contextlib.ExitStack() as stack:
            box: list = [None]
            if self.rank == 0:
                box[0] = str(stack.enter_context(replacing(dest)))
                stack.enter_context(_writing(f"train state {name!r}", dest.parent))
            dist.broadcast_object_list(box, src=0)
            ckpt.save_train_state(Path(box[0]), self.train_model, self.optimizer, meta)
        log.info("save_weights %s (step %d)", name, self.step)
        return {"type": "save_weights", "path": name}

    def load_adapter(self, model_id: str, adapter_path: str) -> dict:
        """PEFT adapter weights into the sharded model: rank 0 reads them into its replica, broadcasts."""
        self._require(model_id, train=True)
        if not self.is_lora:
            raise UserError("load_adapter needs a LoRA trainer (this job has lora_rank=0)")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        box: list = [None]
        full: dict = {}
        if self.rank == 0:
            try:
                replica = self._replica_model()
                swapped, self.train_model = self.train_model, replica
                try:
                    super().load_adapter(model_id, adapter_path)   # validation + PEFT load, into the replica
                finally:
                    self.train_model = swapped
                trainable = {n for n, p in self.train_model.named_parameters() if p.requires_grad}
                full = {k: v for k, v in replica.state_dict().items() if k in trainable}
                box[0] = "ok"
            except UserError as e:
                box[0] = str(e)
        dist.broadcast_object_list(box, src=0)
        if box[0] != "ok":
            raise UserError(box[0])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.train_model, full, options=options)
        self._weights_version += 1
        self._reset_accumulation()
        self.optimizer = self._new_optimizer()
        return {"type": "load_adapter", "model_id": model_id, "adapter_path": adapter_path}

    def _replica_model(self) -> torch.nn.Module:
        if self._replica is None:
            from peft import get_peft_model

            config = copy.deepcopy(self.train_model.peft_config["default"])
            self._replica = get_peft_model(self._base_loader(), config).eval()
        return self._replica
