"""Training-step overhead of the backend: the same model and batch, in-process vs through the SDK.

    python bench/step_overhead.py [--steps 10] [--model tiny|small|<model name>] [--ranks N]

Trains N steps with plain PyTorch in this process and N steps through the official SDK ->
control plane -> trainer process, alternating blocks so machine noise hits both alike, and prints
ms/step for each, their ratio (target <= 1.10 for the ~5M model) and the fixed overhead per call.
Two more SDK paths show what a loop that submits ahead pays (the pattern the SDK's own docstring and
tinker-cookbook use; the trainer runs requests in submission order):
  - "SDK, submitted ahead": each step submits forward_backward and optim_step, then waits on the
    previous step's two futures, so one step is always in flight and the SDK's fixed cost per call
    overlaps the trainer's compute;
  - per call, "pipelined": 20 tiny forwards submitted back to back, then all waited on, divided by
    20: the fixed cost a call adds to a loop's throughput when it does not wait on each call
    (the latency of one lone call stays the SDK's floor; bench/call_profile.py splits that).
`--ranks N` adds an N-rank trainer job (`accelerator_count=N`: torchrun, FSDP2 over gloo) as a third
path in the same alternating blocks, with its own fixed cost per call. The batch is one micro-batch
(16 equal lengths), so on N ranks it runs on one rank while the others pad (see
trainer/distributed/engine.py); the difference to one rank is the sharding's cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import tinker
import torch


def batch(n=16, length=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 500, (n, length + 1), generator=g)
    return tokens


def to_datums(tokens):
    length = tokens.shape[1] - 1
    return [tinker.Datum(model_input=tinker.ModelInput.from_ints(row[:-1].tolist()),
                         loss_fn_inputs={"target_tokens": tinker.TensorData(data=row[1:].tolist(), dtype="int64",
                                                                           shape=[length]),
                                         "weights": tinker.TensorData(data=[1.0] * length, dtype="float32",
                                                                      shape=[length])})
            for row in tokens]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--model", default="small", help="tiny (~1M), small (~5M) or a full model name")
    ap.add_argument("--ranks", type=int, default=1, help="also time an N-rank (FSDP2) trainer job, N > 1")
    args = ap.parse_args()
    args.model = {"tiny": "accounts/workbench/models/qwen3-tiny",
                  "small": "accounts/workbench/models/qwen3-small"}.get(args.model, args.model)

    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig, TrainerJobManager

    from workbench.backend.home import ensure_api_key, resolve_home
    from workbench.backend.server import start_detached, stop
    from workbench.models import load_model

    # Same torch thread count on both sides: the trainer gets WORKBENCH_TRAINER_THREADS.
    import os

    from workbench.backend.supervisor import default_trainer_threads

    threads = int(os.environ.setdefault("WORKBENCH_TRAINER_THREADS", str(default_trainer_threads())))
    torch.set_num_threads(threads)
    home = resolve_home(tempfile.mkdtemp(prefix="wb-bench-"))
    info = start_detached(home)
    key = ensure_api_key(home)
    try:
        mgr = TrainerJobManager(api_key=key, base_url=info["base_url"])
        endpoint = mgr.create_and_wait(TrainerJobConfig(base_model=args.model, lora_rank=0, learning_rate=1e-4),
                                       poll_interval_s=1)
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=key)
        client = service.create_training_client(base_model=args.model, lora_rank=0)
        sharded = None   # --ranks N: (service, client) of the N-rank job
        if args.ranks > 1:
            endpoint_n = mgr.create_and_wait(TrainerJobConfig(base_model=args.model, lora_rank=0, learning_rate=1e-4,
                                                              accelerator_count=args.ranks), poll_interval_s=1)
            service_n = FiretitanServiceClient(base_url=endpoint_n.base_url, api_key=key)
            sharded = (service_n, service_n.create_training_client(base_model=args.model, lora_rank=0))

        tokens = batch()
        datums = to_datums(tokens)
        adam = tinker.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
        model = load_model(args.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

        def local_step():
            logits = model(input_ids=tokens[:, :-1]).logits.float()
            lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            (-lp.sum()).backward()
            opt.step()
            opt.zero_grad()

        def sdk_step(c=client):
            c.forward_backward(datums, "cross_entropy").result()
            c.optim_step(adam).result()

        in_flight: list = []   # the previous step's futures, for the submitted-ahead path

        def sdk_step_ahead(c=client):
            submitted = [c.forward_backward(datums, "cross_entropy"), c.optim_step(adam)]
            for future in in_flight:
                future.result()
            in_flight[:] = submitted

        tiny = to_datums(batch(n=1, length=4))

        def sdk_tiny_call(c=client):
            c.forward(tiny, "cross_entropy").result()

        def sdk_tiny_calls_pipelined(n=20, c=client):
            for future in [c.forward(tiny, "cross_entropy") for _ in range(n)]:
                future.result()

        def local_tiny_call():
            with torch.no_grad():
                model(input_ids=batch(n=1, length=4)[:, :-1])

        local_step(), sdk_step()  # warm up both paths
        local_times, sdk_times, ahead_times, call_overheads, pipelined_overheads = [], [], [], [], []
        paths = [(local_step, local_times), (sdk_step, sdk_times), (sdk_step_ahead, ahead_times)]
        sharded_times, sharded_overheads = [], []
        if sharded:
            sdk_step(sharded[1])
            paths.append((lambda: sdk_step(sharded[1]), sharded_times))
        for _ in range(args.blocks):
            for fn, out in paths:
                for _ in range(args.steps):
                    t = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t)
                for future in in_flight:   # drain the submitted-ahead path before the next one is timed
                    future.result()
                in_flight.clear()
            for _ in range(20):
                t = time.perf_counter()
                sdk_tiny_call()
                sdk_t = time.perf_counter() - t
                t = time.perf_counter()
                local_tiny_call()
                local_t = time.perf_counter() - t
                call_overheads.append(sdk_t - local_t)
                if sharded:
                    t = time.perf_counter()
                    sdk_tiny_call(sharded[1])
                    sharded_overheads.append(time.perf_counter() - t - (sdk_t - call_overheads[-1]))
            for _ in range(3):
                t = time.perf_counter()
                sdk_tiny_calls_pipelined()
                pipelined_t = (time.perf_counter() - t) / 20
                t = time.perf_counter()
                local_tiny_call()
                pipelined_overheads.append(pipelined_t - (time.perf_counter() - t))
        params = sum(p.numel() for p in model.parameters())
        local_ms = statistics.median(local_times) * 1e3
        sdk_ms = statistics.median(sdk_times) * 1e3
        print(f"load average at end {' '.join(open('/proc/loadavg').read().split()[:3])}")
        print(f"model {args.model} ({params / 1e6:.2f}M params), {threads} torch thread(s) each side, batch 16 x 128 tokens, "
              f"{args.blocks} x {args.steps} steps each, medians")
        print(f"{'path':28s} {'ms/step':>10s}")
        print(f"{'in-process torch':28s} {local_ms:10.1f}")
        print(f"{'SDK -> backend':28s} {sdk_ms:10.1f}")
        ahead_ms = statistics.median(ahead_times) * 1e3
        print(f"{'SDK -> backend, ahead':28s} {ahead_ms:10.1f}   (one step submitted before waiting on the last)")
        if sharded:
            print(f"{f'SDK -> backend, {args.ranks} ranks':28s} {statistics.median(sharded_times) * 1e3:10.1f}")
        print(f"ratio SDK/in-process: {sdk_ms / local_ms:.3f}  (target <= 1.10); "
              f"submitted ahead: {ahead_ms / local_ms:.3f}")
        print(f"fixed overhead per call (forward of 1x4 tokens, SDK minus in-process): "
              f"{statistics.median(call_overheads) * 1e3:.1f} ms; pipelined (20 submitted, then waited): "
              f"{statistics.median(pipelined_overheads) * 1e3:.1f} ms per call")
        if sharded:
            print(f"fixed overhead per call on {args.ranks} ranks (same forward, SDK minus in-process): "
                  f"{statistics.median(sharded_overheads) * 1e3:.1f} ms")
            sharded[0].close()
        service.close()
    finally:
        stop(home)


if __name__ == "__main__":
    main()
