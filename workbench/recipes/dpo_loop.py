"""Direct Preference Optimization on chosen/rejected pairs, through `forward_backward_custom`.

    from workbench.recipes.dpo_loop import Config, main
    summary = main(Config(log_path="./runs/dpo", beta=0.1, epochs=1))

Data: `{"chosen": {"messages": [...]}, "rejected": {"messages": [...]}}` rows (default: the shipped
arithmetic preferences: the correct `<answer>` reply versus a wrong number or a reply without tags).

Loss (utils/losses.py): mean over the batch's pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
pi / ref the summed response-token logprobs of the policy / the reference. The loss is already a mean,
so `optim_step` runs without gradient normalization.

Reference: the policy as it stands when the run first starts (the base model, the
`init_from_checkpoint` weights or the warm-start adapter). Its response logprob sums for every training
and held-out pair are computed once, by a forward pass before the first step, and stored in
`<log_path>/reference_logprobs.json`; a resumed run reads them from there, so the reference never
drifts and no second trainer is needed.

Evaluation (held-out `evaluation_dataset`, else a seeded carve-out of min(10%, 100) pairs), before
training, after every epoch and at the end: `eval/pref_accuracy` (chosen more likely than rejected),
`eval/reward_accuracy` (implicit reward margin > 0), `eval/margin`, `eval/dpo_loss`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.recipes.utils import data as D
from workbench.recipes.utils.config import (DEFAULT_BASE_MODEL, ConfigError, InfraConfig, WeightSyncConfig,
                                            check_common, raise_if)
from workbench.recipes.utils.infra import RecipeError, RecipeInfra, check_run_record, completed_summary
from workbench.recipes.utils.logging import MetricsLog, read_metrics
from workbench.recipes.utils.loop import (adam_params, check_output_model, finish_run, mark_training_started,
                                          scheduled_lr, start_policy)
from workbench.recipes.utils.losses import make_dpo_loss
from workbench.recipes.utils.preference import forward_pairs, pair_datums, preference_eval, render_pairs

logger = logging.getLogger("workbench.recipes.dpo")

RECIPE = "dpo"
REFERENCE_FILE = "reference_logprobs.json"


@dataclass
class Config:
    log_path: str
    """Directory of this run: run.json, dataloader.json, metrics.jsonl, reference_logprobs.json."""

    base_model: str = DEFAULT_BASE_MODEL
    """Model to train."""

    dataset: str = str(D.ARITHMETIC_PREFERENCES)
    """Preference JSONL: `{"chosen": {"messages": [...]}, "rejected": {"messages": [...]}}` per line."""

    evaluation_dataset: str | None = None
    """Held-out pairs in the same format. None: a seeded carve-out of min(10%, 100) training pairs."""

    tokenizer_model: str | None = None
    """Tokenizer for the chat template (catalog name or local HF directory). None: base_model's."""

    beta: float = 0.1
    """DPO temperature: how strongly the policy may move away from the reference."""

    learning_rate: float = 2e-3
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
    """"job-id:checkpoint-name" to start from (e.g. an SFT run's checkpoint); also becomes the reference."""

    warm_start_from_adapter: str | None = None
    """LoRA only: a PEFT adapter to start from (weights only); also becomes the reference."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Checkpoint cadence (`dcp_save_interval`)."""

    infra: InfraConfig = field(default_factory=InfraConfig)
    """Training shape, timeouts, cleanup."""


def validate(cfg: Config) -> None:
    errors = check_common(cfg, datasets=("dataset", "evaluation_dataset"))
    if isinstance(cfg.beta, bool) or not isinstance(cfg.beta, (int, float)) or not cfg.beta > 0:
        errors.append(f"beta must be a number > 0 (got {cfg.beta!r})")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        errors.append(f"batch_size must be an integer >= 1 (got {cfg.batch_size!r})")
    if cfg.max_seq_len is not None and (not isinstance(cfg.max_seq_len, int) or cfg.max_seq_len < 2):
        errors.append(f"max_seq_len must be an integer >= 2 (got {cfg.max_seq_len!r})")
    if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
        errors.append(f"warmup_steps must be an integer >= 0 (got {cfg.warmup_steps!r})")
    if cfg.log_path:
        errors += check_run_record(cfg, RECIPE)
    raise_if(errors, RECIPE)


def _fingerprint(cfg: Config, n_train: int, n_eval: int, max_len: int) -> dict:
    return {"dataset": str(cfg.dataset), "evaluation_dataset": cfg.evaluation_dataset, "seed": cfg.seed,
            "n_train": n_train, "n_eval": n_eval, "max_seq_len": max_len, "base_model": cfg.base_model,
            "init_from_checkpoint": cfg.init_from_checkpoint, "warm_start_from_adapter": cfg.warm_start_from_adapter}


def reference_sums(client, cfg: Config, train, evals, *, first_start: bool, max_len: int):
    """(train sums per row or None, eval sums): computed now on a first start, else read back."""
    path = Path(cfg.log_path) / REFERENCE_FILE
    fp = _fingerprint(cfg, len(train), len(evals), max_len)
    if not first_start:
        if not path.exists():
            raise RecipeError(f"{path} is missing: a resumed DPO run needs the reference logprobs computed at its "
                              "first start; rerun in a new log_path")
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != fp:
            raise RecipeError(f"{path} was computed for different data or settings ({saved.get('fingerprint')}); "
                              "rerun in a new log_path")
        return [tuple(x) if x else None for x in saved["train"]], [tuple(x) for x in saved["eval"]]
    kept = [p for p in train if p is not None]
    stats = iter(forward_pairs(client, kept))
    train_sums = [None if p is None else tuple(next(stats)[:2]) for p in train]
    eval_sums = [tuple(s[:2]) for s in forward_pairs(client, evals)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "train": train_sums, "eval": eval_sums}))
    os.replace(tmp, path)
    return train_sums, eval_sums


def main(cfg: Config) -> dict:
    """Run (or resume) the DPO loop; returns the summary."""
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
        ref_train, ref_eval = reference_sums(client, cfg, train, evals, max_len=max_len,
                                             first_start=info is None or info.source != "resume")
        schedule = D.EpochSchedule(len(train), cfg.batch_size, cfg.epochs, cfg.seed)
        total = schedule.total_steps if cfg.max_steps is None else min(schedule.total_steps, cfg.max_steps)
        log = MetricsLog(cfg.log_path)
        log.truncate_after(step)
        first_eval = last_eval = None
        if step == 0 and evals:
            first_eval = log.write(0, preference_eval(client, evals, ref_sums=ref_eval, beta=cfg.beta))
        mark_training_started(infra)

        t_start, start_step = time.time(), step
        with log.progress(total=total, initial=min(step, total), desc=RECIPE,
                          postfix_keys=("dpo/loss", "dpo/accuracy", "eval/pref_accuracy")) as bar:
            while step < total:
                epoch, idx = schedule.next_batch(consumed)
                if not idx:
                    break
                kept = [i for i in idx if train[i] is not None]
                lr = scheduled_lr(cfg.learning_rate, step + 1, cfg.warmup_steps)
                t0 = time.time()
                metrics: dict = {}
                if kept:
                    loss_fn = make_dpo_loss([ref_train[i] for i in kept], beta=cfg.beta)
                    fb = client.forward_backward_custom(pair_datums([train[i] for i in kept]), loss_fn).result()
                    client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay,
                                                  grad_clip_norm=cfg.grad_clip_norm)).result()
                    metrics.update({k: v for k, v in fb.metrics.items() if k.startswith("dpo/")})
                step += 1
                consumed += len(idx)
                metrics.update({"epoch": epoch, "data_consumed": consumed, "learning_rate": lr,
                                "train/pairs": len(kept),
                                "time/step_s": time.time() - t0})
                if evals and (consumed % len(train) == 0 or step == total):
                    metrics.update(preference_eval(client, evals, ref_sums=ref_eval, beta=cfg.beta))
                    last_eval = metrics
                log.write(step, metrics)
                bar.update(1)
                if ckpt.should_save(step) and step < total:
                    ckpt.save(f"step-{step}", resumable=True, promotable=False, data_consumed=consumed)

        if evals and last_eval is None:
            last_eval = log.write(step, preference_eval(client, evals, ref_sums=ref_eval, beta=cfg.beta))
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
            "reward_accuracy_after": last_eval.get("eval/reward_accuracy") if last_eval else None,
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
    p.add_argument("--beta", type=float, default=Config.beta)
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--learning-rate", type=float, default=Config.learning_rate)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--init-from-checkpoint")
    p.add_argument("--output-model-id")
    a = p.parse_args()
    print(main(Config(log_path=a.log_path, dataset=a.dataset, beta=a.beta, epochs=a.epochs,
                      learning_rate=a.learning_rate, max_steps=a.max_steps,
                      init_from_checkpoint=a.init_from_checkpoint, output_model_id=a.output_model_id)))
