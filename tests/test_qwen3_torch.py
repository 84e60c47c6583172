"""The plain-torch Qwen3 (`workbench.models.qwen3_torch`) computes exactly what transformers' Qwen3 computes.

The trainer runs it for full-parameter jobs, so every figure a user compares against transformers (the
deployment's logprobs, a plain transformers training loop) depends on it being bit-identical: logits and
gradients are compared with `torch.equal`, not a tolerance. A trainer process must also not import
transformers for such a job (that is the point of the module: memory and start-up time).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from workbench import models
from workbench.models import qwen3_torch

TINY = "accounts/workbench/models/qwen3-tiny"


def test_logits_and_gradients_are_bit_identical_to_transformers():
    reference = models.load_model(TINY)
    plain = qwen3_torch.load(models.local_path(TINY))
    assert plain is not None
    # Same names in the same order: state_dict/DCP/sampler exports interchangeable, same optimizer order.
    assert list(reference.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in reference.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert plain.lm_head.weight is plain.model.embed_tokens.weight   # tied, as the config says
    g = torch.Generator().manual_seed(0)
    for batch, length in [(1, 1), (1, 5), (3, 40)]:
        ids = torch.randint(0, reference.config.vocab_size, (batch, length), generator=g)
        ids[0, 0] = reference.config.pad_token_id   # the padding row gets no gradient in both
        want = reference(input_ids=ids, use_cache=False).logits
        got = plain(input_ids=ids, use_cache=False).logits
        assert torch.equal(want, got), (batch, length, (want - got).abs().max())
        torch.log_softmax(want, -1)[..., 3].sum().backward()
        torch.log_softmax(got, -1)[..., 3].sum().backward()
        for (name, p), (_, q) in zip(reference.named_parameters(), plain.named_parameters()):
            assert torch.equal(p.grad, q.grad), (batch, length, name)
        reference.zero_grad()
        plain.zero_grad()


def test_unsupported_models_fall_back(tmp_path):
    src = models.local_path(TINY)
    for change in ({"model_type": "llama"}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
                   {"use_sliding_window": True}):
        d = tmp_path / next(iter(change))
        shutil.copytree(src, d)
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **change}))
        assert qwen3_torch.load(d) is None, change
    assert qwen3_torch.load(tmp_path / "missing") is None


def test_loading_it_imports_no_transformers():
    # nor does a training step with the trainer's AdamW (torch.optim's own imports torch._dynamo: ~71 MiB),
    # nor the trainer's and replica's servers: plain Starlette (fastapi was ~0.57 CPU s of a trainer's start)
    code = ("import sys; from workbench import models; from workbench.models import qwen3_torch; "
            "from workbench.backend.trainer.optim import AdamW; "
            "import workbench.backend.trainer.__main__, workbench.backend.trainer.server, "
            "workbench.backend.trainer.local_torch, workbench.backend.deployment.server; "
            f"m = qwen3_torch.load(models.local_path({TINY!r})); o = AdamW(list(m.parameters()), lr=1e-3); "
            "m(input_ids=__import__('torch').tensor([[1, 2]])).logits.sum().backward(); "
            "o.step(); o.zero_grad(set_to_none=True); "
            "bad = [k for k in ('transformers', 'torch._dynamo', 'torch.distributed.checkpoint', 'fastapi') "
            "if k in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_kv_cache_path_matches_transformers_decoder_layers():
    """The deployment's KV-cache runner (positions, boolean mask, cache object) computes the same logits over
    this module as over transformers' own decoder layers: left-padded prefills, decode steps, a row admitted
    mid-flight (the cache shifts) and a row removed (the last row moves into its place)."""
    from workbench.backend.deployment.runners import KVRunner

    reference = KVRunner(models.load_model(TINY))
    plain = KVRunner(qwen3_torch.load(models.local_path(TINY)))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(7, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 30)]

    def both(call, *args):
        want, got = getattr(reference, call)(*args), getattr(plain, call)(*args)
        return want, got

    (want, want_full), (got, got_full) = both("prefill", prompts[:3], [True, False, False])
    assert torch.equal(want, got) and torch.equal(want_full[0], got_full[0])
    for step in range(6):
        if step == 2:       # a longer prompt joins: every row's history shifts right
            (want, _), (got, _) = both("prefill", prompts[3:], [False])
            assert torch.equal(want, got)
        if step == 4:
            both("remove", 1)
        tokens = [int(t) for t in torch.randint(7, 512, (reference.n,), generator=g)]
        want, got = both("decode", tokens)
        assert want.shape[0] == reference.n and torch.equal(want, got), (step, (want - got).abs().max())
