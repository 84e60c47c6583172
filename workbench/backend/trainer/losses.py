"""Built-in loss functions of the trainer, on plain tensors (no HTTP, no model).

The engine computes, for one datum, the per-token log-probabilities of the target tokens
(`target_logprobs`) and hands them here together with the datum's other `loss_fn_inputs` as
float/int tensors; `compute_loss` returns the per-token (elementwise) loss, whose plain sum is the
datum's loss. The engine sums datum losses and backpropagates that raw sum: no normalization happens
here, because the SDK's `forward_backward_custom` relies on `cross_entropy` being exactly
`L = sum_t -weights[t] * logprob[t]` (wire contract §7.7) and normalization belongs to
`optim_step(grad_accumulation_normalization=...)`.

    lp = target_logprobs(logits, targets)                       # same shape as targets, fp32
    elementwise = compute_loss("ppo", lp, {"target_tokens": ..., "logprobs": ..., "advantages": ...},
                               {"clip_low_threshold": 0.8})
    loss = elementwise.sum()

Definitions follow the Tinker loss documentation, which the SDK's loss names come from:

* `cross_entropy`:        -weights * lp                                   (weights default to ones)
* `importance_sampling`:  -ratio * advantages, ratio = exp(lp - sampling_logprobs)
* `ppo`:                  -min(ratio * A, clamp(ratio, clip_low, clip_high) * A)   (defaults 0.8 / 1.2)
* `cispo`:                -(clamp(ratio, clip_low, clip_high).detach() * lp * A)   (defaults 0.0 / 4.0)

For the policy-gradient losses an optional `weights` input multiplies the per-token loss (a mask);
absent, it is all ones. `clip_low_threshold` / `clip_high_threshold` may come from `loss_fn_config`
(scalars) or from `loss_fn_inputs` (per-token tensors, which win).
"""

from __future__ import annotations

import math

import torch

# Inputs each loss requires / additionally accepts. The engine rejects anything else with a user
# error naming the key, so a typo never silently changes the objective.
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
}
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("weights",),
    "ppo": ("weights", "clip_low_threshold", "clip_high_threshold"),
    "cispo": ("weights", "clip_low_threshold", "clip_high_threshold"),
}
# loss_fn_config keys each loss understands, with their defaults.
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
}
SUPPORTED_LOSSES = tuple(REQUIRED_INPUTS)
# Integer-valued inputs; every other input is float32 on the wire.
INT_INPUTS = frozenset({"target_tokens"})


class LossConfigError(ValueError):
    """A loss_fn_config entry is unknown or not a finite number (a caller error)."""


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., t, targets[..., t, k]] in fp32.

    logits: (*B, T, V); targets: (*B, T) or (*B, T, K) int64 -> a result shaped like `targets`.
    Position t of the model input predicts targets[t] (the standard shifted alignment).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if targets.dim() == logits.dim() - 1:
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    flat = targets.reshape(*targets.shape[:logits.dim() - 1], -1)
    return logp.gather(-1, flat).reshape(targets.shape)


def resolve_config(loss_fn: str, config: dict | None) -> dict[str, float]:
    """Defaults overlaid with the caller's loss_fn_config; unknown keys / non-numbers are errors."""
    out = dict(CONFIG_DEFAULTS[loss_fn])
    for key, value in (config or {}).items():
        if key == "target_logprob_support":
            # The SDK may spell out its default; it is the only mode this trainer computes
            # (it advertises no `supports_target_logprob_support`).
            if value != "full_vocabulary":
                raise LossConfigError(
                    f"loss_fn_config.target_logprob_support={value!r} is not supported; "
                    "this trainer computes 'full_vocabulary' logprobs only")
            continue
        if key not in out:
            known = ", ".join(sorted(out)) or "none"
            raise LossConfigError(
                f"loss_fn_config.{key} is not supported by loss_fn={loss_fn!r} (supported keys: {known})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LossConfigError(f"loss_fn_config.{key} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


def compute_loss(loss_fn: str, lp: torch.Tensor, inputs: dict[str, torch.Tensor],
                 config: dict[str, float]) -> torch.Tensor:
    """Per-token loss for one datum; its sum is the datum's contribution to L.

    lp: target logprobs (differentiable), shape S; inputs: loss_fn_inputs as tensors of shape S
    (target_tokens int64, the rest float32); config: the output of `resolve_config`.
    """
    weights = inputs.get("weights")
    if loss_fn == "cross_entropy":
        return -(weights * lp) if weights is not None else -lp

    sampling_lp = inputs["logprobs"]
    advantages = inputs["advantages"]
    ratio = torch.exp(lp - sampling_lp)
    if loss_fn == "importance_sampling":
        per_token = -(ratio * advantages)
    elif loss_fn in ("ppo", "cispo"):
        low = inputs.get("clip_low_threshold", config["clip_low_threshold"])
        high = inputs.get("clip_high_threshold", config["clip_high_threshold"])
        low_t = torch.as_tensor(low, dtype=ratio.dtype)
        high_t = torch.as_tensor(high, dtype=ratio.dtype)
        clipped = torch.clamp(ratio, min=low_t, max=high_t)
        if loss_fn == "ppo":
            per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        else:
            per_token = -(clipped.detach() * lp * advantages)
    else:  # the engine validates loss_fn first; this is a programming error
        raise KeyError(loss_fn)
    return per_token * weights if weights is not None else per_token


def loss_token_count(inputs: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: nonzero weights, or every target when weights are absent.

    Same rule as the SDK's own `response_tokens` count, so both sides agree on what
    `grad_accumulation_normalization="num_loss_tokens"` divides by.
    """
    weights = inputs.get("weights")
    if weights is None:
        return int(inputs["target_tokens"].numel())
    return int(torch.count_nonzero(weights).item())
