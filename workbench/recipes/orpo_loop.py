"""Odds Ratio Preference Optimization (ORPO) on chosen/rejected pairs, through `forward_backward_custom`.

    from workbench.recipes.orpo_loop import Config, main
    summary = main(Config(log_path="./runs/orpo", orpo_lambda=0.5, epochs=1))

Data: `{"chosen": {"messages": [...]}, "rejected": {"messages": [...]}}` rows (default: the shipped
arithmetic preferences).

Loss (utils/losses.py), mean over the batch's pairs of
    NLL_c + orpo_lambda * -log sigmoid(log_odds(chosen) - log_odds(rejected)),
with NLL_c the mean chosen response-token negative logprob and log_odds(y) = m - log(1 - exp(m)) for m the
mean response-token logprob of y. ORPO needs no reference model: supervised learning on the chosen reply
and the preference signal in one objective. The loss is a mean, so `optim_step` runs without gradient
normalization.

Evaluation (held-out `evaluation_dataset`, else a seeded carve-out of min(10%, 100) pairs), before
training, after every epoch and at the end: `eval/pref_accuracy` (chosen reply more likely than the
rejected one, summed log-likelihood) and `eval/pref_accuracy_mean` (per-token mean, ORPO's own measure).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from workbench.recipes.utils import data as D
from workbench.recipes.utils.config import (DEFAULT_BASE_MODEL, ConfigError, InfraConfig, WeightSyncConfig,
                                            check_common, raise_if)
from workbench.recipes.utils.infra import RecipeInfra, check_run_record, completed_summary
from workbench.recipes.utils.logging import MetricsLog, read_metrics
from workbench.recipes.utils.loop import (adam_params, check_output_model, finish_run, mark_training_started,
                                          scheduled_lr, start_policy)
from workbench.recipes.utils.losses import make_orpo_loss
from workbench.recipes.utils.preference import pair_datums, preference_eval, render_pairs

logger = logging.getLogger("workbench.recipes.orpo")

RECIPE = "orpo"


@dataclass
class Config:
    log_path: str
    """Directory of this run: run.json, dataloader.json, metrics.jsonl."""

    base_model: str = DEFAULT_BASE_MODEL
    """Model to train."""

    dataset: str = str(D.ARITHMETIC_PREFERENCES)
    """Preference JSONL: `{"chosen": {"messages": [...]}, "rejected": {"messages": [...]}}` per line."""

    evaluation_dataset: str | None = None
    """Held-out pairs in the same format. None: a seeded carve-out of min(10%, 100) training pairs."""

    tokenizer_model: str | None = None
    """Tokenizer for the chat template (catalog name or local HF directory). None: base_model's."""

    orpo_lambda: float = 0.5
    """Weight of the odds-ratio term relative to the chosen reply's NLL."""

    learning_rate: float = 3e-3
    """Adam learning rate (after warmup). The default suits the embedded 1M-parameter model; real models
    want ~1e-6 to 1e-5."""

    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    grad_clip_norm: float = 0.0
    """Clip the gradient to this global norm; 0 = no clipping."""

    epochs: int = 1
    """Passes over the training pairs."""

    batch_size: int = 16
    """Pairs per optimizer step."""

    max_seq_len: int | None = None
    """Drop pairs with a side longer than this. None: the training shape's max context length."""

    max_steps: int | None = None
    """Stop after this many optimizer steps in total."""

    lora_rank: int = 0
    """0 = full-parameter training; > 0 = LoRA of that rank."""

    seed: int = 0
    """Seeds the pair order (epoch e shuffles with seed + e), the eval carve-out and LoRA init."""

    output_model_id: str | None = None
    """Promote the final checkpoint to this model id at the end."""

    init_from_checkpoint: str | None = None
    """"job-id:checkpoint-name" to start from (weights + optimizer); step and data cursor start at 0."""

    warm_start_from_adapter: str | None = None
    """LoRA only: a PEFT adapter to start from (weights only)."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Checkpoint cadence (`dcp_save_interval`)."""

    infra: InfraConfig = field(default_factory=InfraConfig)
    """Training shape, timeouts, cleanup."""


def validate(cfg: Config) -> None:
    errors = check_common(cfg, datasets=("dataset", "evaluation_dataset"))
    if isinstance(cfg.orpo_lambda, bool) or not isinstance(cfg.orpo_lambda, (int, float)) or cfg.orpo_lambda < 0:
        errors.append(f"orpo_lambda must be a number >= 0 (got {cfg.orpo_lambda!r})")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        errors.append(f"batch_size must be an integer >= 1 (got {cfg.batch_size!r})")
    if cfg.max_seq_len is not None and (not isinstance(cfg.max_seq_len, int) or cfg.max_seq_len < 2):
        errors.append(f"max_seq_len must be an integer >= 2 (got {cfg.max_seq_len!r})")
    if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
        errors.append(f"warmup_steps must be an integer >= 0 (got {cfg.warmup_steps!r})")
    if cfg.log_path:
        errors += check_run_record(cfg, RECIPE)
    raise_if(errors, RECIPE)


def main(cfg: Config) -> dict:
    """Run (or resume) the ORPO loop; returns the summary."""
    validate(cfg)
    done = completed_summary(cfg.log_path)
    if done is not None:
        return done
    tokenizer = D.load_recipe_tokenizer(cfg.tokenizer_model, cfg.base_model)
    rows = D.read_jsonl(cfg.dataset)
    D.check_rows(rows, "preference", cfg.dataset)
    eval_given = None
    if cfg.evaluation_dataset:
        eval_given = D.read_jsonl(cfg.evaluation_dataset)
        D.check_rows(eval_given, "preference", cfg.evaluation_dataset)
    train_rows, eval_rows = D.split_eval(rows, cfg.seed, eval_given)

    infra = RecipeInfra(cfg, RECIPE)
    try:
        check_output_model(infra, cfg)
        max_len = cfg.max_seq_len or infra.max_context_length() or 2048
        train = render_pairs(tokenizer, train_rows, max_len)
        evals = [p for p in render_pairs(tokenizer, eval_rows, max_len) if p is not None]
        if all(p is None for p in train):
            raise ConfigError(f"dataset {cfg.dataset!r}: no pair fits max_seq_len={max_len}")

        policy, ckpt, info = start_policy(infra, cfg)
        client = policy.client
        step, consumed = (info.step, info.data_consumed) if info else (0, 0)
        schedule = D.EpochSchedule(len(train), cfg.batch_size, cfg.epochs, cfg.seed)
        total = schedule.total_steps if cfg.max_steps is None else min(schedule.total_steps, cfg.max_steps)
        log = MetricsLog(cfg.log_path)
        log.truncate_after(step)
        first_eval = last_eval = None
        if step == 0 and evals:
            first_eval = log.write(0, preference_eval(client, evals))
        mark_training_started(infra)
        loss_fn = make_orpo_loss(orpo_lambda=cfg.orpo_lambda)

        t_start, start_step = time.time(), step
        with log.progress(total=total, initial=min(step, total), desc=RECIPE,
                          postfix_keys=("orpo/loss", "orpo/accuracy", "eval/pref_accuracy")) as bar:
            while step < total:
                epoch, idx = schedule.next_batch(consumed)
                if not idx:
                    break
                kept = [train[i] for i in idx if train[i] is not None]
                lr = scheduled_lr(cfg.learning_rate, step + 1, cfg.warmup_steps)
                t0 = time.time()
                metrics: dict = {}
                if kept:
                    fb = client.forward_backward_custom(pair_datums(kept), loss_fn).result()
                    client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay,
                                                  grad_clip_norm=cfg.grad_clip_norm)).result()
                    metrics.update({k: v for k, v in fb.metrics.items() if k.startswith("orpo/")})
                step += 1
                consumed += len(idx)
                metrics.update({"epoch": epoch, "data_consumed": consumed, "learning_rate": lr,
                                "train/pairs": len(kept),
                                "time/step_s": time.time() - t0})
                if evals and (consumed % len(train) == 0 or step == total):
                    metrics.update(preference_eval(client, evals))
                    last_eval = metrics
                log.write(step, metrics)
                bar.update(1)
                if ckpt.should_save(step) and step < total:
                    ckpt.save(f"step-{step}", resumable=True, promotable=False, data_consumed=consumed)

        if evals and last_eval is None:
            last_eval = log.write(step, preference_eval(client, evals))
        if first_eval is None:
            first_eval = next((r for r in read_metrics(cfg.log_path) if r["step"] == 0 and "eval/pref_accuracy" in r),
                              None)
        summary = {
            "recipe": RECIPE, "log_path": str(cfg.log_path), "trainer_job_id": policy.job_id,
            "resumed_from": info.checkpoint if info else None, "resume_source": info.source if info else None,
            "start_step": start_step, "steps": step, "data_consumed": consumed,
            "train_pairs": len(train), "eval_pairs": len(evals),
            "pref_accuracy_before": first_eval.get("eval/pref_accuracy") if first_eval else None,
            "pref_accuracy_after": last_eval.get("eval/pref_accuracy") if last_eval else None,
            "pref_accuracy_mean_after": last_eval.get("eval/pref_accuracy_mean") if last_eval else None,
            "train_seconds": time.time() - t_start,
        }
        return finish_run(infra, ckpt, cfg, step=step, data_consumed=consumed, summary=summary)
    finally:
        infra.close()


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-path", required=True)
    p.add_argument("--dataset", default=Config.dataset)
    p.add_argument("--orpo-lambda", type=float, default=Config.orpo_lambda)
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--learning-rate", type=float, default=Config.learning_rate)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--output-model-id")
    a = p.parse_args()
    print(main(Config(log_path=a.log_path, dataset=a.dataset, orpo_lambda=a.orpo_lambda, epochs=a.epochs,
                      learning_rate=a.learning_rate, max_steps=a.max_steps, output_model_id=a.output_model_id)))
