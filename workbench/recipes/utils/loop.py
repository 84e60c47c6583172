"""The parts every recipe's main() shares: start (or resume) the policy, Adam parameters, the end of a run.

    infra = RecipeInfra(cfg, "sft")
    check_output_model(infra, cfg)                      # fail fast when output_model_id is taken
    policy, ckpt, info = start_policy(infra, cfg)       # reconnect / create, then TrainingCheckpoints.resume
    ...
    final = finish_run(infra, ckpt, cfg, step=step, data_consumed=consumed, summary=summary)
"""

from __future__ import annotations

import logging

from .checkpoints import ResumeInfo, TrainingCheckpoints
from .config import ADAM_BETAS, ADAM_EPS, ConfigError
from .infra import RecipeError, RecipeInfra, Trainer

logger = logging.getLogger("workbench.recipes")


def adam_params(learning_rate: float, *, weight_decay: float = 0.0, grad_clip_norm: float = 0.0):
    from fireworks.training.sdk import AdamParams

    return AdamParams(learning_rate=learning_rate, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], eps=ADAM_EPS,
                      weight_decay=weight_decay, grad_clip_norm=grad_clip_norm)


def scheduled_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warmup over `warmup_steps` optimizer steps (step is 1-based), then constant."""
    if warmup_steps and step <= warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr


def check_output_model(infra: RecipeInfra, cfg) -> None:
    """output_model_id must be free, or already promoted from this very run (a rerun after completion)."""
    if not cfg.output_model_id:
        return
    model = infra.get_model(cfg.output_model_id)
    if model is None:
        return
    source = model.get("sourceCheckpoint") or ""
    mine = [f"/rlorTrainerJobs/{job}/" for job in (infra.run.get("trainers") or {}).values()]
    if not any(m in source for m in mine):
        raise ConfigError(f"output_model_id={cfg.output_model_id!r}: model {model.get('name')} already exists "
                          f"(promoted from {source or 'elsewhere'}); choose another output_model_id")


def start_policy(infra: RecipeInfra, cfg) -> tuple[Trainer, TrainingCheckpoints, ResumeInfo | None]:
    """Create or reconnect to the policy trainer and load what the run continues from.

    A reconnected trainer that already trained in an earlier invocation but has no resumable checkpoint
    of this run (dcp_save_interval=0, or killed before the first save) holds weights that match no
    recorded data cursor: the run then starts over on a NEW trainer job (the old one is deleted), so a
    fresh start really starts from the base model."""
    policy = infra.trainer("policy", learning_rate=cfg.learning_rate, seed=cfg.seed)
    ckpt = _checkpoints(infra, cfg, policy)
    info = ckpt.resume(init_from_checkpoint=cfg.init_from_checkpoint,
                       warm_start_from_adapter=cfg.warm_start_from_adapter)
    if info is None and not policy.created and infra.run.get("training_started"):
        logger.warning("trainer %s trained in an earlier attempt but has no resumable checkpoint of this run: "
                       "starting over on a new trainer job (set weight_sync.dcp_save_interval to resume mid-run)",
                       policy.job_id)
        policy = infra.trainer("policy", learning_rate=cfg.learning_rate, seed=cfg.seed, new=True)
        ckpt = _checkpoints(infra, cfg, policy)
        ckpt.reset_dataloader()
        infra.run.update(training_started=False)
        info = ckpt.resume(init_from_checkpoint=cfg.init_from_checkpoint,
                           warm_start_from_adapter=cfg.warm_start_from_adapter)
    return policy, ckpt, info


def _checkpoints(infra: RecipeInfra, cfg, policy: Trainer) -> TrainingCheckpoints:
    return TrainingCheckpoints(policy.client, infra.rlor_mgr, trainer_id=policy.job_id, log_path=cfg.log_path,
                               lora_rank=cfg.lora_rank, save_every=cfg.weight_sync.dcp_save_interval,
                               dcp_timeout=cfg.weight_sync.dcp_timeout)


def mark_training_started(infra: RecipeInfra) -> None:
    """Recorded before the first gradient reaches the trainer (see start_policy)."""
    if not infra.run.get("training_started"):
        infra.run.update(training_started=True)


def finish_run(infra: RecipeInfra, ckpt: TrainingCheckpoints, cfg, *, step: int, data_consumed: int,
               summary: dict) -> dict:
    """Final save (resumable + promotable), promotion when output_model_id is set, run.json completed,
    cleanup. Returns the summary with `final_checkpoint`, `sampler_checkpoint` and `model` filled in."""
    saved = ckpt.save(f"step-{step}", resumable=True, promotable=True, data_consumed=data_consumed)
    summary["final_checkpoint"] = saved["resumable"]
    summary["sampler_checkpoint"] = saved["promotable"]
    summary["model"] = None
    if cfg.output_model_id:
        existing = infra.get_model(cfg.output_model_id)
        if existing is not None and f"/rlorTrainerJobs/{ckpt.trainer_id}/" in (existing.get("sourceCheckpoint") or ""):
            summary["model"] = existing        # promoted by an earlier attempt of this run
        elif existing is not None:
            raise RecipeError(f"output_model_id={cfg.output_model_id!r} was taken while the run was training")
        else:
            summary["model"] = ckpt.promote_latest(cfg.output_model_id, cfg.base_model)
    infra.finish(summary)
    return summary
