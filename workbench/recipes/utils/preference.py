"""Preference pairs for DPO and ORPO: their shared config, rendering, forward passes, held-out accuracy.

    class Config(PreferenceConfig): ...                    # dataset, batch_size, max_seq_len of a pair recipe
    train, evals, max_len = render_train_eval(tokenizer, cfg, infra, train_rows, eval_rows)
    pairs = render_pairs(tokenizer, rows, max_len)         # Pair | None per row (None: dropped, too long)
    stats = forward_pairs(client, [p for p in pairs if p])  # (sum_c, sum_r, mean_c, mean_r) per pair
    metrics = preference_eval(client, eval_pairs, ref_sums=..., beta=0.1)

A pair becomes two datums, chosen then rejected, each carrying its response mask as `weights` (1 on the
assistant reply and its end-of-turn token), so the custom losses read the mask from the datum itself.

`eval/pref_accuracy` is the fraction of held-out pairs whose chosen reply gets a higher total
log-likelihood than the rejected one under the current policy: defined the same way for DPO and ORPO,
and meaningful before training (the base model's own preference).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import data as D
from .config import ConfigError, RecipeConfig
from .loop import adam_params
from .losses import pair_stats, sigmoid_loss


@dataclass
class PreferenceConfig(RecipeConfig):
    """The fields DPO and ORPO share beyond `RecipeConfig`: the pair data and its batching."""

    dataset: str = str(D.ARITHMETIC_PREFERENCES)
    """Preference JSONL: `{"chosen": {"messages": [...]}, "rejected": {"messages": [...]}}` per line."""

    batch_size: int = 16
    """Pairs per optimizer step."""

    max_seq_len: int | None = None
    """Drop pairs with a side longer than this. None: the training shape's max context length."""


@dataclass
class Pair:
    chosen: object       # Datum
    rejected: object     # Datum
    mask_c: list[float]
    mask_r: list[float]


def render_pairs(tokenizer, rows: list[dict], max_len: int) -> list[Pair | None]:
    out: list[Pair | None] = []
    for row in rows:
        chosen, rejected = D.preference_sides(row)
        rc = D.render_chat(tokenizer, chosen, "last_assistant_message")
        rr = D.render_chat(tokenizer, rejected, "last_assistant_message")
        if max(len(rc.tokens), len(rr.tokens)) > max_len or not any(rc.weights[1:]) or not any(rr.weights[1:]):
            out.append(None)
            continue
        out.append(Pair(D.to_datum(rc), D.to_datum(rr), D.target_weights(rc), D.target_weights(rr)))
    return out


def render_train_eval(tokenizer, cfg: PreferenceConfig, infra, train_rows: list[dict], eval_rows: list[dict]):
    """(train pairs, None where dropped; eval pairs, dropped ones left out; max_len), or ConfigError when no
    training pair fits. Dropped training pairs keep their slot so row indices match the data cursor."""
    max_len = cfg.max_seq_len or infra.max_context_length() or 2048
    train = render_pairs(tokenizer, train_rows, max_len)
    evals = [p for p in render_pairs(tokenizer, eval_rows, max_len) if p is not None]
    if all(p is None for p in train):
        raise ConfigError(f"dataset {cfg.dataset!r}: no pair fits max_seq_len={max_len}")
    return train, evals, max_len


def pair_datums(pairs: list[Pair]) -> list:
    return [d for p in pairs for d in (p.chosen, p.rejected)]


def forward_pairs(client, pairs: list[Pair], chunk: int = 64) -> list[tuple[float, float, float, float]]:
    """(sum_c, sum_r, mean_c, mean_r) response logprobs of each pair under `client`'s current weights."""
    out = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        res = client.forward(pair_datums(part), "cross_entropy").result()
        logprobs = [list(o["logprobs"].data) for o in res.loss_fn_outputs]
        masks = [m for p in part for m in (p.mask_c, p.mask_r)]
        out.extend(pair_stats(logprobs, masks))
    return out


def preference_eval(client, pairs: list[Pair], *, ref_sums: list[tuple[float, float]] | None = None,
                    beta: float = 0.1) -> dict:
    """Held-out metrics: pref_accuracy (sum log-likelihood), mean-logprob accuracy, and with reference
    sums the DPO implicit-reward accuracy, margin and loss."""
    if not pairs:
        return {}
    stats = forward_pairs(client, pairs)
    n = len(stats)
    out = {"eval/pref_accuracy": sum(sc > sr for sc, sr, _, _ in stats) / n,
           "eval/pref_accuracy_mean": sum(mc > mr for _, _, mc, mr in stats) / n,
           "eval/chosen_logprob": sum(s[0] for s in stats) / n,
           "eval/rejected_logprob": sum(s[1] for s in stats) / n}
    if ref_sums is not None:
        margins = [beta * ((sc - rc) - (sr - rr)) for (sc, sr, _, _), (rc, rr) in zip(stats, ref_sums, strict=True)]
        out.update({"eval/reward_accuracy": sum(m > 0 for m in margins) / n,
                    "eval/margin": sum(margins) / n,
                    "eval/dpo_loss": sum(sigmoid_loss(m) for m in margins) / n})
    return out


def preference_step(client, cfg, pairs: list[Pair], loss_fn, lr: float, prefix: str) -> dict:
    """One optimizer step of a pairwise loss (DPO, ORPO) on `pairs`; the loss is already a mean over
    pairs, so optim_step needs no normalization. Returns the step's `<prefix>/...` metrics."""
    metrics: dict = {}
    if pairs:
        fb = client.forward_backward_custom(pair_datums(pairs), loss_fn).result()
        client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)).result()
        metrics.update({k: v for k, v in fb.metrics.items() if k.startswith(prefix + "/")})
    metrics["train/pairs"] = len(pairs)
    return metrics


def train_preference_run(run, recipe: str, train: list, evals: list, train_step, run_eval,
                         extra_after: dict[str, str]) -> dict:
    """The DPO/ORPO loop around `train_step`: evaluate after every epoch and at the end, then the summary
    (preference accuracy before/after, plus `extra_after`: summary key -> eval metric of the last eval)."""
    run.begin(run_eval)
    run.train(train_step, desc=recipe, postfix_keys=(f"{recipe}/loss", f"{recipe}/accuracy", "eval/pref_accuracy"),
              evaluate=run_eval, eval_due=lambda step, consumed: consumed % len(train) == 0)
    run.final_eval(run_eval, "eval/pref_accuracy")
    first, last = run.first_eval, run.last_eval
    summary = {
        "train_pairs": len(train), "eval_pairs": len(evals),
        "pref_accuracy_before": first.get("eval/pref_accuracy") if first else None,
        "pref_accuracy_after": last.get("eval/pref_accuracy") if last else None,
    }
    summary.update({key: last.get(metric) if last else None for key, metric in extra_after.items()})
    return run.finish(summary)
