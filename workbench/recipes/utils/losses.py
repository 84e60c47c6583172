"""Client-side objectives for `forward_backward_custom`: GRPO, DPO, ORPO, and the default reward.

`forward_backward_custom(data, loss_fn)` runs the trainer's forward, calls `loss_fn(data, logprobs_list)`
here with one differentiable fp32 tensor of target logprobs per datum (position t = log p(target t)),
backpropagates the returned scalar to those logprobs and sends `-dL/dlogprob` back as `cross_entropy`
weights, so the trainer's gradient is exactly dL/dtheta (wire contract: L = sum -weights * logprob).

GRPO (cookbook semantics), per response token t of sample i in a group with rewards r:
    A_i        = (r_i - mean(r)) / (std(r) + 1e-8)            population std; groups with equal rewards are dropped
    ratio      = exp(clamp(logp - old_logp, -20, 20));  clipped = clamp(ratio, 1 - eps_clip, 1 + eps_clip_high)
    tis        = min(exp(old_logp - inference_logp), tis_cap)  truncated importance weight vs the deployment's
                                                               sampling logprobs (train/inference mismatch)
    loss_t     = max(-ratio * A_i, -clipped * A_i) * tis + kl_beta * (exp(ref - logp) - (ref - logp) - 1)
    L          = sum over kept samples and response tokens of loss_t   (a raw sum: the recipe normalizes with
                                                                         grad_accumulation_normalization)
`old_logp` is the policy's logprob under the weights of this step, i.e. `logp.detach()`: each batch gets
exactly one optimizer step, so the proximal forward the cookbook runs first would return the same values
bit for bit (ratio = 1 with the PPO gradient).

DPO:  L = mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))   (sums over response tokens)
ORPO: L = mean over pairs of [ NLL_c + lambda * -log sigmoid(log_odds_c - log_odds_r) ],
      NLL_c = mean chosen response-token -logprob, log_odds = m - log(1 - exp(m)) with m the mean response logprob.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOGRATIO_CLAMP = 20.0
_ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


# ---- rewards ---------------------------------------------------------------------------------------
def extract_answer(text: str) -> int | None:
    """The integer inside the first `<answer>...</answer>`, or None."""
    m = _ANSWER.search(text or "")
    return int(m.group(1)) if m else None


def arithmetic_reward(completion: str, row: dict) -> float:
    """Default RL reward: 1.0 when the integer inside `<answer>...</answer>` equals the row's ground_truth."""
    answer = extract_answer(completion)
    try:
        truth = int(str(row.get("ground_truth")).strip())
    except (TypeError, ValueError):
        return 0.0
    return 1.0 if answer is not None and answer == truth else 0.0


# ---- GRPO ------------------------------------------------------------------------------------------
def group_advantages(rewards: list[float]) -> list[float] | None:
    """Z-scored rewards of one group, or None when they are all equal (the group carries no signal)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if len(rewards) < 2 or bool((r == r[0]).all()):
        return None
    std = r.std(unbiased=False)
    return ((r - r.mean()) / (std + 1e-8)).tolist()


@dataclass
class GrpoSample:
    """One completion kept for the update, aligned with its datum (input = tokens[:-1])."""

    advantage: float
    response_start: int             # first target position of the response (prompt_len - 1)
    inference_logprobs: list[float]  # the deployment's logprobs of the response tokens
    ref_logprobs: list[float] | None = None   # reference logprobs of the response tokens (kl_beta > 0)
    advantages: list[float] | None = None     # per response token (IGPO's turn-level advantages); else `advantage`
    mask: list[float] | None = None           # 1 for the policy's own tokens, 0 for tokens it did not sample
                                              # (a multi-turn trajectory's tool results): no loss, no KL


def make_grpo_loss(samples: list[GrpoSample], *, kl_beta: float, eps_clip: float, eps_clip_high: float | None,
                   tis_cap: float):
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high

    def loss_fn(data, logprobs_list):
        total = torch.zeros((), dtype=torch.float32)
        n_tok = 0
        sums = {"kl": 0.0, "tis": 0.0, "clip": 0.0, "ratio": 0.0, "pg": 0.0, "inf_diff": 0.0}
        for sample, lp in zip(samples, logprobs_list, strict=True):
            resp = lp[sample.response_start:]
            n = resp.numel()
            if n == 0:
                continue
            if len(sample.inference_logprobs) != n:
                raise ValueError(f"GRPO: {len(sample.inference_logprobs)} inference logprobs for a response of "
                                 f"{n} tokens (sample with logprobs=True; completions must not be echoed)")
            old = resp.detach()
            inf = torch.tensor(sample.inference_logprobs, dtype=resp.dtype)
            adv = torch.tensor(sample.advantage if sample.advantages is None else sample.advantages, dtype=resp.dtype)
            mask = None if sample.mask is None else torch.tensor(sample.mask, dtype=resp.dtype)
            if mask is not None:
                inf = torch.where(mask > 0, inf, old)     # tokens nobody sampled: importance weight 1
            ratio = torch.exp(torch.clamp(resp - old, -LOGRATIO_CLAMP, LOGRATIO_CLAMP))
            clipped = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_high)
            tis = torch.clamp(torch.exp(old - inf), max=tis_cap)
            per_token = torch.maximum(-ratio * adv, -clipped * adv) * tis
            if mask is not None:
                per_token = per_token * mask
            sums["pg"] += float(per_token.detach().sum())
            if kl_beta > 0:
                if sample.ref_logprobs is None or len(sample.ref_logprobs) != n:
                    raise ValueError("GRPO: kl_beta > 0 needs reference logprobs for every response token")
                ref = torch.tensor(sample.ref_logprobs, dtype=resp.dtype)
                d = ref - resp
                kl = torch.exp(d) - d - 1.0
                if mask is not None:
                    kl = kl * mask
                per_token = per_token + kl_beta * kl
                sums["kl"] += float(kl.detach().sum())
            total = total + per_token.sum()
            w = torch.ones_like(resp) if mask is None else mask
            n_tok += int(w.sum())
            sums["tis"] += float((tis * w).sum())
            sums["clip"] += float(((clipped != ratio).float() * w).sum())
            sums["ratio"] += float((ratio.detach() * w).sum())
            sums["inf_diff"] += float(((old - inf).abs() * w).sum())
        d = max(n_tok, 1)
        metrics = {"grpo/loss_sum": float(total.detach()), "grpo/tokens": float(n_tok),
                   "grpo/pg_loss": sums["pg"] / d, "grpo/kl": sums["kl"] / d, "grpo/tis_weight": sums["tis"] / d,
                   "grpo/clip_frac": sums["clip"] / d, "grpo/ratio": sums["ratio"] / d,
                   "grpo/train_inference_diff": sums["inf_diff"] / d}
        return total, metrics

    return loss_fn


# ---- preference losses -----------------------------------------------------------------------------
def masked_sum(lp: torch.Tensor, mask: list[float]) -> torch.Tensor:
    return (lp * torch.tensor(mask, dtype=lp.dtype)).sum()


def datum_mask(datum) -> list[float]:
    return list(datum.loss_fn_inputs["weights"].data)


def make_dpo_loss(ref_sums: list[tuple[float, float]], *, beta: float):
    """Data: [chosen_0, rejected_0, chosen_1, ...], each with a response mask as its `weights`."""

    def loss_fn(data, logprobs_list):
        losses, margins, acc, rc, rr = [], [], 0.0, 0.0, 0.0
        for k, (ref_c, ref_r) in enumerate(ref_sums):
            pi_c = masked_sum(logprobs_list[2 * k], datum_mask(data[2 * k]))
            pi_r = masked_sum(logprobs_list[2 * k + 1], datum_mask(data[2 * k + 1]))
            reward_c, reward_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
            margin = reward_c - reward_r
            losses.append(-F.logsigmoid(margin))
            margins.append(float(margin.detach()))
            acc += float(margin.detach() > 0)
            rc += float(reward_c.detach())
            rr += float(reward_r.detach())
        n = max(len(ref_sums), 1)
        loss = torch.stack(losses).mean()
        return loss, {"dpo/loss": float(loss.detach()), "dpo/accuracy": acc / n, "dpo/margin": sum(margins) / n,
                      "dpo/chosen_reward": rc / n, "dpo/rejected_reward": rr / n}

    return loss_fn


def log_odds(mean_logprob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logprob) < 1, computed stably."""
    m = torch.clamp(mean_logprob, max=-1e-6)
    return m - torch.log(-torch.expm1(m))


def make_orpo_loss(*, orpo_lambda: float):
    """Data: [chosen_0, rejected_0, chosen_1, ...], each with a response mask as its `weights`."""

    def loss_fn(data, logprobs_list):
        losses, nll_sum, or_sum, acc = [], 0.0, 0.0, 0.0
        pairs = len(logprobs_list) // 2
        for k in range(pairs):
            mc, mr = datum_mask(data[2 * k]), datum_mask(data[2 * k + 1])
            mean_c = masked_sum(logprobs_list[2 * k], mc) / max(sum(mc), 1.0)
            mean_r = masked_sum(logprobs_list[2 * k + 1], mr) / max(sum(mr), 1.0)
            ratio = log_odds(mean_c) - log_odds(mean_r)
            or_term = -F.logsigmoid(ratio)
            losses.append(-mean_c + orpo_lambda * or_term)
            nll_sum += float(-mean_c.detach())
            or_sum += float(or_term.detach())
            acc += float(ratio.detach() > 0)
        n = max(pairs, 1)
        loss = torch.stack(losses).mean()
        return loss, {"orpo/loss": float(loss.detach()), "orpo/nll": nll_sum / n, "orpo/or_loss": or_sum / n,
                      "orpo/accuracy": acc / n}

    return loss_fn


def pair_stats(logprobs: list[list[float]], masks: list[list[float]]) -> list[tuple[float, float, float, float]]:
    """Per pair (sum_c, sum_r, mean_c, mean_r) of response logprobs, from a forward over [c0, r0, c1, ...]."""
    out = []
    for k in range(len(logprobs) // 2):
        lc, lr = logprobs[2 * k], logprobs[2 * k + 1]
        mc, mr = masks[2 * k], masks[2 * k + 1]
        sc = sum(a * b for a, b in zip(lc, mc))
        sr = sum(a * b for a, b in zip(lr, mr))
        out.append((sc, sr, sc / max(sum(mc), 1.0), sr / max(sum(mr), 1.0)))
    return out


def sigmoid_loss(x: float) -> float:
    """-log sigmoid(x), stably."""
    return math.log1p(math.exp(-x)) if x > -30 else -x
