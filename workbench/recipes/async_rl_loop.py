"""Asynchronous GRPO: the rollouts of step N+1 stream from the deployment while step N trains.

    from workbench.recipes.async_rl_loop import Config, main
    from workbench.recipes.utils import WeightSyncConfig

    summary = main(Config(log_path="./runs/async-grpo", max_head_offpolicy_versions=1,
                          weight_sync=WeightSyncConfig(dcp_save_interval=10)))

The same GRPO objective, data, rewards, reference, evaluation and save / resume / promote behaviour as
`rl_loop` (read its docstring), with the rollout and training phases overlapped, as the cookbook's
`async_rl_loop` does:

    step N:   submit sampling of batch N+1 (from the weights the deployment holds: version N-1)
              GRPO update on batch N (trainer: version N-1 -> N)
              wait for batch N+1, then hot-load version N (save_and_hotload "step-N")

so each step's wall time is max(sampling, training) instead of their sum, and every batch is at most
`max_head_offpolicy_versions` = 1 policy version old (logged per step as `async/staleness`; the truncated
importance weight against the deployment's sampling logprobs corrects for it, as it does in rl_loop).
The hot-load waits until the next batch has finished sampling, so a batch never mixes two versions.

Bounded staleness, exact resume: a step that writes a resumable checkpoint (every
`weight_sync.dcp_save_interval` steps) is a barrier. The batch after it is sampled after the checkpoint's
weights are hot-loaded, i.e. from the checkpoint itself, which is exactly what a run resumed from that
checkpoint samples from. With per-request seeds derived from the data position (rl_loop), a run killed at
any point and rerun with the same log_path samples the same tokens as an uninterrupted run, and with
`reproducible_rollouts=True` (requests one at a time, so the deployment's logprobs do not depend on what
shared a batch) it reaches the same final weights bit for bit.

`max_head_offpolicy_versions=0` turns the overlap off (then this is rl_loop). Larger budgets would need the
deployment to serve a snapshot older than the last hot-load; they are refused rather than silently capped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from workbench.recipes import rl_loop
from workbench.recipes.utils.config import check_integer
from workbench.recipes.utils.loop import validate_or_raise

logger = logging.getLogger("workbench.recipes.async_rl")

RECIPE = "async-rl"   # also the prefix of its trainer job ids (DNS-label rules: no underscore)


@dataclass
class Config(rl_loop.Config):
    """rl_loop's settings plus the staleness budget; every field of rl_loop.Config means the same here."""

    max_head_offpolicy_versions: int = 1
    """Staleness budget in policy versions: 1 samples batch N+1 while step N trains (one version old);
    0 is fully on-policy (no overlap)."""


def validate(cfg: Config) -> None:
    """rl_loop's checks plus the staleness budget and the per-step weight sync it relies on."""
    errors = rl_loop.config_errors(cfg)
    check_integer(errors, "max_head_offpolicy_versions", cfg.max_head_offpolicy_versions, 0)
    if isinstance(cfg.max_head_offpolicy_versions, int) and cfg.max_head_offpolicy_versions > 1:
        errors.append(f"max_head_offpolicy_versions must be 0 or 1 (got {cfg.max_head_offpolicy_versions}): the "
                      "deployment serves the last hot-loaded snapshot, so rollouts are at most one version behind")
    if cfg.weight_sync.weight_sync_interval != 1:
        errors.append(f"weight_sync.weight_sync_interval must be 1 for async RL (got "
                      f"{cfg.weight_sync.weight_sync_interval}): staleness is counted in hot-loaded versions")
    validate_or_raise(cfg, RECIPE, errors)


def main(cfg: Config) -> dict:
    """Run (or resume) the asynchronous GRPO loop; returns the summary (rl_loop's keys)."""
    validate(cfg)
    return rl_loop.run_grpo(cfg, RECIPE, prefetch=cfg.max_head_offpolicy_versions > 0)


if __name__ == "__main__":
    from workbench.recipes.utils.cli import run_recipe_cli

    run_recipe_cli(__doc__, Config, main, {"dataset": str, "init_from_checkpoint": str, "max_head_offpolicy_versions": int,
                                                "max_steps": int, "output_model_id": str})
