"""Rank 0 serves the trainer wire; every operation it runs is broadcast and run by all ranks in order.

    engine = ShardedTrainer(...)                        # on every rank
    if rank == 0:
        app = create_app(BroadcastingEngine(engine), api_key)   # server.py calls it from ONE worker thread
        ...serve...; .close() releases the other ranks when the server exits
    else:
        follow(engine)                                  # runs rank 0's operations until told to stop

The server's ordered worker already runs operations one at a time in `seq_id` order, so broadcasting
each call as it starts (`broadcast_object_list` of the method name and its JSON-shaped arguments)
gives every rank the same sequence (the typed requests of protocol.py travel pickled between the
job's own processes). Reads that touch no model state (`has_model`, `get_info`, `capabilities`,
`list_checkpoints`, `limits`) stay local to rank 0.

After each operation the ranks exchange their outcome. A user error is the same on every rank (they
validate the same request against the same state). A failure on another rank is different: the ranks
may now disagree about the weights, so it raises `TrainerCannotContinue` and the job fails.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from workbench.backend.trainer.protocol import TrainerCannotContinue, UserError, describe_failure

log = logging.getLogger("workbench.trainer.ranks")

# Engine methods that touch the model, optimizer or handles: every rank runs them.
COLLECTIVE_OPS = frozenset({"create_model", "unload_model", "forward", "forward_backward", "optim_step",
                            "save_state", "load_state", "save_sampler", "load_adapter"})
_STOP = "__stop__"


def _run(engine, name: str, args: tuple, kwargs: dict) -> tuple[Any, tuple[str, str] | None]:
    try:
        return getattr(engine, name)(*args, **kwargs), None
    except UserError as e:
        return None, ("user", str(e))
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        log.exception("%s failed on rank %d", name, dist.get_rank())
        return e, ("server", describe_failure(e))


def _outcomes(outcome: tuple[str, str] | None) -> list:
    """Every rank's outcome (None = success); the objects are exchanged only when some rank failed."""
    flag = torch.tensor([outcome is not None], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    everyone: list = [None] * dist.get_world_size()
    if flag.item():
        dist.all_gather_object(everyone, outcome)
    return everyone


class BroadcastingEngine:
    """Rank 0's engine as the server sees it: collective methods are broadcast, the rest delegated."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name: str):
        attr = getattr(self._engine, name)
        if name not in COLLECTIVE_OPS:
            return attr

        def collective(*args, **kwargs):
            dist.broadcast_object_list([(name, args, kwargs)], src=0)
            result, outcome = _run(self._engine, name, args, kwargs)
            everyone = _outcomes(outcome)
            failed = [f"rank {r}: {o[1]}" for r, o in enumerate(everyone) if o is not None and o[0] == "server"]
            if failed:
                raise TrainerCannotContinue(f"{name} failed on " + "; ".join(failed))
            if outcome is not None:   # a user error, the same on every rank
                raise UserError(outcome[1])
            return result

        return collective

    def close(self) -> None:
        """Release the other ranks from `follow` (they exit); safe to call when they are already gone."""
        self._engine.close()
        try:
            dist.broadcast_object_list([(_STOP, (), {})], src=0)
        except Exception as e:   # a rank died: the launcher tears the group down anyway
            log.warning("could not tell the other ranks to stop: %s", e)


def follow(engine) -> None:
    """Ranks > 0: run rank 0's operations in the order it broadcasts them, until it says stop."""
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        name, args, kwargs = box[0]
        if name == _STOP:
            log.info("rank %d: stop received", dist.get_rank())
            return
        _, outcome = _run(engine, name, args, kwargs)
        _outcomes(outcome)
