"""Unit tests of the trainer's loss functions and TensorData parsing (no model, no HTTP; < 1 s).

Each built-in loss is checked against a hand-written formula, value and gradient (autograd through
the logits), so a sign, clamp or detach slip shows up here rather than in a training run.
"""

from __future__ import annotations

import pytest
import torch

from workbench.backend.trainer import losses
from workbench.backend.trainer.protocol import UserError, parse_tensor_data

T, V = 6, 11


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V, generator=g, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, V, (T,), generator=g)
    sampling = torch.log_softmax(torch.randn(T, V, generator=g), -1).gather(-1, targets[:, None]).squeeze(-1)
    advantages = torch.randn(T, generator=g)
    weights = torch.tensor([0.0, 1.0, 0.5, -2.0, 1.0, 0.0])
    return logits, targets, sampling, advantages, weights


def _hand_lp(logits, targets):
    # log p(target) = logit[target] - logsumexp(logits), written out independently of log_softmax
    return logits[torch.arange(T), targets] - torch.logsumexp(logits, dim=-1)


def _grad(value: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, wrt)
    return g


def test_target_logprobs_1d_and_2d():
    logits, targets, *_ = _case()
    lp = losses.target_logprobs(logits, targets)
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, _hand_lp(logits, targets))
    two = torch.stack([targets, (targets + 1) % V], dim=1)            # (T, 2) candidate targets
    lp2 = losses.target_logprobs(logits, two)
    assert lp2.shape == (T, 2)
    torch.testing.assert_close(lp2[:, 0], lp)
    torch.testing.assert_close(lp2[:, 1], _hand_lp(logits, two[:, 1]))


def test_cross_entropy_is_raw_weighted_sum():
    logits, targets, _, _, weights = _case(1)
    inputs = {"target_tokens": targets, "weights": weights}
    lp = losses.target_logprobs(logits, targets)
    elementwise = losses.compute_loss("cross_entropy", lp, inputs, losses.resolve_config("cross_entropy", None))
    expected = (-weights * _hand_lp(logits, targets)).sum()         # no normalization of any kind
    torch.testing.assert_close(elementwise.sum(), expected)
    torch.testing.assert_close(_grad(elementwise.sum(), logits), _grad(expected, logits))
    # weights absent = all ones
    lp = losses.target_logprobs(logits, targets)
    plain = losses.compute_loss("cross_entropy", lp, {"target_tokens": targets}, {})
    torch.testing.assert_close(plain.sum(), -_hand_lp(logits, targets).sum())


def test_importance_sampling():
    logits, targets, sampling, adv, _ = _case(2)
    inputs = {"target_tokens": targets, "logprobs": sampling, "advantages": adv}
    got = losses.compute_loss("importance_sampling", losses.target_logprobs(logits, targets), inputs, {}).sum()
    expected = -(torch.exp(_hand_lp(logits, targets) - sampling) * adv).sum()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_grad(got, logits), _grad(expected, logits))


@pytest.mark.parametrize("config", [None, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}])
def test_ppo_clips_both_sides(config):
    logits, targets, sampling, adv, _ = _case(3)
    # Spread the ratios so some tokens fall under, inside and over the clip range.
    sampling = _hand_lp(logits, targets).detach() + torch.tensor([0.5, -0.5, 0.01, -0.3, 0.3, 0.0])
    inputs = {"target_tokens": targets, "logprobs": sampling, "advantages": adv}
    cfg = losses.resolve_config("ppo", config)
    low, high = (0.8, 1.2) if config is None else (0.9, 1.05)
    assert (cfg["clip_low_threshold"], cfg["clip_high_threshold"]) == (low, high)
    got = losses.compute_loss("ppo", losses.target_logprobs(logits, targets), inputs, cfg).sum()
    ratio = torch.exp(_hand_lp(logits, targets) - sampling)
    expected = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv).sum()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_grad(got, logits), _grad(expected, logits))


def test_ppo_per_token_thresholds_override_config():
    logits, targets, sampling, adv, _ = _case(4)
    low = torch.full((T,), 0.95)
    high = torch.full((T,), 1.01)
    inputs = {"target_tokens": targets, "logprobs": sampling, "advantages": adv,
              "clip_low_threshold": low, "clip_high_threshold": high}
    got = losses.compute_loss("ppo", losses.target_logprobs(logits, targets), inputs,
                              losses.resolve_config("ppo", None)).sum()
    ratio = torch.exp(_hand_lp(logits, targets) - sampling)
    expected = -torch.min(ratio * adv, torch.clamp(ratio, 0.95, 1.01) * adv).sum()
    torch.testing.assert_close(got, expected)


def test_cispo_detaches_the_clipped_ratio():
    logits, targets, sampling, adv, _ = _case(5)
    inputs = {"target_tokens": targets, "logprobs": sampling, "advantages": adv}
    cfg = losses.resolve_config("cispo", None)
    assert (cfg["clip_low_threshold"], cfg["clip_high_threshold"]) == (0.0, 4.0)
    got = losses.compute_loss("cispo", losses.target_logprobs(logits, targets), inputs, cfg).sum()
    lp = _hand_lp(logits, targets)
    coef = torch.clamp(torch.exp(lp - sampling), 0.0, 4.0).detach()
    expected = -(coef * lp * adv).sum()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_grad(got, logits), _grad(expected, logits))


def test_weights_mask_policy_losses_and_count_loss_tokens():
    logits, targets, sampling, adv, weights = _case(6)
    inputs = {"target_tokens": targets, "logprobs": sampling, "advantages": adv, "weights": weights}
    got = losses.compute_loss("importance_sampling", losses.target_logprobs(logits, targets), inputs, {})
    expected = -(torch.exp(_hand_lp(logits, targets) - sampling) * adv) * weights
    torch.testing.assert_close(got, expected)
    assert losses.loss_token_count(inputs) == 4                  # nonzero weights
    assert losses.loss_token_count({"target_tokens": targets}) == T


def test_resolve_config_rejects_unknown_and_non_numbers():
    with pytest.raises(losses.LossConfigError, match="clip_low_threshold"):
        losses.resolve_config("cross_entropy", {"clip_low_threshold": 0.9})
    with pytest.raises(losses.LossConfigError, match="finite number"):
        losses.resolve_config("ppo", {"clip_high_threshold": "big"})
    with pytest.raises(losses.LossConfigError, match="target_logprob_support"):
        losses.resolve_config("ppo", {"target_logprob_support": "sampling_support"})
    assert losses.resolve_config("ppo", {"target_logprob_support": "full_vocabulary"})["clip_high_threshold"] == 1.2


def test_parse_tensor_data_dense_sparse_and_errors():
    dense = parse_tensor_data({"data": [1, 2, 3, 4], "dtype": "int64", "shape": [2, 2]}, "x", want_int=True)
    assert dense.dtype == torch.int64 and dense.tolist() == [[1, 2], [3, 4]]
    assert parse_tensor_data({"data": [0.5], "dtype": "float32"}, "w", want_int=False).tolist() == [0.5]
    dense_w = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    csr = dense_w.to_sparse_csr()
    sparse = parse_tensor_data({"data": csr.values().tolist(), "dtype": "float32", "shape": [3, 3],
                                "sparse_crow_indices": csr.crow_indices().tolist(),
                                "sparse_col_indices": csr.col_indices().tolist()}, "w", want_int=False)
    assert torch.equal(sparse, dense_w)
    bad = [
        ({"data": [1.5], "dtype": "int64"}, "non-integer"),
        ({"data": [1, 2], "dtype": "float64"}, "dtype"),
        ({"data": [1, 2], "dtype": "float32", "shape": [3]}, "shape"),
        ({"data": [1.0], "dtype": "float32", "device": "cuda"}, "unknown TensorData keys"),
        ({"data": [float("nan")], "dtype": "float32"}, "NaN"),
        ({"data": [1.0, 1e39], "dtype": "float32"}, "infinite values .*1e\\+39 at index 1"),   # overflows float32
        ({"data": [1.0], "dtype": "float32", "shape": [2**32, 2**32], "sparse_crow_indices": [0],
          "sparse_col_indices": []}, "more than this trainer's limit"),    # checked before densifying
        ({"data": [1.0], "dtype": "float32", "shape": [1, 1], "sparse_crow_indices": [0, 2],
          "sparse_col_indices": [0]}, "CSR"),
    ]
    for value, needle in bad:
        with pytest.raises(UserError, match=needle) as info:
            parse_tensor_data(value, "data[2].loss_fn_inputs.weights", want_int=False)
        assert "data[2].loss_fn_inputs.weights" in str(info.value)
    with pytest.raises(UserError, match="int64"):
        parse_tensor_data({"data": [1.0], "dtype": "float32"}, "t", want_int=True)
