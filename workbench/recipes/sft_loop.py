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
from dataclasses import dataclass

from workbench.recipes.utils import data as D
from workbench.recipes.utils.config import (ConfigError, RecipeConfig, WeightSyncConfig, check_batching, check_common,
                                            check_number)
from workbench.recipes.utils.infra import completed_summary
from workbench.recipes.utils.loop import TrainingRun, adam_params, provision, read_datasets, validate_or_raise

logger = logging.getLogger("workbench.recipes.sft")

RECIPE = "sft"


@dataclass
class Config(RecipeConfig):
    """SFT settings; the fields every recipe shares (and their docs) are in `utils.config.RecipeConfig`."""

    dataset: str = str(D.ARITHMETIC_SFT)
    """Training JSONL, one `{"messages": [...]}` conversation per line."""

    train_on_what: str = "all_assistant_messages"
    """Which tokens carry loss: "all_assistant_messages" or "last_assistant_message"."""

    batch_size: int = 32
    """Rows per optimizer step."""

    max_seq_len: int | None = None
    """Drop rows whose rendered length exceeds this. None: the training shape's max context length."""

    epochs: int = 3
    """Passes over the training rows."""


def validate(cfg: Config) -> None:
    """Every config problem at once, as a ConfigError, before any backend call."""
    errors = check_common(cfg)
    if cfg.train_on_what not in D.TRAIN_ON_WHAT:
        errors.append(f"train_on_what must be one of {D.TRAIN_ON_WHAT} (got {cfg.train_on_what!r})")
    check_batching(errors, cfg)
    check_number(errors, "weight_decay", cfg.weight_decay, low=0)
    check_number(errors, "grad_clip_norm", cfg.grad_clip_norm, low=0)
    validate_or_raise(cfg, RECIPE, errors)


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
    tokenizer, train_rows, eval_rows = read_datasets(cfg, "sft")

    with provision(cfg, RECIPE) as infra:
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

        run = TrainingRun(infra, cfg, RECIPE, n_items=len(train), batch_size=cfg.batch_size)
        client = run.client
        run_eval = (lambda: evaluate(client, evals)) if evals else None

        def train_step(idx: list[int], lr: float, step: int) -> dict:
            """One cross-entropy step on the batch's kept rows, normalized to the per-token mean gradient."""
            batch = [train[i] for i in idx if train[i] is not None]
            metrics: dict = {}
            if batch:
                # Both submitted before either is waited on: the trainer runs them in submission order, and
                # the optim_step's request travels while the forward_backward computes (one round trip less).
                fb_future = client.forward_backward(batch, "cross_entropy")
                opt_future = client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay,
                                                           grad_clip_norm=cfg.grad_clip_norm),
                                               grad_accumulation_normalization="num_loss_tokens")
                fb, opt = fb_future.result(), opt_future.result()
                n_tok = fb.metrics.get("num_loss_tokens:sum", 0.0)
                loss = fb.metrics["loss:sum"] / max(n_tok, 1.0)
                metrics.update({"train/loss": loss, "train/ppl": math.exp(min(loss, 50.0)), "train/tokens": n_tok})
                if opt.metrics and "grad_norm:mean" in opt.metrics:
                    metrics["train/grad_norm"] = opt.metrics["grad_norm:mean"]
            metrics["train/rows"] = len(batch)
            return metrics

        run.begin(run_eval)
        run.train(train_step, desc=RECIPE, postfix_keys=("train/loss", "eval/loss"), evaluate=run_eval,
                  eval_due=lambda step, consumed: consumed % len(train) == 0)   # the end of an epoch
        run.final_eval(run_eval, "eval/loss")
        first, last = run.first_eval, run.last_eval
        return run.finish({
            "train_rows": len(train), "eval_rows": len(evals), "dropped_rows": dropped,
            "eval_loss_before": first["eval/loss"] if first else None,
            "eval_loss_after": last["eval/loss"] if last else None,
            "eval_ppl_after": last["eval/ppl"] if last else None,
        })

if __name__ == "__main__":
    from workbench.recipes.utils.cli import run_recipe_cli

    def _with_weight_sync(values: dict) -> dict:
        interval = values.pop("dcp_save_interval") or 0   # a WeightSyncConfig field, not one of Config's
        return {**values, "weight_sync": WeightSyncConfig(dcp_save_interval=interval)}

    run_recipe_cli(__doc__, Config, main, {"dataset": str, "epochs": int, "batch_size": int, "learning_rate": float,
                                           "max_steps": int, "dcp_save_interval": int, "output_model_id": str,
                                           "init_from_checkpoint": str}, build=_with_weight_sync)
