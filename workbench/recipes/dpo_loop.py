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
from dataclasses import dataclass
from pathlib import Path

from workbench.recipes.utils.config import check_batching, check_common, check_number
from workbench.recipes.utils.infra import RecipeError, completed_summary
from workbench.recipes.utils.loop import TrainingRun, provision, read_datasets, validate_or_raise
from workbench.recipes.utils.losses import make_dpo_loss
from workbench.recipes.utils.preference import (PreferenceConfig, forward_pairs, preference_eval, preference_step,
                                                render_train_eval, train_preference_run)

logger = logging.getLogger("workbench.recipes.dpo")

RECIPE = "dpo"
REFERENCE_FILE = "reference_logprobs.json"


@dataclass
class Config(PreferenceConfig):
    """DPO settings; the shared fields (and their docs) are in `utils.config.RecipeConfig` and
    `utils.preference.PreferenceConfig`."""

    beta: float = 0.1
    """DPO temperature: how strongly the policy may move away from the reference."""

    learning_rate: float = 2e-3
    """Adam learning rate (after warmup); see RecipeConfig. Real models want ~1e-6 to 1e-5."""


def validate(cfg: Config) -> None:
    """Every config problem at once, as a ConfigError, before any backend call."""
    errors = check_common(cfg)
    check_number(errors, "beta", cfg.beta, low=0, low_open=True)
    check_batching(errors, cfg)
    validate_or_raise(cfg, RECIPE, errors)


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
    tokenizer, train_rows, eval_rows = read_datasets(cfg, "preference")

    with provision(cfg, RECIPE) as infra:
        train, evals, max_len = render_train_eval(tokenizer, cfg, infra, train_rows, eval_rows)
        run = TrainingRun(infra, cfg, RECIPE, n_items=len(train), batch_size=cfg.batch_size)
        client = run.client
        # the reference is the policy as it stands now, unless the run resumes its own checkpoint
        ref_train, ref_eval = reference_sums(client, cfg, train, evals, max_len=max_len,
                                             first_start=run.info is None or run.info.source != "resume")
        run_eval = (lambda: preference_eval(client, evals, ref_sums=ref_eval, beta=cfg.beta)) if evals else None

        def train_step(idx: list[int], lr: float, step: int) -> dict:
            """One DPO step on the batch's kept pairs (rows too long for max_seq_len are None)."""
            kept = [i for i in idx if train[i] is not None]
            loss_fn = make_dpo_loss([ref_train[i] for i in kept], beta=cfg.beta) if kept else None
            return preference_step(client, cfg, [train[i] for i in kept], loss_fn, lr, RECIPE)

        return train_preference_run(run, RECIPE, train, evals, train_step, run_eval,
                                    {"reward_accuracy_after": "eval/reward_accuracy"})


if __name__ == "__main__":
    from workbench.recipes.utils.cli import run_recipe_cli

    run_recipe_cli(__doc__, Config, main, {"dataset": str, "beta": float, "epochs": int, "learning_rate": float,
                                                "max_steps": int, "init_from_checkpoint": str, "output_model_id": str})
