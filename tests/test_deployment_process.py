"""The deployment replica as a real OS process, driven over HTTP by the official SDK.

One replica process per module (plus one restart). Snapshots are written with workbench.checkpoints
from the tiny model with perturbed weights, exactly as a trainer would write them:

    root/snap-1        base: the tiny model + noise
    root/snap-2        delta over snap-1 (snap-1 + smaller noise)
    root/snap-bad-crc  snap-2's delta with bytes flipped
    root/snap-other    a delta made against some other snapshot
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from workbench import checkpoints as ck
from workbench import models

TINY = models.DEFAULT_MODEL
KEY = "test-deploy-key"
ACCOUNT, DEP = "acct", "dep-1"
MODEL = f"accounts/{ACCOUNT}/deployments/{DEP}"


class Replica:
    def __init__(self, ddir: Path):
        self.dir = ddir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout=600) -> "Replica":    # generous: a replica starts in seconds, on a quiet machine
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.dir / "replica.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.backend.deployment", "--deployment-dir", str(self.dir),
             "--port-file", str(port_file)],
            env=dict(os.environ, WORKBENCH_API_KEY=KEY, WORKBENCH_DEPLOYMENT_THREADS="1"), stdout=log,
            stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if port_file.exists() and self.get("/readyz").status_code == 200:
                return self
            if port_file.exists() and not self.port:
                self.port = int(port_file.read_text())
            assert self.proc.poll() is None, (self.dir / "replica.log").read_text()
            time.sleep(0.05)
        self.kill()
        raise TimeoutError((self.dir / "replica.log").read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path):
        self.port = int((self.dir / "port").read_text())
        return httpx.get(self.url + path, headers={"X-Api-Key": KEY}, timeout=30)

    def complete(self, **body) -> dict:
        body = {"model": MODEL, **body}
        r = httpx.post(self.url + "/inference/v1/completions", json=body, headers={"X-Api-Key": KEY}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def status(self) -> dict:
        return self.get("/hot_load/v1/models/hot_load").json()["replicas"][0]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def perturbed(model, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 1e-3))
    return ck.bf16_state(model)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    root = tmp / "sampler"
    root.mkdir()
    model_dir = models.local_path(TINY)
    model = models.load_model(TINY)
    w1 = perturbed(model, 0.5, seed=1)
    ck.save_sampler_base(root / "snap-1", w1, model_dir, {"base_model": TINY})
    w2 = perturbed(model, 0.05, seed=2)
    ck.save_sampler_delta(root / "snap-2", w2, w1, "snap-1", {"base_model": TINY})
    shutil.copytree(root / "snap-2", root / "snap-bad-crc")
    # the delta file of whichever format the default is (delta.safetensors for arc_*, delta.wbd for workbench_v1)
    bad = next(p for p in (root / "snap-bad-crc").iterdir() if p.name.startswith("delta."))
    blob = bytearray(bad.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0x5A
    bad.write_bytes(bytes(blob))
    w_other = perturbed(models.load_model(TINY), 0.5, seed=9)
    ck.save_sampler_delta(root / "snap-other", w2, w_other, "snap-9", {"base_model": TINY})

    ddir = tmp / "dep"
    ddir.mkdir()
    (ddir / "deployment.json").write_text(json.dumps(
        {"deployment_id": DEP, "account": ACCOUNT, "base_model": TINY, "home": str(tmp)}))
    replica = Replica(ddir).start()
    yield replica, root
    replica.kill()


def manager(replica, root):
    from fireworks.training.sdk import DeploymentManager

    # the control plane adds x-workbench-snapshot-root; talking to the replica directly, we add it
    mgr = DeploymentManager(api_key=KEY, base_url=replica.url,
                            additional_headers={"x-workbench-snapshot-root": str(root)})
    mgr._account_id = ACCOUNT   # the replica has no /v1/accounts; the SDK resolves the account lazily
    return mgr


def transformers_logprobs(snapshot_dir: Path | None, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    if snapshot_dir is None:
        model = models.load_model(TINY)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(snapshot_dir), dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def assert_logprobs_match(body: dict, lsm: torch.Tensor, tol=1e-4):
    choice = body["choices"][0]
    prompt = choice["raw_output"]["prompt_token_ids"]
    out = choice["raw_output"]["completion_token_ids"]
    entries = choice["logprobs"]["content"]
    assert len(entries) == len(out)
    for j, (tid, e) in enumerate(zip(out, entries)):
        assert e["token_id"] == tid
        assert abs(e["logprob"] - float(lsm[len(prompt) - 1 + j, tid])) < tol


def test_sdk_sampler_batches_and_reports(setup):
    from fireworks.training.sdk import DeploymentSampler

    replica, _ = setup
    tok = models.load_tokenizer(TINY)
    sampler = DeploymentSampler(inference_url=replica.url, model=MODEL, api_key=KEY, tokenizer=tok)
    before = replica.get("/healthz").json()

    async def go():
        msgs = [{"role": "user", "content": "What is 2+2?"}]
        return await asyncio.gather(*(sampler.sample_with_tokens(msgs, n=4, max_tokens=24, logprobs=True,
                                                                 top_logprobs=2) for _ in range(2)))

    results = asyncio.run(go())
    completions = [c for r in results for c in r]
    assert len(completions) == 8
    for c in completions:
        assert c.completion_len >= 1 and len(c.full_tokens) == c.prompt_len + c.completion_len
        assert len(c.inference_logprobs) == c.completion_len == len(c.sampling_logprobs)
        assert all(lp <= 0 for lp in c.inference_logprobs)
        assert len(c.inference_topk_token_ids[0]) == 2
    after = replica.get("/healthz").json()
    # 8 concurrent streams were decoded together, not one after another
    assert after["max_batch_seen"] >= 4
    # the embedded Qwen3 is served by the plain-torch model: the replica never imported transformers
    assert after["model_code"] == "workbench.models.qwen3_torch" and after["transformers_imported"] is False
    # nor anything else it does not need before a hot load (each costs resident memory: bench/cold_start.py)
    assert after["optional_modules_imported"] == [], after["optional_modules_imported"]
    assert after["decode_steps"] - before["decode_steps"] < 8 * 24 / 2
    metrics = sampler._recent_metrics[-1]
    assert metrics.prefill_queue_duration is not None and metrics.num_concurrent_requests >= 1


def test_base_then_delta_hotload_and_logprobs(setup):
    replica, root = setup
    mgr = manager(replica, root)
    prompt = [1, 17, 42, 99, 7, 256, 3]
    greedy = dict(prompt=prompt, max_tokens=16, temperature=0.0, ignore_eos=True, raw_output=True, logprobs=True)
    outs = {None: replica.complete(**greedy)}
    assert_logprobs_match(outs[None], transformers_logprobs(None, prompt + outs[None]["choices"][0]["raw_output"]["completion_token_ids"]))

    t0 = time.time()
    assert mgr.hotload_and_wait(DEP, TINY, "snap-1", timeout_seconds=30)
    assert time.time() - t0 < 4, "the first status poll should already see the new snapshot"
    assert replica.status()["current_snapshot_identity"] == "snap-1"
    outs["snap-1"] = replica.complete(**greedy)

    meta = {"previous_snapshot_identity": "snap-1", "compression_format": "arc_v2", "checksum_format": "alder32"}
    assert mgr.hotload_and_wait(DEP, TINY, "snap-2", incremental_snapshot_metadata=meta, timeout_seconds=30)
    st = replica.status()
    assert st["current_snapshot_identity"] == "snap-2" and st["readiness"] and st["loading_state"]["stage"] == "done"
    outs["snap-2"] = replica.complete(**greedy, top_logprobs=3)

    ids = {k: v["choices"][0]["raw_output"]["completion_token_ids"] for k, v in outs.items()}
    assert ids[None] != ids["snap-1"] != ids["snap-2"]

    # the delta result must be what transformers computes from the same weights (rebuilt from disk)
    ref_dir = root.parent / "snap-2-reconstructed"
    ck.save_sampler_base(ref_dir, ck.reconstruct([root / "snap-1", root / "snap-2"]), models.local_path(TINY), {})
    assert_logprobs_match(outs["snap-2"], transformers_logprobs(ref_dir, prompt + ids["snap-2"]))
    sampled = replica.complete(prompt=prompt, max_tokens=20, temperature=1.0, top_p=0.95, seed=5,
                               raw_output=True, logprobs=True, echo=True)
    echoed = sampled["choices"][0]["raw_output"]["completion_token_ids"]
    assert echoed[:len(prompt)] == prompt
    sampled["choices"][0]["raw_output"]["completion_token_ids"] = echoed[len(prompt):]
    sampled["choices"][0]["logprobs"]["content"] = sampled["choices"][0]["logprobs"]["content"][len(prompt):]
    assert_logprobs_match(sampled, transformers_logprobs(ref_dir, echoed))
    state = json.loads((replica.dir / "state.json").read_text())
    assert state["identity"] == "snap-2" and [e["kind"] for e in state["chain"]] == ["base", "delta"]
    assert replica.get("/healthz").json()["transformers_imported"] is False   # hot loads did not need it either


def test_failed_hotloads_keep_serving(setup):
    from fireworks.training.sdk import WeightSyncer

    replica, root = setup
    mgr = manager(replica, root)
    current = replica.status()["current_snapshot_identity"]
    assert current == "snap-2"
    state_before = (replica.dir / "state.json").read_text()
    probe = dict(prompt=[1, 2, 3], max_tokens=8, temperature=0.0, ignore_eos=True, raw_output=True)
    expected = replica.complete(**probe)["choices"][0]["raw_output"]["completion_token_ids"]
    meta = {"previous_snapshot_identity": current, "compression_format": "arc_v2", "checksum_format": "alder32"}
    cases = [
        ("snap-missing", None, 404, "not found"),
        ("snap-bad-crc", meta, 422, "rejected"),
        ("snap-other", meta, 422, "rejected"),                       # made against another base
        ("snap-bad-crc", {**meta, "previous_snapshot_identity": "snap-0"}, 409, "holds 'snap-2'"),
        ("snap-bad-crc", None, 400, "is a delta"),
        ("snap-bad-crc", {**meta, "compression_format": "zip"}, 400, "compression_format"),
    ]
    for identity, md, status, words in cases:
        with pytest.raises(httpx.HTTPStatusError) as e:
            mgr.hotload(DEP, TINY, identity, incremental_snapshot_metadata=md)
        assert e.value.response.status_code == status, (identity, e.value.response.text)
        assert words in e.value.response.json()["error"]["message"]
        st = replica.status()
        assert st["current_snapshot_identity"] == current and st["readiness"] is True
        assert st["loading_state"]["stage"] == "error"
        assert st["loading_state"]["target_snapshot_identity"] == identity and st["loading_state"]["message"]
        assert replica.complete(**probe)["choices"][0]["raw_output"]["completion_token_ids"] == expected
    assert (replica.dir / "state.json").read_text() == state_before
    # loading the snapshot already held succeeds as a no-op (managed mode re-sends it)
    assert mgr.hotload(DEP, TINY, current, incremental_snapshot_metadata=meta)["noop"] is True
    assert replica.status()["loading_state"]["stage"] == "done"
    assert (replica.dir / "state.json").read_text() == state_before

    # WeightSyncer surfaces the failure at once (no polling until its timeout)
    syncer = WeightSyncer(policy_client=None, deploy_mgr=mgr, deployment_id=DEP, base_model=TINY,
                          hotload_timeout=60, warmup_after_hotload=False)
    t0 = time.time()
    assert syncer.hotload("snap-missing", "base") is False
    assert time.time() - t0 < 5


def test_restart_comes_back_on_last_good_snapshot(setup):
    replica, root = setup
    if replica.status()["current_snapshot_identity"] != "snap-2":    # run alone: load the base + delta chain
        mgr = manager(replica, root)
        assert mgr.hotload_and_wait(DEP, TINY, "snap-1", timeout_seconds=60)
        meta = {"previous_snapshot_identity": "snap-1", "compression_format": "arc_v2", "checksum_format": "alder32"}
        assert mgr.hotload_and_wait(DEP, TINY, "snap-2", incremental_snapshot_metadata=meta, timeout_seconds=60)
    probe = dict(prompt=[5, 6, 7, 8], max_tokens=12, temperature=0.0, ignore_eos=True, raw_output=True)
    before = replica.complete(**probe)["choices"][0]["raw_output"]["completion_token_ids"]
    replica.kill()
    replica.start()
    st = replica.status()
    assert st["current_snapshot_identity"] == "snap-2" and st["loading_state"]["stage"] == "done"
    assert replica.complete(**probe)["choices"][0]["raw_output"]["completion_token_ids"] == before


def test_wire_details(setup):
    replica, _ = setup
    h = {"Authorization": f"Bearer {KEY}", "x-request-id": "req-42"}
    url = replica.url + "/v1/completions"
    r = httpx.post(url, headers=h, timeout=30, json={
        "model": MODEL, "prompt": "hello world", "n": 2, "max_tokens": 6, "seed": 3, "ignore_eos": True,
        "raw_output": True, "perf_metrics_in_response": True, "logprobs": 2, "prompt_cache_key": "k"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 12
    assert all(len(c["logprobs"]["content"]) == 6 and len(c["logprobs"]["content"][0]["top_logprobs"]) == 2
               for c in body["choices"])
    pm = body["perf_metrics"]
    assert int(pm["num-concurrent-requests"]) >= 2 and float(pm["prefill-queue-duration"]) >= 0
    assert {"server-time-to-first-token", "server-processing-time", "prompt-tokens", "cached-prompt-tokens",
            "generation-queue-duration", "prefill-duration", "generation-duration"} <= set(pm)

    r = httpx.post(url, headers=h, timeout=30, json={
        "model": MODEL, "prompt": [1, 2, 3], "n": 2, "max_tokens": 5, "stream": True, "raw_output": True,
        "perf_metrics_in_response": True, "echo": True, "logprobs": True})
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1]
    assert all(f["raw_output"]["completion_token_ids"][:3] == [1, 2, 3] for f in finals)
    assert "usage" in chunks[-1] and "perf_metrics" in chunks[-1]
    for idx in (0, 1):
        rows = [row for c in chunks if c["choices"][0]["index"] == idx
                for row in c["choices"][0].get("logprobs", {}).get("content", [])]
        ids = next(f for f in finals if f["index"] == idx)["raw_output"]["completion_token_ids"]
        assert [row["token_id"] for row in rows] == ids and rows[0]["logprob"] == 0.0

    r = httpx.post(url, headers=h, timeout=30, json={"model": MODEL, "prompt": [1], "temprature": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temprature"


def same_connection_requests(replica, bodies: list[bytes]) -> list[tuple[int, dict, bool]]:
    """POST each raw body on ONE keep-alive connection: (status, json, connection still the same)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=60)
    out = []
    try:
        sock = None
        for raw in bodies:
            conn.request("POST", "/inference/v1/completions", body=raw,
                         headers={"X-Api-Key": KEY, "Content-Type": "application/json"})
            r = conn.getresponse()
            data = json.loads(r.read())
            same = sock is None or conn.sock is sock
            sock = conn.sock
            out.append((r.status, data, same and r.getheader("connection") != "close"))
    finally:
        conn.close()
    return out


def test_bad_input_never_fails_neighbours_connections_or_the_replica(setup):
    """13.4 top_k overflow beside healthy requests; 13.10 lone surrogate / invalid UTF-8 / deep nesting
    on one keep-alive connection; 13.3 body limit; 14.3 max_tokens lowered to fit the context."""
    replica, _ = setup
    url = replica.url + "/inference/v1/completions"
    healthy = dict(model=MODEL, prompt=[1, 2, 3], max_tokens=6, temperature=1.0, ignore_eos=True, raw_output=True)

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers={"X-Api-Key": KEY}) as c:
            bodies = [healthy] * 4 + [dict(healthy, top_k=10 ** 30)] + [dict(healthy, stream=True)] * 4 + \
                     [dict(healthy, top_p=2.0)]
            return await asyncio.gather(*[c.post(url, json=b) for b in bodies])

    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 4 + [400] + [200] * 4 + [400]
    assert rs[4].json()["error"]["param"] == "top_k" and rs[9].json()["error"]["param"] == "top_p"
    assert all(len(r.json()["choices"][0]["raw_output"]["completion_token_ids"]) == 6 for r in rs[:4])

    ok = json.dumps({"model": MODEL, "prompt": [1, 2], "max_tokens": 2}).encode()
    results = same_connection_requests(replica, [
        json.dumps({"model": MODEL, "prompt": "hi \udcff"}).encode(),    # a lone surrogate, escaped in JSON
        b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}',   # invalid UTF-8
        b"[" * 50_000 + b"]" * 50_000,                                  # deep nesting
        b'{"model": 1',                                                 # truncated JSON
        ok])
    assert [s for s, _, _ in results] == [400, 400, 400, 400, 200], results
    assert results[0][1]["error"]["param"] == "prompt"
    assert all(same for _, _, same in results), "a bad request closed the keep-alive connection"

    r = httpx.post(url, content=b"x" * ((4 << 20) + 1), headers={"X-Api-Key": KEY}, timeout=60)
    assert r.status_code == 413 and str(4 << 20) in r.json()["error"]["message"]

    # prompt + max_tokens over the context: lowered to fit by default, an error when asked
    prompt = [(7 * i) % 500 + 3 for i in range(2040)]
    r = replica.complete(prompt=prompt, max_tokens=32768, ignore_eos=True, raw_output=True, temperature=0.0)
    assert r["choices"][0]["finish_reason"] == "length"
    assert len(r["choices"][0]["raw_output"]["completion_token_ids"]) == 2048 - 2040
    r = httpx.post(url, headers={"X-Api-Key": KEY}, timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 32768, "context_length_exceeded_behavior": "error"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_healthz_answers_during_large_requests(setup):
    """13.3: large bodies are decoded and tokenized off the event loop; healthz keeps answering."""
    replica, _ = setup
    url = replica.url + "/inference/v1/completions"
    text = "the quick brown fox jumps over the lazy dog. " * 580          # ~26k chars: tokenized, then too long
    ids = [5] * 600_000                                                    # ~1.8 MB of ids: decoded off the loop

    async def run():
        async with httpx.AsyncClient(timeout=300, headers={"X-Api-Key": KEY}) as c:
            big = [asyncio.create_task(c.post(url, json={"model": MODEL, "prompt": p, "max_tokens": 1}))
                   for p in [text, ids] * 4]
            answered_during = 0
            while not all(t.done() for t in big):
                r = await c.get(replica.url + "/healthz")
                assert r.status_code == 200 and r.json()["ready"] is True
                answered_during += not all(t.done() for t in big)
            return [t.result() for t in big], answered_during

    results, answered_during = asyncio.run(run())
    assert all(r.status_code == 400 and r.json()["error"]["param"] == "prompt" for r in results)
    assert answered_during >= 1


def test_hotload_guards_over_http(setup):
    """13.2 a non-finite snapshot is refused (4xx) and the previous one keeps serving; 13.8 sources
    outside the home are refused naming the header; 13.13 completions name their snapshot."""
    replica, root = setup
    current = replica.status()["current_snapshot_identity"]
    w = ck.bf16_state(models.load_model(TINY))
    w[next(iter(w))].view(-1)[3] = float("inf")
    ck.save_sampler_base(root / "snap-inf", w, models.local_path(TINY), {"base_model": TINY})
    h = {"X-Api-Key": KEY, "x-workbench-snapshot-root": str(root)}
    r = httpx.post(replica.url + "/hot_load/v1/models/hot_load", json={"identity": "snap-inf"}, headers=h, timeout=60)
    assert r.status_code == 422 and "non-finite" in r.json()["error"]["message"]
    assert replica.status()["current_snapshot_identity"] == current

    outside = root.parent.parent / f"{root.parent.name}-elsewhere"
    outside.mkdir(exist_ok=True)
    r = httpx.post(replica.url + "/hot_load/v1/models/hot_load", json={"identity": "snap-1"}, timeout=60,
                   headers={"X-Api-Key": KEY, "x-fireworks-hot-load-source-url": str(outside)})
    assert r.status_code == 403 and r.json()["error"]["param"] == "x-fireworks-hot-load-source-url"
    assert "x-fireworks-hot-load-source-url" in r.json()["error"]["message"]

    for stream in (False, True):
        r = httpx.post(replica.url + "/inference/v1/completions", headers={"X-Api-Key": KEY}, timeout=60, json={
            "model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "stream": stream, "perf_metrics_in_response": True,
            "logprobs": True})
        assert r.status_code == 200 and r.headers["fireworks-snapshot-identity"] == current
        pm = sse_last(r.text)["perf_metrics"] if stream else r.json()["perf_metrics"]
        assert pm["snapshot-identity"] == current
        assert "NaN" not in r.text and "Infinity" not in r.text
    last = replica.status()["last_load"]
    assert last["identity"] == current and {"load_seconds", "max_sampler_pause_seconds", "bytes_read"} <= set(last)


def sse_last(text: str) -> dict:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")][-1]


def test_replica_exits_on_sigterm_and_when_its_parent_dies(tmp_path):
    """13.7: SIGTERM with a request in flight, and SIGKILL of the parent, both end the replica."""
    ddir = tmp_path / "dep"
    ddir.mkdir()
    (ddir / "deployment.json").write_text(json.dumps(
        {"deployment_id": DEP, "account": ACCOUNT, "base_model": TINY, "home": str(tmp_path)}))
    # a parent process that starts the replica and then just waits (as the control plane would)
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'workbench.backend.deployment', '--deployment-dir', {str(ddir)!r},"
        f" '--port-file', {str(ddir / 'port')!r}], stdout=open({str(ddir / 'replica.log')!r}, 'ab'), stderr=subprocess.STDOUT)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(3600)\n")], env=dict(os.environ, WORKBENCH_API_KEY=KEY), stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        r = Replica(ddir)
        deadline = time.time() + 600
        while not ((ddir / "port").exists() and r.get("/readyz").status_code == 200):
            assert time.time() < deadline, (ddir / "replica.log").read_text()
            time.sleep(0.1)
        parent.kill()
        parent.wait(30)
        t0 = time.time()
        while pid_alive(child):
            assert time.time() - t0 < 120, "replica outlived its parent"
            time.sleep(0.1)
        print(f"replica exited {time.time() - t0:.2f} s after its parent died")
    finally:
        parent.kill()

    replica = Replica(ddir).start()
    try:
        async def long_stream():
            async with httpx.AsyncClient(timeout=300, headers={"X-Api-Key": KEY}) as c:
                try:
                    await c.post(replica.url + "/inference/v1/completions", json={
                        "model": MODEL, "prompt": [1, 2], "max_tokens": 2000, "ignore_eos": True, "stream": True})
                except httpx.HTTPError:
                    pass

        import threading
        t = threading.Thread(target=lambda: asyncio.run(long_stream()), daemon=True)
        t.start()
        deadline = time.time() + 120
        while replica.get("/healthz").json().get("active", 0) == 0:
            assert time.time() < deadline
            time.sleep(0.02)
        t0 = time.time()
        replica.proc.send_signal(signal.SIGTERM)
        replica.proc.wait(120)
        print(f"replica exited {time.time() - t0:.2f} s after SIGTERM with a request in flight")
        assert time.time() - t0 < 60
    finally:
        replica.kill()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
