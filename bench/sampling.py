"""Sampling throughput of a deployment replica vs in-process `model.generate`, side by side.

    /tmp/venv/bin/python bench/sampling.py [--model accounts/workbench/models/qwen3-small] [--new-tokens 64]
                                           [--engine builtin,vllm]

Baseline: the same model in this process, `model.generate` one prompt at a time (batch 1, fp32, KV
cache, sampling at temperature 1), which is what a notebook loop without a server does. Deployment: a
real replica process (`python -m workbench.backend.deployment`) on loopback, driven over HTTP by C
closed-loop clients (each sends its next request when the previous one answers), C = 1, 16, 64.
Every request asks for exactly --new-tokens tokens (ignore_eos) so both sides generate the same
amount. Prints tokens/s for each and the ratio to the sequential baseline (target: >= 4x at C = 16).
Timings on this 2-core machine vary 10-30% between runs; the client shares the cores with the server.
`--engine builtin,vllm` runs the same table for each engine in turn, on the same model and prompts
(vLLM: a replica in vLLM's own environment, scripts/install_vllm.sh; its startup is not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from workbench import models

KEY = "bench-key"


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(16, 33, (1,), generator=g))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


def sequential_generate(model_name: str, new_tokens: int, n: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model = models.load_model(model_name).eval()
    ps = prompts(n + 1, model.config.vocab_size)
    torch.manual_seed(0)

    def run(p):
        with torch.inference_mode():
            model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)

    run(ps[0])  # warm-up
    t0 = time.perf_counter()
    for p in ps[1:]:
        run(p)
    return n * new_tokens / (time.perf_counter() - t0)


def start_replica(model_name: str, workdir: Path, engine: str = "builtin") -> tuple[subprocess.Popen, int]:
    from workbench.backend.deployment.engines import replica_command

    ddir = workdir / f"dep-{engine}"
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / "deployment.json").write_text(json.dumps(
        {"deployment_id": "bench", "account": "bench", "base_model": model_name, "home": str(workdir)}))
    port_file = ddir / "port"
    python, args, extra = replica_command(engine, ddir)
    env = dict(os.environ, WORKBENCH_API_KEY=KEY, **extra)
    proc = subprocess.Popen([python, *args, "--port-file", str(port_file)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"replica-{engine}.log", "wb"))
    deadline = time.time() + (1800 if engine == "vllm" else 120)   # vLLM starts in minutes on a busy CPU
    while time.time() < deadline:
        if port_file.exists():
            port = int(port_file.read_text())
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", headers={"x-api-key": KEY})
            if r.status_code == 200:
                return proc, port
        if proc.poll() is not None:
            raise RuntimeError((workdir / f"replica-{engine}.log").read_text()[-5000:])
        time.sleep(0.1)
    raise TimeoutError("replica did not become ready")


async def drive(port: int, concurrency: int, n_requests: int, new_tokens: int, vocab: int) -> dict:
    ps = prompts(n_requests, vocab, seed=concurrency)
    url = f"http://127.0.0.1:{port}/inference/v1/completions"
    queue_waits, tokens = [], 0
    it = iter(ps)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(headers={"x-api-key": KEY}, timeout=600, limits=limits) as client:
        async def worker():
            nonlocal tokens
            for p in it:
                r = await client.post(url, json={
                    "model": "accounts/bench/deployments/bench", "prompt": p, "max_tokens": new_tokens,
                    "temperature": 1.0, "ignore_eos": True, "raw_output": True, "perf_metrics_in_response": True})
                r.raise_for_status()
                body = r.json()
                tokens += len(body["choices"][0]["raw_output"]["completion_token_ids"])
                queue_waits.append(float(body["perf_metrics"]["prefill-queue-duration"]))
        await asyncio.gather(*(worker() for _ in range(min(2, concurrency))))    # warm-up
        it = iter(ps)
        tokens, queue_waits = 0, []
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    queue_waits.sort()
    return {"tok_s": tokens / wall, "requests": n_requests, "wall_s": wall,
            "p50_prefill_queue_s": queue_waits[len(queue_waits) // 2]}


async def drive_sdk(port: int, n: int, rounds: int, new_tokens: int, vocab: int) -> float:
    """The official client: DeploymentSampler.sample_with_prompt_tokens(n=16) fires n concurrent streams."""
    from fireworks.training.sdk import DeploymentSampler

    sampler = DeploymentSampler(inference_url=f"http://127.0.0.1:{port}", model="accounts/bench/deployments/bench",
                                api_key=KEY)
    ps = prompts(rounds + 1, vocab, seed=99)
    await sampler.sample_with_prompt_tokens(ps[0], n=n, max_tokens=new_tokens, ignore_eos=True)   # warm-up
    tokens = 0
    t0 = time.perf_counter()
    for p in ps[1:]:
        out = await sampler.sample_with_prompt_tokens(p, n=n, max_tokens=new_tokens, ignore_eos=True)
        tokens += sum(c.completion_len for c in out)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=models.SMALL_MODEL)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential-prompts", type=int, default=8)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--engine", default="builtin", help="comma-separated: builtin, vllm (each in turn)")
    args = ap.parse_args()

    vocab = models.load_model(args.model).config.vocab_size
    # the baseline gets the better of 1 and 2 torch threads (on a busy 2-core machine 1 often wins)
    runs = {t: sequential_generate(args.model, args.new_tokens, args.sequential_prompts, t) for t in (1, 2)}
    best = max(runs, key=runs.get)
    base = runs[best]
    print(f"model {args.model}, {args.new_tokens} new tokens per request; baseline "
          + ", ".join(f"{t} thread(s) {v:.0f} tok/s" for t, v in runs.items()))
    print(f"{f'in-process model.generate, sequential, {best} thread(s)':<52} {base:8.0f} tok/s   1.00x")
    for engine in args.engine.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc, port = start_replica(args.model, Path(tmp), engine)
            print(f"-- engine {engine} (replica ready in {time.perf_counter() - t0:.0f} s)")
            try:
                for c in [int(x) for x in args.concurrency.split(",")]:
                    n = max(8, 2 * c)
                    r = asyncio.run(drive(port, c, n, args.new_tokens, vocab))
                    print(f"{f'{engine} deployment over HTTP, concurrency {c:>2} ({n} requests)':<52} "
                          f"{r['tok_s']:8.0f} tok/s {r['tok_s'] / base:6.2f}x   "
                          f"(median prefill-queue {r['p50_prefill_queue_s'] * 1000:.1f} ms)")
                sdk = asyncio.run(drive_sdk(port, 16, 2, args.new_tokens, vocab))
                print(f"{f'{engine}: official DeploymentSampler, n=16 streams (2 rounds)':<52} {sdk:8.0f} tok/s "
                      f"{sdk / base:6.2f}x")
            finally:
                proc.terminate()
                proc.wait(60)


if __name__ == "__main__":
    main()
