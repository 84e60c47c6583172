"""Issue 11, end to end: seed 003's research loop with the deployment served by vLLM.

One backend, one trainer, one vLLM deployment (shape `deploymentShapes/vllm-cpu`) and one built-in twin
fed the same snapshots, for the whole module: vLLM's startup costs minutes on a busy CPU, so every vLLM
check shares one replica (and one restart, for the SIGKILL check, which runs last).

Checks: WeightSyncer base-then-delta hot loads into the running vLLM engine, `check_deployment_state()`
after each; `DeploymentSampler.sample_with_tokens(n=4)` with an AdaptiveConcurrencyController; SSE with
raw_output and perf_metrics (prefill-queue-duration from vLLM's scheduler); vLLM's per-token logprobs
against the built-in engine's on the same snapshot; a corrupted delta and a wrong-base delta refused
while vLLM keeps serving; then, on the same running replica re-pointed at a LoRA trainer, two PEFT
adapter snapshots served through vLLM's LoRA support (logprobs against the built-in engine's merge of
the same adapter), a broken adapter refused while the previous one keeps serving; last, a SIGKILLed
vLLM replica back on the same identity (the last adapter).

Skips (with the reason) only when vLLM's environment is not installed: `bash scripts/install_vllm.sh`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tinker
import torch

from conftest import TINY, TINY_SHAPE
from workbench.backend.deployment.engines import vllm_available

_ok, _why = vllm_available()
pytestmark = [pytest.mark.timeout(1800), pytest.mark.skipif(not _ok, reason=_why)]

VLLM = "vllm-serving"
TWIN = "builtin-twin"
VLLM_SHAPE = "accounts/workbench/deploymentShapes/vllm-cpu"
LORA_SHAPE = "accounts/workbench/trainingShapes/qwen3-tiny-lora-cpu"
LORA_RANK = 4
QA = [("What color is the sky?", "blue"), ("What color is grass?", "green"), ("What is 2 + 3?", "5"),
      ("Say hello.", "hello")]
READY_TIMEOUT_S = 1200   # vLLM startup: ~2-5 min on a loaded 2-core machine


def _replica_status(deploy_mgr, name):
    try:
        replicas = deploy_mgr.hotload_check_status(name, TINY).get("replicas") or []
    except Exception:
        return None
    return replicas[0] if replicas else None


def wait_serving(deploy_mgr, name, timeout=READY_TIMEOUT_S) -> dict:
    """Until the replica reports readiness (its weights are in the engine)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = _replica_status(deploy_mgr, name)
        if st and st.get("readiness"):
            return st
        time.sleep(1)
    raise TimeoutError(f"{name} not ready after {timeout} s: {_replica_status(deploy_mgr, name)}")


@pytest.fixture(scope="module")
def loop(backend):
    from fireworks.training.sdk import DeploymentConfig, FiretitanServiceClient, TrainerJobConfig

    from workbench.models import load_tokenizer
    from workbench.sdk import WeightSyncer

    rlor_mgr = backend.trainer_manager()
    deploy_mgr = backend.deployment_manager()
    profile = rlor_mgr.resolve_training_profile(TINY_SHAPE)
    created = rlor_mgr.create(TrainerJobConfig(base_model=TINY, training_shape_ref=profile.training_shape,
                                               lora_rank=0, learning_rate=1e-3))
    # the LoRA trainer of test_lora_adapters_on_vllm starts while vLLM does (vLLM's start is the long pole)
    lora_job = rlor_mgr.create(TrainerJobConfig(
        base_model=TINY, training_shape_ref=rlor_mgr.resolve_training_profile(LORA_SHAPE).training_shape,
        lora_rank=LORA_RANK, learning_rate=1e-3))
    t0 = time.time()
    for name, shape in ((VLLM, VLLM_SHAPE), (TWIN, None)):
        deploy_mgr.create_or_get(DeploymentConfig(deployment_id=name, base_model=TINY, deployment_shape=shape,
                                                  hot_load_trainer_job=created.job_name,
                                                  min_replica_count=0, max_replica_count=1))
    with ThreadPoolExecutor(max_workers=4) as pool:
        trainer_future = pool.submit(rlor_mgr.wait_for_ready, created.job_id, poll_interval_s=1)
        lora_future = pool.submit(rlor_mgr.wait_for_ready, lora_job.job_id, poll_interval_s=1)
        vllm_future = pool.submit(wait_serving, deploy_mgr, VLLM)
        twin_future = pool.submit(wait_serving, deploy_mgr, TWIN)
        endpoint = trainer_future.result()
        lora_endpoint = lora_future.result()
        twin_future.result()
        vllm_future.result()
    print(f"vLLM replica serving {time.time() - t0:.1f} s after create")
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=0)
    tracker = WeightSyncer(policy_client=client, deploy_mgr=deploy_mgr, deployment_id=VLLM, base_model=TINY,
                           hotload_timeout=600, first_checkpoint_type="base")
    tokenizer = load_tokenizer(TINY)
    yield dict(rlor_mgr=rlor_mgr, deploy_mgr=deploy_mgr, job_id=created.job_id, client=client, tracker=tracker,
               tokenizer=tokenizer, service=service, history=[], lora_job=lora_job, lora_endpoint=lora_endpoint)
    service.close()


def sampler_for(backend, loop, name=VLLM):
    from fireworks.training.sdk import AdaptiveConcurrencyController, DeploymentSampler

    return DeploymentSampler(inference_url=loop["deploy_mgr"].inference_url,
                             model=f"accounts/{loop['deploy_mgr'].account_id}/deployments/{name}",
                             api_key=backend.api_key, tokenizer=loop["tokenizer"],
                             concurrency_controller=AdaptiveConcurrencyController(initial_window=16))


def evaluate(sampler) -> tuple[float, list]:
    async def run():
        return await asyncio.gather(*[sampler.sample_with_tokens(
            messages=[{"role": "user", "content": q}], n=4, max_tokens=6, temperature=1.0, logprobs=True)
            for q, _ in QA])

    groups = asyncio.run(run())
    flat = [c for group in groups for c in group]
    score = sum(c.text.replace("<|im_end|>", "").strip() == a for group, (_, a) in zip(groups, QA) for c in group)
    return score / len(flat), flat


def _chat_prompt(tokenizer, q="What color is the sky?") -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def test_research_loop_on_vllm(backend, loop):
    """Base then two deltas pushed into the running vLLM engine; the SDK sampler after each."""
    from workbench.demo import sft_datums

    client, tracker = loop["client"], loop["tracker"]
    sampler = sampler_for(backend, loop)
    data = sft_datums(loop["tokenizer"], QA)
    adam = tinker.AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    for step in range(1, 31):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
        if step % 10 == 0:
            t0 = time.perf_counter()
            snapshot = tracker.save_and_hotload(f"step-{step:05d}")
            took = time.perf_counter() - t0
            assert tracker.check_deployment_state() == snapshot
            st = _replica_status(loop["deploy_mgr"], VLLM)
            assert st["readiness"] and st["loading_state"]["stage"] == "done", st
            score, completions = evaluate(sampler)
            assert len(completions) == 4 * len(QA)
            for c in completions:
                assert c.completion_len > 0 and len(c.inference_logprobs) == c.completion_len
            loop["history"].append({"step": step, "snapshot": snapshot, "eval_score": score,
                                    "save_and_hotload_s": round(took, 2)})
    print("vLLM eval history", loop["history"])
    assert len(loop["history"]) == 3


def test_sse_raw_output_and_vllm_queue_metrics(backend, loop):
    """Streaming with raw_output token ids and perf_metrics; timings come from vLLM's own stats."""
    prompt = _chat_prompt(loop["tokenizer"])
    body = {"model": f"accounts/workbench/deployments/{VLLM}", "prompt": prompt, "max_tokens": 8, "n": 2,
            "temperature": 1.0, "seed": 3, "logprobs": True, "top_logprobs": 2, "stream": True,
            "raw_output": True, "perf_metrics_in_response": True}
    chunks, done = [], False
    with httpx.stream("POST", backend.base_url + "/inference/v1/completions", headers=backend.headers(),
                      json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done
    finals = [c for ch in chunks for c in ch["choices"] if c.get("finish_reason")]
    assert sorted(c["index"] for c in finals) == [0, 1]
    for c in finals:
        raw = c["raw_output"]
        assert raw["prompt_token_ids"] == prompt and 0 < len(raw["completion_token_ids"]) <= 8
    streamed = [e for ch in chunks for c in ch["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert streamed and all(len(e["top_logprobs"]) == 2 for e in streamed)
    pm = chunks[-1]["perf_metrics"]
    for key in ("prefill-queue-duration", "prefill-duration", "server-time-to-first-token",
                "generation-duration", "server-processing-time", "num-concurrent-requests"):
        assert key in pm, pm
    assert 0.0 <= float(pm["prefill-queue-duration"]) <= float(pm["server-processing-time"])
    assert float(pm["server-time-to-first-token"]) > 0


def _sync_twin(loop):
    """Hot-load the built-in twin with the same base + deltas the vLLM deployment received."""
    deploy_mgr, history = loop["deploy_mgr"], loop["history"]
    prev = None
    for h in history:
        meta = None if prev is None else {"previous_snapshot_identity": prev, "compression_format": "arc_v2",
                                          "checksum_format": "alder32"}
        assert deploy_mgr.hotload_and_wait(TWIN, TINY, h["snapshot"], incremental_snapshot_metadata=meta,
                                           timeout_seconds=120)
        prev = h["snapshot"]
    return prev


def test_vllm_logprobs_match_builtin_engine(backend, loop):
    """Same snapshot on both engines: vLLM's per-token logprobs of its own samples, scored again by the
    built-in engine (echo + logprobs), agree within bf16 rounding."""
    snapshot = loop["tracker"].check_deployment_state()
    assert _sync_twin(loop) == snapshot
    d = _logprob_diffs(backend, loop)
    print(f"vLLM vs built-in engine per-token logprobs on {snapshot}: n={d.numel()} "
          f"mean {d.mean():.2e} max {d.max():.2e}")
    assert d.max().item() < 1e-2   # bf16 weights, fp32 compute on both sides: expected ~1e-5


def _logprob_diffs(backend, loop) -> torch.Tensor:
    """|vLLM's logprob - the built-in twin's| for each token vLLM samples after each QA prompt."""
    tok = loop["tokenizer"]
    diffs = []
    for i, (q, _) in enumerate(QA):
        prompt = _chat_prompt(tok, q)
        r = backend.post("/inference/v1/completions", json={
            "model": f"accounts/workbench/deployments/{VLLM}", "prompt": prompt, "max_tokens": 12,
            "temperature": 1.0, "seed": 100 + i, "logprobs": True, "raw_output": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        completion = choice["raw_output"]["completion_token_ids"]
        served = torch.tensor([e["logprob"] for e in choice["logprobs"]["content"]])
        assert len(completion) == len(served) > 0
        t = backend.post("/inference/v1/completions", json={
            "model": f"accounts/workbench/deployments/{TWIN}", "prompt": prompt + completion, "max_tokens": 0,
            "echo": True, "logprobs": True})
        assert t.status_code == 200, t.text
        scored = torch.tensor([e["logprob"] for e in t.json()["choices"][0]["logprobs"]["content"]])[len(prompt):]
        diffs.append((served - scored).abs())
    return torch.cat(diffs)


def _hotload_fails(loop, identity, metadata=None) -> str:
    deploy_mgr = loop["deploy_mgr"]
    try:
        ok = deploy_mgr.hotload_and_wait(VLLM, TINY, identity, incremental_snapshot_metadata=metadata,
                                         timeout_seconds=60)
    except httpx.HTTPStatusError:
        ok = False
    assert not ok
    status = _replica_status(deploy_mgr, VLLM)
    assert status["loading_state"]["stage"] == "error"
    assert status["loading_state"]["target_snapshot_identity"] == identity
    assert status["readiness"]
    return status["current_snapshot_identity"]


def _greedy(backend, loop) -> list[float]:
    r = backend.post("/inference/v1/completions", json={
        "model": f"accounts/workbench/deployments/{VLLM}", "prompt": _chat_prompt(loop["tokenizer"]),
        "max_tokens": 6, "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    return [e["logprob"] for e in r.json()["choices"][0]["logprobs"]["content"]]


def test_failed_hotloads_keep_vllm_serving(backend, loop):
    client, tracker = loop["client"], loop["tracker"]
    current = tracker.check_deployment_state()
    before = _greedy(backend, loop)
    sampler_dir = backend.home / "jobs" / loop["job_id"] / "sampler"
    bad = client.save_weights_for_sampler_ext("corrupt", checkpoint_type="delta").snapshot_name
    blob = max((p for p in (sampler_dir / bad).iterdir() if p.name != "workbench_checkpoint.json"),
               key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    blob.write_bytes(bytes(data))
    meta = {"previous_snapshot_identity": current, "compression_format": "arc_v2", "checksum_format": "alder32"}
    assert _hotload_fails(loop, bad, meta) == current
    wrong = client.save_weights_for_sampler_ext("wrong-base", checkpoint_type="delta").snapshot_name
    assert _hotload_fails(loop, wrong, dict(meta, previous_snapshot_identity="not-what-it-holds")) == current
    assert tracker.check_deployment_state() == current
    # the engine still holds exactly the previous weights: greedy logprobs unchanged
    after = _greedy(backend, loop)
    assert max(abs(a - b) for a, b in zip(before, after)) < 1e-5
    score, completions = evaluate(sampler_for(backend, loop))
    assert len(completions) == 4 * len(QA)


def test_lora_adapters_on_vllm(backend, loop):
    """The running vLLM replica, re-pointed at a LoRA trainer (no restart), serves its PEFT adapter
    snapshots through vLLM's LoRA support: save_and_hotload twice, each time check_deployment_state()
    is the new snapshot, the adapter is the one loaded, and vLLM's logprobs agree with the built-in
    engine's (which merges the same adapter into the base) within bf16 rounding, so the second load
    really replaced the first adapter. The trainer trains the unembedding too (its default), so the
    adapter carries a whole embedding (PEFT modules_to_save) besides its low-rank pairs."""
    from fireworks.training.sdk import FiretitanServiceClient

    from workbench.demo import sft_datums
    from workbench.sdk import WeightSyncer

    deploy_mgr, job = loop["deploy_mgr"], loop["lora_job"]
    for name in (VLLM, TWIN):
        deploy_mgr.reattach_trainer(name, base_model=TINY, trainer_job_name=job.job_name, timeout_s=120)
    service = FiretitanServiceClient(base_url=loop["lora_endpoint"].base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=LORA_RANK)
    tracker = WeightSyncer(policy_client=client, deploy_mgr=deploy_mgr, deployment_id=VLLM, base_model=TINY,
                           hotload_timeout=600, lora_rank=LORA_RANK)
    loop["lora_client"] = client
    data = sft_datums(loop["tokenizer"], QA)
    adam = tinker.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    greedy = []
    for i in range(2):
        for _ in range(3):
            client.forward_backward(data, "cross_entropy").result()
            client.optim_step(adam).result()
        snapshot = tracker.save_and_hotload(f"lora-{i}")
        assert tracker.check_deployment_state() == snapshot
        st = _replica_status(deploy_mgr, VLLM)
        assert st["readiness"] and st["loading_state"]["stage"] == "done", st
        assert st["loaded_adapters"] == [{"identity": snapshot, "status": "loaded"}]
        assert deploy_mgr.hotload_and_wait(TWIN, TINY, snapshot, timeout_seconds=120)
        d = _logprob_diffs(backend, loop)
        print(f"vLLM LoRA vs built-in engine per-token logprobs on {snapshot}: n={d.numel()} "
              f"mean {d.mean():.2e} max {d.max():.2e}")
        assert d.max().item() < 1e-2
        greedy.append(_greedy(backend, loop))
    # the second adapter replaced the first (not vLLM's cached one): greedy logprobs moved
    assert max(abs(a - b) for a, b in zip(*greedy)) > 1e-3
    score, completions = evaluate(sampler_for(backend, loop))
    assert len(completions) == 4 * len(QA) and all(c.completion_len > 0 for c in completions)
    loop["lora_tracker"] = tracker


def test_broken_adapter_keeps_previous_adapter_serving(backend, loop):
    tracker = loop["lora_tracker"]
    current = tracker.check_deployment_state()
    before = _greedy(backend, loop)
    bad = loop["lora_client"].save_weights_for_sampler_ext("lora-broken").snapshot_name
    adapter = backend.home / "jobs" / loop["lora_job"].job_id / "sampler" / bad / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])   # truncated
    assert _hotload_fails(loop, bad) == current
    assert tracker.check_deployment_state() == current
    st = _replica_status(loop["deploy_mgr"], VLLM)
    assert st["loaded_adapters"] == [{"identity": current, "status": "loaded"}]
    assert max(abs(a - b) for a, b in zip(before, _greedy(backend, loop))) < 1e-5


def test_killed_vllm_replica_comes_back_on_same_identity(backend, loop):
    """Runs last: the replica serves the LoRA tests' last adapter, and comes back on it."""
    tracker = loop["tracker"]
    before = tracker.check_deployment_state()
    greedy_before = _greedy(backend, loop)
    pattern = f"deployment.vllm_replica --deployment-dir {backend.home}/deployments/{VLLM}"
    pid = int(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    deadline = time.time() + 60
    while time.time() < deadline:   # the supervisor notices and restarts it
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if out and int(out[0]) != pid:
            break
        time.sleep(0.5)
    st = wait_serving(loop["deploy_mgr"], VLLM)
    print(f"vLLM replica back after SIGKILL in {time.time() - t0:.1f} s")
    assert st["current_snapshot_identity"] == before
    if "lora_tracker" in loop:   # the LoRA tests ran: it is back on their last adapter
        assert st.get("loaded_adapters") == [{"identity": before, "status": "loaded"}]
    assert tracker.check_deployment_state() == before
    assert max(abs(a - b) for a, b in zip(greedy_before, _greedy(backend, loop))) < 1e-5
    score, completions = evaluate(sampler_for(backend, loop))
    assert len(completions) == 4 * len(QA)
