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
from dataclasses import dataclass

from workbench.recipes.utils.config import check_batching, check_common, check_number
from workbench.recipes.utils.infra import completed_summary
from workbench.recipes.utils.loop import TrainingRun, provision, read_datasets, validate_or_raise
from workbench.recipes.utils.losses import make_orpo_loss
from workbench.recipes.utils.preference import (PreferenceConfig, preference_eval, preference_step, render_train_eval,
                                                train_preference_run)

logger = logging.getLogger("workbench.recipes.orpo")

RECIPE = "orpo"


@dataclass
class Config(PreferenceConfig):
    """ORPO settings; the shared fields (and their docs) are in `utils.config.RecipeConfig` and
    `utils.preference.PreferenceConfig`."""

    orpo_lambda: float = 0.5
    """Weight of the odds-ratio term relative to the chosen reply's NLL."""


def validate(cfg: Config) -> None:
    """Every config problem at once, as a ConfigError, before any backend call."""
    errors = check_common(cfg)
    check_number(errors, "orpo_lambda", cfg.orpo_lambda, low=0)
    check_batching(errors, cfg)
    validate_or_raise(cfg, RECIPE, errors)


def main(cfg: Config) -> dict:
    """Run (or resume) the ORPO loop; returns the summary."""
    validate(cfg)
    done = completed_summary(cfg.log_path)
    if done is not None:
        return done
    tokenizer, train_rows, eval_rows = read_datasets(cfg, "preference")

    with provision(cfg, RECIPE) as infra:
        train, evals, _ = render_train_eval(tokenizer, cfg, infra, train_rows, eval_rows)
        run = TrainingRun(infra, cfg, RECIPE, n_items=len(train), batch_size=cfg.batch_size)
        client = run.client
        run_eval = (lambda: preference_eval(client, evals)) if evals else None
        loss_fn = make_orpo_loss(orpo_lambda=cfg.orpo_lambda)

        def train_step(idx: list[int], lr: float, step: int) -> dict:
            """One ORPO step on the batch's kept pairs (rows too long for max_seq_len are None)."""
            return preference_step(client, cfg, [train[i] for i in idx if train[i] is not None], loss_fn, lr, RECIPE)

        return train_preference_run(run, RECIPE, train, evals, train_step, run_eval,
                                    {"pref_accuracy_mean_after": "eval/pref_accuracy_mean"})


if __name__ == "__main__":
    from workbench.recipes.utils.cli import run_recipe_cli

    run_recipe_cli(__doc__, Config, main, {"dataset": str, "orpo_lambda": float, "epochs": int, "learning_rate": float,
                                                "max_steps": int, "output_model_id": str})
