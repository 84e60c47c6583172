"""Supervised fine-tuning on chat JSONL, resumable, with held-out loss after every epoch.

    from workbench.recipes.sft_loop import Config, main
    from workbench.recipes.utils import WeightSyncConfig

    summary = main(Config(log_path="./runs/sft", epochs=3, batch_size=32,
                          weight_sync=WeightSyncConfig(dcp_save_interval=10), output_model_id="tiny-sft"))
    # Interrupted? main() with the same config resumes from the newest resumable checkpoint.

Data: `{"messages": [...]}` rows (default: the shipped arithmetic set). Each row is rendered with the
chat template; the loss (the trainer's `cross_entropy`, L = sum of -logprob over weighted tokens) applies
to the assistant turns (their content and end-of-turn token). Each step is one `forward_backward` on
`batch_size` rows and one `optim_step` with `grad_accumulation_normalization="num_loss_tokens"`, so the
update is the per-token mean gradient. Rows longer than `max_seq_len` are dropped (and counted as consumed).

Order: epoch e visits the training rows in `random.Random(seed + e)` order, `batch_size` rows per step;
an epoch's last batch may be smaller. A resumed run continues at exactly the row its checkpoint
recorded, so on CPU its weights are bit-identical to an uninterrupted run's.

Evaluation: `evaluation_dataset`, else a seeded carve-out of min(10%, 100) training rows. `eval/loss`
(per token) and `eval/ppl` are logged before training (step 0), after every epoch and after the last step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from workbench.recipes.utils import data as D
from workbench.recipes.utils.config import (DEFAULT_BASE_MODEL, ConfigError, InfraConfig, WeightSyncConfig,
                                            check_common, raise_if)
from workbench.recipes.utils.infra import RecipeInfra, check_run_record, completed_summary
from workbench.recipes.utils.logging import MetricsLog, read_metrics
from workbench.recipes.utils.loop import (adam_params, check_output_model, finish_run, mark_training_started,
                                          scheduled_lr, start_policy)

logger = logging.getLogger("workbench.recipes.sft")

RECIPE = "sft"


@dataclass
class Config:
    log_path: str
    """Directory of this run: run.json (trainer job), dataloader.json (data cursors), metrics.jsonl.
    Rerunning with the same log_path resumes the run."""

    base_model: str = DEFAULT_BASE_MODEL
    """Model to fine-tune (a name the backend knows)."""

    dataset: str = str(D.ARITHMETIC_SFT)
    """Training JSONL, one `{"messages": [...]}` conversation per line."""

    evaluation_dataset: str | None = None
    """Held-out JSONL in the same format. None: a seeded carve-out of min(10%, 100) training rows."""

    tokenizer_model: str | None = None
    """Tokenizer for the chat template: a catalog model name or a local HF directory. None: base_model's."""

    train_on_what: str = "all_assistant_messages"
    """Which tokens carry loss: "all_assistant_messages" or "last_assistant_message"."""

    learning_rate: float = 3e-3
    """Adam learning rate (after warmup). The default suits the embedded 1M-parameter model; real models
    want ~1e-5 to 1e-4."""

    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    grad_clip_norm: float = 0.0
    """Clip the (token-normalized) gradient to this global norm; 0 = no clipping."""

    epochs: int = 3
    """Passes over the training rows."""

    batch_size: int = 32
    """Rows per optimizer step."""

    max_seq_len: int | None = None
    """Drop rows whose rendered length exceeds this. None: the training shape's max context length."""

    max_steps: int | None = None
    """Stop after this many optimizer steps in total (None: epochs x steps per epoch)."""

    lora_rank: int = 0
    """0 = full-parameter training; > 0 = LoRA of that rank."""

    seed: int = 0
    """Seeds the data order (epoch e shuffles with seed + e), the eval carve-out and LoRA init."""

    output_model_id: str | None = None
    """Promote the final checkpoint to `accounts/<account>/models/<output_model_id>` at the end."""

    init_from_checkpoint: str | None = None
    """"job-id:checkpoint-name": start from another job's DCP checkpoint (weights + optimizer); step and
    data cursor start at 0. Only for the run's first start: a rerun resumes its own progress."""

    warm_start_from_adapter: str | None = None
    """LoRA only: a PEFT adapter (`accounts/<a>/models/<id>` or a local directory) to start from (weights only)."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Checkpoint cadence: `dcp_save_interval` > 0 saves a resumable `step-N` every N steps."""

    infra: InfraConfig = field(default_factory=InfraConfig)
    """Training shape, timeouts, cleanup."""


def validate(cfg: Config) -> None:
    """Every config problem at once, as a ConfigError, before any backend call."""
    errors = check_common(cfg, datasets=("dataset", "evaluation_dataset"))
    if cfg.train_on_what not in D.TRAIN_ON_WHAT:
        errors.append(f"train_on_what must be one of {D.TRAIN_ON_WHAT} (got {cfg.train_on_what!r})")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        errors.append(f"batch_size must be an integer >= 1 (got {cfg.batch_size!r})")
    if cfg.max_seq_len is not None and (not isinstance(cfg.max_seq_len, int) or cfg.max_seq_len < 2):
        errors.append(f"max_seq_len must be an integer >= 2 (got {cfg.max_seq_len!r})")
    if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
        errors.append(f"warmup_steps must be an integer >= 0 (got {cfg.warmup_steps!r})")
    for name in ("weight_decay", "grad_clip_norm"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            errors.append(f"{name} must be a number >= 0 (got {value!r})")
    if cfg.log_path:
        errors += check_run_record(cfg, RECIPE)
    raise_if(errors, RECIPE)


def _render(tokenizer, rows: list[dict], max_len: int, train_on_what: str):
    """Datum per row, or None for a row that is dropped (too long, or nothing to train on)."""
    out = []
    for row in rows:
        r = D.render_chat(tokenizer, row["messages"], train_on_what)
        if len(r.tokens) > max_len or len(r.tokens) < 2 or not any(r.weights[1:]):
            out.append(None)
        else:
            out.append(D.to_datum(r))
    return out


def evaluate(client, datums: list, chunk: int = 128) -> dict:
    """Per-token held-out cross-entropy and perplexity through the trainer's forward pass."""
    loss = tokens = 0.0
    for i in range(0, len(datums), chunk):
        out = client.forward(datums[i:i + chunk], "cross_entropy").result()
        loss += out.metrics["loss:sum"]
        tokens += out.metrics["num_loss_tokens:sum"]
    mean = loss / max(tokens, 1.0)
    return {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0)), "eval/tokens": tokens}


def main(cfg: Config) -> dict:
    """Run (or resume) the SFT loop; returns the summary (also stored in run.json)."""
    validate(cfg)
    done = completed_summary(cfg.log_path)
    if done is not None:
        logger.info("run in %s already completed", cfg.log_path)
        return done

    tokenizer = D.load_recipe_tokenizer(cfg.tokenizer_model, cfg.base_model)
    rows = D.read_jsonl(cfg.dataset)
    D.check_rows(rows, "sft", cfg.dataset)
    eval_given = None
    if cfg.evaluation_dataset:
        eval_given = D.read_jsonl(cfg.evaluation_dataset)
        D.check_rows(eval_given, "sft", cfg.evaluation_dataset)
    train_rows, eval_rows = D.split_eval(rows, cfg.seed, eval_given)

    infra = RecipeInfra(cfg, RECIPE)
    try:
        check_output_model(infra, cfg)
        max_len = cfg.max_seq_len or infra.max_context_length() or 2048
        train = _render(tokenizer, train_rows, max_len, cfg.train_on_what)
        evals = [d for d in _render(tokenizer, eval_rows, max_len, cfg.train_on_what) if d is not None]
        dropped = sum(d is None for d in train)
        if dropped == len(train):
            raise ConfigError(f"dataset {cfg.dataset!r}: every row is longer than max_seq_len={max_len} "
                              "or has no assistant tokens to train on")
        if dropped:
            logger.warning("%d of %d training rows are dropped (longer than %d tokens or nothing to train)",
                           dropped, len(train), max_len)

        policy, ckpt, info = start_policy(infra, cfg)
        client = policy.client
        step, consumed = (info.step, info.data_consumed) if info else (0, 0)
        schedule = D.EpochSchedule(len(train), cfg.batch_size, cfg.epochs, cfg.seed)
        total = schedule.total_steps if cfg.max_steps is None else min(schedule.total_steps, cfg.max_steps)
        log = MetricsLog(cfg.log_path)
        log.truncate_after(step)
        first_eval = last_eval = None
        if step == 0 and evals:
            first_eval = log.write(0, evaluate(client, evals))
        mark_training_started(infra)

        t_start = time.time()
        start_step = step
        with log.progress(total=total, initial=min(step, total), desc=RECIPE,
                          postfix_keys=("train/loss", "eval/loss")) as bar:
            while step < total:
                epoch, idx = schedule.next_batch(consumed)
                if not idx:
                    break
                batch = [train[i] for i in idx if train[i] is not None]
                lr = scheduled_lr(cfg.learning_rate, step + 1, cfg.warmup_steps)
                t0 = time.time()
                metrics: dict = {}
                if batch:
                    fb = client.forward_backward(batch, "cross_entropy").result()
                    opt = client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay,
                                                        grad_clip_norm=cfg.grad_clip_norm),
                                            grad_accumulation_normalization="num_loss_tokens").result()
                    n_tok = fb.metrics.get("num_loss_tokens:sum", 0.0)
                    loss = fb.metrics["loss:sum"] / max(n_tok, 1.0)
                    metrics.update({"train/loss": loss, "train/ppl": math.exp(min(loss, 50.0)),
                                    "train/tokens": n_tok})
                    if opt.metrics and "grad_norm:mean" in opt.metrics:
                        metrics["train/grad_norm"] = opt.metrics["grad_norm:mean"]
                step += 1
                consumed += len(idx)
                metrics.update({"epoch": epoch, "data_consumed": consumed, "learning_rate": lr,
                                "train/rows": len(batch), "time/step_s": time.time() - t0})
                if evals and (consumed % len(train) == 0 or step == total):   # end of an epoch, or the last step
                    metrics.update(evaluate(client, evals))
                    last_eval = metrics
                log.write(step, metrics)
                bar.update(1)
                if ckpt.should_save(step) and step < total:
                    ckpt.save(f"step-{step}", resumable=True, promotable=False, data_consumed=consumed)

        if evals and last_eval is None:
            last_eval = log.write(step, evaluate(client, evals))
        if first_eval is None:   # a resumed run: the step-0 evaluation is in metrics.jsonl
            first_eval = next((r for r in read_metrics(cfg.log_path) if r["step"] == 0 and "eval/loss" in r), None)
        summary = {
            "recipe": RECIPE, "log_path": str(cfg.log_path), "trainer_job_id": policy.job_id,
            "resumed_from": info.checkpoint if info else None, "resume_source": info.source if info else None,
            "start_step": start_step, "steps": step, "data_consumed": consumed,
            "train_rows": len(train), "eval_rows": len(evals), "dropped_rows": dropped,
            "eval_loss_before": first_eval["eval/loss"] if first_eval else None,
            "eval_loss_after": last_eval["eval/loss"] if last_eval else None,
            "eval_ppl_after": last_eval["eval/ppl"] if last_eval else None,
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
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--learning-rate", type=float, default=Config.learning_rate)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--dcp-save-interval", type=int, default=0)
    p.add_argument("--output-model-id")
    p.add_argument("--init-from-checkpoint")
    a = p.parse_args()
    print(main(Config(log_path=a.log_path, dataset=a.dataset, epochs=a.epochs, batch_size=a.batch_size,
                      learning_rate=a.learning_rate, max_steps=a.max_steps, output_model_id=a.output_model_id,
                      init_from_checkpoint=a.init_from_checkpoint,
                      weight_sync=WeightSyncConfig(dcp_save_interval=a.dcp_save_interval))))
