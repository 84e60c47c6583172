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

Each loss is one `LossSpec` entry in `LOSSES` (name, required and optional inputs, config defaults,
function); `protocol.parse_forward_input` validates a request against the entry, so adding a loss is
one `register(LossSpec(...))` call and nothing else. Input keys a loss does not use are accepted and
ignored (the service does the same: RL reference datums carry `loss_mask` with `cross_entropy`).

For the policy-gradient losses an optional `weights` input multiplies the per-token loss (a mask);
absent, it is all ones. `clip_low_threshold` / `clip_high_threshold` may come from `loss_fn_config`
(scalars) or from `loss_fn_inputs` (per-token tensors, which win).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """One built-in loss: everything the trainer needs to validate its inputs and compute it.

    `fn(lp, inputs, config)` returns the per-token loss (shaped like `lp`); `inputs` holds the datum's
    `loss_fn_inputs` as tensors (the required ones always present, optional ones when sent) and
    `config` is `config_defaults` overlaid with the request's `loss_fn_config`.
    """

    name: str
    """The wire `loss_fn` value (the SDK only sends names in its `LossFnType`)."""
    fn: LossFn
    """Per-token loss of one datum: (lp, inputs, config) -> tensor shaped like lp."""
    required: tuple[str, ...] = ("target_tokens",)
    """loss_fn_inputs every datum must carry (a `user` error naming the key when one is missing)."""
    optional: tuple[str, ...] = ()
    """loss_fn_inputs the loss uses when present; any other key a datum carries is ignored."""
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    """loss_fn_config keys the loss understands, with their defaults; other keys are user errors."""
    int_inputs: frozenset[str] = frozenset({"target_tokens"})
    """Inputs that are integer-valued (int64) on the wire; the rest are float32."""

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required + self.optional


# name -> spec. A new built-in loss is one `register(LossSpec(...))` call.
LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add (or replace) a built-in loss; returns the spec."""
    LOSSES[spec.name] = spec
    return spec


def supported_losses() -> tuple[str, ...]:
    return tuple(LOSSES)


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
    out = dict(LOSSES[loss_fn].config_defaults)
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


def compute_loss(loss_fn: str, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float]) -> torch.Tensor:
    """Per-token loss for one datum; its sum is the datum's contribution to L.

    lp: target logprobs (differentiable), shape S; inputs: loss_fn_inputs as tensors of shape S
    (target_tokens int64, the rest float32); config: the output of `resolve_config`.
    """
    return LOSSES[loss_fn].fn(lp, inputs, config)


def _masked(per_token: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    weights = inputs.get("weights")
    return per_token * weights if weights is not None else per_token


def _cross_entropy(lp, inputs, config):
    weights = inputs.get("weights")
    return -(weights * lp) if weights is not None else -lp


def _ratio(lp, inputs):
    return torch.exp(lp - inputs["logprobs"])


def _importance_sampling(lp, inputs, config):
    return _masked(-(_ratio(lp, inputs) * inputs["advantages"]), inputs)


def _clipped_ratio(ratio, inputs, config):
    low = torch.as_tensor(inputs.get("clip_low_threshold", config["clip_low_threshold"]), dtype=ratio.dtype)
    high = torch.as_tensor(inputs.get("clip_high_threshold", config["clip_high_threshold"]), dtype=ratio.dtype)
    return torch.clamp(ratio, min=low, max=high)


def _ppo(lp, inputs, config):
    ratio, advantages = _ratio(lp, inputs), inputs["advantages"]
    clipped = _clipped_ratio(ratio, inputs, config)
    return _masked(-torch.minimum(ratio * advantages, clipped * advantages), inputs)


def _cispo(lp, inputs, config):
    clipped = _clipped_ratio(_ratio(lp, inputs), inputs, config)
    return _masked(-(clipped.detach() * lp * inputs["advantages"]), inputs)


_POLICY = ("target_tokens", "logprobs", "advantages")
_CLIPS = ("weights", "clip_low_threshold", "clip_high_threshold")
register(LossSpec("cross_entropy", _cross_entropy, optional=("weights",)))
register(LossSpec("importance_sampling", _importance_sampling, required=_POLICY, optional=("weights",)))
register(LossSpec("ppo", _ppo, required=_POLICY, optional=_CLIPS,
                  config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}))
register(LossSpec("cispo", _cispo, required=_POLICY, optional=_CLIPS,
                  config_defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}))


def loss_token_count(inputs: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: nonzero weights, or every target when weights are absent.

    Same rule as the SDK's own `response_tokens` count, so both sides agree on what
    `grad_accumulation_normalization="num_loss_tokens"` divides by.
    """
    weights = inputs.get("weights")
    if weights is None:
        return int(inputs["target_tokens"].numel())
    return int(torch.count_nonzero(weights).item())
