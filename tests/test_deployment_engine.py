"""In-process tests of the deployment replica's engine, wire format and HTTP edge cases.

The engine is checked against transformers itself: every logprob it reports must equal the fp32
log-softmax of a plain full-sequence forward of the same weights (within 1e-4), for sequences that
were batched together, admitted mid-flight, left-padded and moved between cache rows.
"""

from __future__ import annotations

import time

import pytest
import torch

from workbench import models
from workbench.backend.deployment.detokenize import Choice, ChoiceSink
from workbench.backend.deployment.engine import Engine, SamplingParams, Sequence
from workbench.backend.deployment.protocol import InvalidRequest, parse_completion_request
from workbench.backend.deployment.weights import bf16_round_

TINY = models.DEFAULT_MODEL


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model = models.load_model(TINY).eval()
    bf16_round_(model)
    return model, models.load_tokenizer(TINY)


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_against_transformers(model, s: Sequence, tol=1e-4) -> None:
    full = s.prompt_ids + s.token_ids
    lsm = ref_logprobs(model, full)
    p = len(s.prompt_ids)
    for j, info in enumerate(s.output):
        assert abs(info.logprob - float(lsm[p - 1 + j, info.token_id])) < tol, (j, info)
        for tid, lp in info.top:
            assert abs(lp - float(lsm[p - 1 + j, tid])) < tol
    for k, info in enumerate(s.echo):
        pos = p - len(s.echo) + k
        want = 0.0 if pos == 0 else float(lsm[pos - 1, info.token_id])
        assert abs(info.logprob - want) < tol


def run(engine: Engine, seqs: list[Sequence], stagger: float = 0.0, submit: bool = True) -> None:
    for s in seqs if submit else []:
        engine.submit(s)
        if stagger:
            time.sleep(stagger)
    for s in seqs:
        assert s.done.wait(60), "sequence did not finish"
        assert s.error is None, s.error


def run_text(engine: Engine, tok, prompt: list[int], params: SamplingParams) -> tuple[Sequence, Choice]:
    """Generate one choice through the wire layer's sink (detokenization, stop strings)."""
    choice = Choice(0, prompt, params, tok)
    sink = ChoiceSink(engine, choice, tok, lambda item: None, stream_text=params.stream)
    s = Sequence(prompt, params, sink=sink)
    sink.bind(s)
    run(engine, [s])
    assert choice.done
    return s, choice


def make_prompts(n, seed=0, lo=1, hi=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_plain():
    """The model a replica serves the embedded models with: the plain-torch Qwen3, rounded to bf16 like `tiny`."""
    model = models.load_model(TINY, plain=True)
    bf16_round_(model)
    return model, models.load_tokenizer(TINY, plain=True)


@pytest.mark.parametrize("runner", ["kv-cache", "recompute-fallback", "plain-torch-kv-cache"])
def test_logprobs_match_transformers_while_batched(tiny, tiny_plain, runner):
    model, tok = tiny
    recompute = runner == "recompute-fallback"
    served, served_tok = tiny_plain if runner == "plain-torch-kv-cache" else tiny
    engine = Engine(served, served_tok, force_recompute=recompute).start()
    try:
        assert engine.use_kv is not recompute
        assert (engine.load()["model_code"] == "workbench.models.qwen3_torch") is (runner == "plain-torch-kv-cache")
        prompts = make_prompts(10, seed=1)
        seqs = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=12 + 5 * (i % 3), temperature=[1.0, 0.7, 0.0, 1.3][i % 4],
                                    top_p=[1.0, 0.9][i % 2], top_k=[0, 0, 20][i % 3], logprobs=True,
                                    top_logprobs=3, echo_count=len(p) if i % 4 == 1 else 0,
                                    ignore_eos=True, stream=bool(i % 2))
            seqs.append(Sequence(p, params))
        # the first half starts alone; the second half (longer prompts among them) joins mid-flight
        run(engine, seqs[:5])
        later = [Sequence(p + p, s.params) for p, s in zip(prompts[5:], seqs[5:])]
        first = [Sequence(p, SamplingParams(max_tokens=40, ignore_eos=True, logprobs=True)) for p in prompts[:3]]
        for s in first:
            engine.submit(s)
        run(engine, later, stagger=0.01)
        run(engine, first, submit=False)
        assert engine.max_batch_seen >= 3
        for s in seqs[:5] + later + first:
            assert len(s.output) == s.params.max_tokens and s.finish_reason == "length"
            check_against_transformers(model, s)
    finally:
        engine.stop()


def test_plain_torch_model_refuses_the_recompute_runner(tiny_plain):
    with pytest.raises(ValueError, match="KV cache only"):   # it takes no padding mask
        Engine(tiny_plain[0], tiny_plain[1], force_recompute=True)


def test_greedy_matches_generate_and_cache_grows(tiny):
    model, tok = tiny
    engine = Engine(model, tok).start()
    try:
        prompts = make_prompts(3, seed=2, lo=5, hi=12)
        seqs = [Sequence(p, SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)) for p in prompts]
        run(engine, seqs)           # 90 new tokens: the cache outgrows its first 64 columns
        for p, s in zip(prompts, seqs):
            out = model.generate(torch.tensor([p]), max_new_tokens=90, min_new_tokens=90, do_sample=False,
                                 pad_token_id=0)
            assert out[0, len(p):].tolist() == s.token_ids
            assert all(t.sampling_logprob == 0.0 for t in s.output)
    finally:
        engine.stop()


def test_an_idle_engine_gives_its_memory_back_and_serves_again(tiny, monkeypatch):
    """Idle IDLE_RELEASE_S after work, the engine drops its KV cache and hands the freed heap back to the OS,
    once per idle spell; the next request builds a new cache and computes the same tokens."""
    from workbench.backend.deployment import engine as engine_module

    model, tok = tiny
    releases = []
    monkeypatch.setattr(engine_module, "IDLE_RELEASE_S", 0.05)
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: releases.append(time.monotonic()))
    engine = Engine(model, tok).start()

    def wait_released(n):
        deadline = time.monotonic() + 60
        while len(releases) < n or engine.runner.k:
            assert time.monotonic() < deadline, "the idle engine kept its memory"
            time.sleep(0.01)

    try:
        prompt = make_prompts(1, seed=4, lo=5, hi=12)[0]
        first = Sequence(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        run(engine, [first])
        wait_released(1)
        again = Sequence(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        run(engine, [again])
        assert again.token_ids == first.token_ids
        wait_released(2)
    finally:
        engine.stop()
    assert len(releases) == 2          # one per idle spell, not one per wait


def test_sampling_controls(tiny):
    model, tok = tiny
    engine = Engine(model, tok).start()
    try:
        p = make_prompts(1, seed=3, lo=8, hi=9)[0]
        seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=42, ignore_eos=True, logprobs=True)
        alone = Sequence(p, seeded)
        run(engine, [alone])
        crowd = [Sequence(q, SamplingParams(max_tokens=20, ignore_eos=True)) for q in make_prompts(6, seed=4)]
        again = Sequence(p, seeded)
        run(engine, crowd[:3] + [again] + crowd[3:])
        assert again.token_ids == alone.token_ids      # a seed does not depend on the batch

        greedy = Sequence(p, SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))
        top1 = Sequence(p, SamplingParams(max_tokens=15, temperature=1.0, top_k=1, ignore_eos=True, logprobs=True))
        run(engine, [greedy, top1])
        assert top1.token_ids == greedy.token_ids
        assert all(abs(t.sampling_logprob) < 1e-6 for t in top1.output)

        # sampling_logprob is the log-probability under the tempered distribution actually sampled
        hot = Sequence(p, SamplingParams(max_tokens=10, temperature=2.0, ignore_eos=True, logprobs=True))
        run(engine, [hot])
        with torch.no_grad():
            logits = model(torch.tensor([p + hot.token_ids])).logits[0].float()
        for j, t in enumerate(hot.output):
            want = float(torch.log_softmax(logits[len(p) - 1 + j] / 2.0, -1)[t.token_id])
            assert abs(t.sampling_logprob - want) < 1e-4

        # stop strings: the text ends before the stop string, and generation stops there
        _, ref = run_text(engine, tok, p, SamplingParams(max_tokens=30, seed=7, ignore_eos=True))
        text = ref.text
        assert text == tok.decode(ref.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = next(i for i in range(len(text) // 3, len(text)) if text[i:i + 2].strip() and
                   text.find(text[i:i + 2]) == i)
        s, stopped = run_text(engine, tok, p, SamplingParams(max_tokens=30, seed=7, ignore_eos=True,
                                                              stop=[text[cut:cut + 2]], stream=True))
        assert stopped.finish_reason == "stop"
        assert stopped.text == text[:cut]
        assert len(stopped.output) < 30 and stopped.token_ids == ref.token_ids[:len(stopped.output)]
        assert s.finish_reason == "cancelled"      # the wire layer cancelled it at the stop string
        assert len(s.output) <= len(stopped.output) + 1

        # max_tokens=0 with echo scores the prompt only
        score = Sequence(p, SamplingParams(max_tokens=0, logprobs=True, echo_count=len(p)))
        run(engine, [score])
        assert score.output == [] and len(score.echo) == len(p) and score.finish_reason == "length"
        check_against_transformers(model, score)
    finally:
        engine.stop()


def test_request_validation(tiny):
    _, tok = tiny
    served = {"accounts/x/deployments/d"}

    def parse(**body):
        base = {"model": "accounts/x/deployments/d", "prompt": [1, 2, 3]}
        base.update(body)
        return parse_completion_request({k: v for k, v in base.items() if v is not ...}, tok, 512, 64, served)

    req = parse(prompt="hello there", logprobs=3, echo=True, stop="x", seed=1, top_k=-1, prompt_cache_key="k")
    assert req.prompt_was_text and req.params.logprobs and req.params.top_logprobs == 3
    assert req.params.echo_count == len(req.prompt_ids) and req.params.stop == ["x"] and req.params.top_k == 0
    assert parse(logprobs=True, top_logprobs=2, echo_last=1, include_routing_matrix=False).params.echo_count == 1
    # prompt + max_tokens over the context: max_tokens is lowered to fit (Fireworks' default "truncate")
    assert parse(max_tokens=62).params.max_tokens == 64 - 3
    assert parse(max_tokens=32768, context_length_exceeded_behavior="truncate").params.max_tokens == 61
    assert parse(prompt=list(range(1, 65)), max_tokens=5).params.max_tokens == 0
    assert parse(top_k=10 ** 6).params.top_k == 512     # above the vocabulary: no cut
    bad = [({"foo": 1}, "foo"), ({"model": "accounts/x/deployments/other"}, "model"), ({"model": ...}, "model"),
           ({"prompt": []}, "prompt"), ({"prompt": [1, 999]}, "prompt"), ({"prompt": [[1, 2]]}, "prompt"),
           ({"n": 0}, "n"), ({"max_tokens": -1}, "max_tokens"),
           ({"max_tokens": 62, "context_length_exceeded_behavior": "error"}, "max_tokens"),
           ({"context_length_exceeded_behavior": "drop"}, "context_length_exceeded_behavior"),
           ({"prompt": list(range(1, 66))}, "prompt"), ({"max_tokens": 2 ** 31}, "max_tokens"),
           ({"top_k": 10 ** 30}, "top_k"), ({"top_k": -2}, "top_k"), ({"seed": 2 ** 64}, "seed"),
           ({"echo_last": 10 ** 20}, "echo_last"), ({"temperature": 1e308}, "temperature"),
           ({"prompt": "hi \udcff"}, "prompt"), ({"stop": ["\ud800"]}, "stop"),
           ({"temperature": -0.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
           ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 1.5}, "top_k"), ({"seed": "s"}, "seed"),
           ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"), ({"logprobs": 99}, "logprobs"),
           ({"top_logprobs": 21}, "top_logprobs"), ({"echo": "yes"}, "echo"), ({"stream": 1}, "stream"),
           ({"images": ["x"]}, "images"), ({"include_routing_matrix": True}, "include_routing_matrix"),
           ({"presence_penalty": 0.5}, "presence_penalty")]
    for body, field in bad:
        with pytest.raises(InvalidRequest) as e:
            parse(**body)
        assert e.value.field == field, body


def test_http_edges_before_weights_load(tmp_path):
    """Auth, the 425 branch before weights are loaded, and the hot-load GET schema, on the real app
    with a BuiltinReplica that has not started."""
    from starlette.testclient import TestClient

    from workbench.backend.deployment.builtin import BuiltinReplica
    from workbench.backend.deployment.server import create_app

    replica = BuiltinReplica(tmp_path, {"deployment_id": "d", "account": "x", "base_model": TINY})
    client = TestClient(create_app(replica, api_key="secret"))
    body = {"model": "accounts/x/deployments/d", "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0}
    r = client.post("/inference/v1/completions", json=body)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = client.post("/inference/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post("/inference/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 425 and "loading" in r.json()["error"]["message"]
    r = client.get("/hot_load/v1/models/hot_load", headers={"X-Api-Key": "secret"})
    replica = r.json()["replicas"][0]
    assert replica["readiness"] is False and replica["current_snapshot_identity"] is None
    assert replica["loading_state"]["stage"] == "loading"
    assert client.get("/healthz", headers={"X-Api-Key": "secret"}).json()["ready"] is False
    assert client.get("/readyz", headers={"X-Api-Key": "secret"}).status_code == 503
    # hot-load body validation happens before any load is attempted
    r = client.post("/hot_load/v1/models/hot_load", headers={"X-Api-Key": "secret"},
                    json={"identity": "a", "bogus": 1})
    assert r.status_code == 400 and "Extra inputs are not permitted" in r.json()["error"]["message"]


def test_one_sequence_failing_never_fails_its_batch(tiny):
    """A sequence whose sampling raises (a parameter no validation would let through) fails alone;
    the sequences batched with it finish normally, in prefill and in decode."""
    model, tok = tiny
    engine = Engine(model, tok).start()
    try:
        prompts = make_prompts(6, seed=11)
        healthy = [Sequence(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts[:5]]
        bad = Sequence(prompts[5], SamplingParams(max_tokens=8, ignore_eos=True, top_p="not a number"))
        seqs = healthy[:2] + [bad] + healthy[2:]
        for s in seqs:
            engine.submit(s)
        for s in seqs:
            assert s.done.wait(60)
        assert bad.error and bad.finish_reason == "error"
        assert all(s.error is None and len(s.output) == 8 for s in healthy)
        # and the engine goes on serving
        after = Sequence(prompts[0], SamplingParams(max_tokens=3, ignore_eos=True))
        run(engine, [after])
        assert len(after.output) == 3
    finally:
        engine.stop()
