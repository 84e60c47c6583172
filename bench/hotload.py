"""Hot-load cost of a deployment replica vs the in-process floor, and the pause samplers see.

    /tmp/venv/bin/python bench/hotload.py [--models small,75m] [--repeats 3] [--engine builtin,vllm]
                                          [--format arc_v2|workbench_v1] [--compare OTHER_TREE[,...]]

For each model, a base snapshot and a delta snapshot over it are written with workbench.checkpoints
(the delta as after one small optimizer step: every weight nudged by ~0.1% noise). Then:

  floor    in this process: read + decode the snapshot (load_base_weights / apply_delta) and copy it
           into an fp32 model of the same architecture (load_state_dict): the least work any hot load
           must do. Page cache warm, median of --repeats.
  hotload  against a real replica process over HTTP: POST /hot_load (which answers once the snapshot is
           served) then the status GET that confirms it (what DeploymentManager.hotload_and_wait does,
           minus its poll interval). Median of --repeats. Target: <= 1.5x the floor.
  pause    while hot loads run back to back, 4 streaming samplers decode continuously; the longest
           gap between two consecutive SSE chunks any of them sees, against the longest gap in an
           equally long window without hot loads; the difference is the pause the loads added.
           Target: <= 50 ms added (at 75M one decode step of 4 streams alone takes ~100 ms here).

What the pause is made of: the swap itself is a pointer change between two decode steps (the replica
reports its wait, ~0.1 ms); what samplers feel is the hot load's CPU work competing with decoding
for two shared cores: the engine thread waits for a core (its run-queue wait per step rose from
~0-14 ms to 50-100 ms during a delta decode, /proc/<tid>/schedstat, while its CPU time per step did
not change), so it is CPU, not the GIL. Hence the replica's step window (below): while samplers
decode, a load computes only at the start of each step. Compare the "during" figure with the quiet
window of the same run: on a busy machine both are dominated by other processes.

`--compare OTHER_TREE` runs the replica from each listed source tree too (PYTHONPATH=<tree>), on the same
snapshots and floor, one after the other in this run (before/after figures side by side, each section
with the load average when it ended). `--format` is the delta's format (arc_v2: what WeightSyncer sends).
WORKBENCH_HOTLOAD_STEP_WINDOW_MS in the environment sets the replica's step window (deployment/weights.py:
while samplers decode, the hot-load thread works only in the first N ms of each decode step; default 20,
0 = off), e.g. `WORKBENCH_HOTLOAD_STEP_WINDOW_MS=0` for the unpaced figures beside the paced ones.

"75m" is a ~75M-parameter Qwen3 built here from a config (random weights, registered through a
temporary model catalog): with the 5M model a whole hot load is a few milliseconds and the HTTP round
trip alone dominates the ratio. Timings on this shared 2-core machine vary 10-30% between runs.

`--engine builtin,vllm` measures each engine in turn against the same floor and snapshots. On vLLM the
"copy" part is the push: the decoded bf16 weights written as one safetensors file (in /dev/shm) and
reloaded in place into the running engine through collective_rpc (see deployment/vllm_replica.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

KEY = "bench-key"
MEDIUM = "accounts/bench/models/qwen3-75m"


def make_medium(where: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from workbench import models

    d = where / "qwen3-75m"
    small = models.local_path(models.SMALL_MODEL)
    cfg = Qwen3Config(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(str(d))
    for f in small.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            (d / f.name).write_bytes(f.read_bytes())
    return d


def write_snapshots(model_name: str, root: Path, delta_format: str = "arc_v2") -> tuple[dict, dict]:
    from workbench import checkpoints as ck
    from workbench import models

    model = models.load_model(model_name)
    w1 = ck.bf16_state(model)
    ck.save_sampler_base(root / "snap-base", w1, models.local_path(model_name), {"base_model": model_name})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3 * p.abs())
    w2 = ck.bf16_state(model)
    stats = ck.save_sampler_delta(root / "snap-delta", w2, w1, "snap-base", {"base_model": model_name},
                                  delta_format=delta_format)
    return w1, stats


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


class Floor:
    """The in-process floor: read + decode a snapshot and copy it into an fp32 model (warm page cache)."""

    def __init__(self, model_name: str, root: Path, base_w: dict):
        from workbench import models

        self.model = models.load_model(model_name).eval()
        self.root, self.base_w = root, base_w

    def run(self, kind: str) -> float:
        from workbench import checkpoints as ck

        t0 = time.perf_counter()
        if kind == "base":
            w = ck.load_base_weights(self.root / "snap-base")
        else:
            w = ck.apply_delta(self.root / "snap-delta", self.base_w, "snap-base")
        with torch.no_grad():
            self.model.load_state_dict(w, strict=False)
        return time.perf_counter() - t0


def start_replica(model_name: str, work: Path, env: dict, engine: str = "builtin",
                  tag: str = "") -> tuple[subprocess.Popen, int]:
    from workbench.backend.deployment.engines import replica_command

    ddir = work / f"dep-{engine}{tag}"      # its own directory: no port file or state.json of another
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / "deployment.json").write_text(json.dumps(
        {"deployment_id": "bench", "account": "bench", "base_model": model_name, "home": str(work)}))
    port_file = ddir / "port"
    python, args, extra = replica_command(engine, ddir)
    proc = subprocess.Popen([python, *args, "--port-file", str(port_file)],
                            env=dict(env, WORKBENCH_API_KEY=KEY, **extra),
                            stdout=subprocess.DEVNULL, stderr=open(ddir / "replica.log", "wb"))
    deadline = time.time() + (1800 if engine == "vllm" else 180)   # vLLM starts in minutes on a busy CPU
    while time.time() < deadline:
        if port_file.exists():
            port = int(port_file.read_text())
            if httpx.get(f"http://127.0.0.1:{port}/readyz", headers={"x-api-key": KEY}).status_code == 200:
                return proc, port
        if proc.poll() is not None:
            raise RuntimeError((ddir / "replica.log").read_text()[-5000:])
        time.sleep(0.1)
    raise TimeoutError("replica did not start")


class Hotloader:
    def __init__(self, port: int, root: Path, delta_format: str = "arc_v2"):
        self.delta_format = delta_format
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                   headers={"x-api-key": KEY, "x-workbench-snapshot-root": str(root)})

    def load(self, identity: str, previous: str | None = None) -> float:
        self.last: dict = {}
        body = {"identity": identity, "reset_prompt_cache": True}
        if previous:
            body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": previous,
                                                     "compression_format": self.delta_format, "checksum_format": "alder32"}
        t0 = time.perf_counter()
        r = self.client.post("/hot_load/v1/models/hot_load", json=body)
        r.raise_for_status()
        self.last = r.json()
        while True:
            rep = self.client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
            if rep["current_snapshot_identity"] == identity and rep["readiness"]:
                return time.perf_counter() - t0
            assert rep["loading_state"]["stage"] != "error", rep
            time.sleep(0.001)


async def _sampler_child(port: int, seconds: float, n_streams: int) -> None:
    """Runs in its own process (so the bench's own threads do not disturb the measurement): decodes
    `n_streams` streams back to back for `seconds` after the first chunk arrives (it writes "streaming" on
    stderr then, so the parent can time its windows from there) and prints [[t, gap], ...] for every SSE chunk."""
    import asyncio

    gaps: list = []
    end = float("inf")          # set at the first chunk: a busy machine can take seconds to get there
    async with httpx.AsyncClient(timeout=120, headers={"x-api-key": KEY}) as c:
        async def run(seed):
            nonlocal end
            while time.perf_counter() < end:
                body = {"model": "accounts/bench/deployments/bench", "prompt": [1, 2, 3, 4 + seed],
                        "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 1.0}
                last = None
                async with c.stream("POST", f"http://127.0.0.1:{port}/inference/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        now = time.perf_counter()   # CLOCK_MONOTONIC: comparable across processes
                        if end == float("inf"):
                            end = now + seconds
                            print("streaming", file=sys.stderr, flush=True)
                        if last is not None:
                            gaps.append((now, now - last))
                        last = now
                        if now > end:
                            break
        await asyncio.gather(*(run(i) for i in range(n_streams)))
    print(json.dumps(gaps))


def start_samplers(port: int, seconds: float, n_streams: int = 4) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--sampler-child", str(port), str(seconds), str(n_streams)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def bench_model(model_name: str, repeats: int, env: dict, engines: list[str] = ("builtin",),
                delta_format: str = "arc_v2", trees: list[str | None] = (None,)) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "sampler"
        root.mkdir()
        base_w, dstats = write_snapshots(model_name, root, delta_format)
        floor = Floor(model_name, root, base_w)
        params = sum(t.numel() for t in base_w.values())
        for engine in engines:
            for i, tree in enumerate(trees):
                tree_env = dict(env, PYTHONPATH=str(Path(tree).resolve())) if tree else env
                t_start = time.perf_counter()
                proc, port = start_replica(model_name, work, tree_env, engine, tag=f"-{i}")
                print(f"\n-- engine {engine}, replica from {tree or 'this tree'} (ready in "
                      f"{time.perf_counter() - t_start:.0f} s), {delta_format} delta", end="")
                try:
                    _bench_replica(port, root, floor, repeats, model_name, params, dstats, delta_format)
                finally:
                    proc.terminate()
                    proc.wait(60)


def _bench_replica(port, root, floor, repeats, model_name, params, dstats, delta_format="arc_v2") -> None:
    hl = Hotloader(port, root, delta_format)
    times = {"base": [], "delta": []}
    floors = {"base": [], "delta": []}
    server = {"base": [], "delta": []}
    # interleaved, so machine noise (the cores are shared) hits floor and hot load alike;
    # the first round warms the page cache and is dropped
    for _ in range(repeats + 1):
        for kind, prev in (("base", None), ("delta", "snap-base")):
            floors[kind].append(floor.run(kind))
            times[kind].append(hl.load(f"snap-{kind}", previous=prev))
            server[kind].append(hl.last)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    fl = {k: statistics.median(v[1:]) for k, v in floors.items()}
    nbytes = {"base": dir_bytes(root / "snap-base"), "delta": dir_bytes(root / "snap-delta")}
    print(f"\nmodel {model_name}: {params / 1e6:.1f}M parameters, delta {dstats['ratio']:.1f}x smaller "
          f"than raw bf16 ({dstats['changed_elements'] / dstats['total_elements']:.0%} of elements changed)")
    print(f"  {'snapshot':<8} {'bytes read':>12} {'floor (read+decode+copy)':>26} {'hotload POST->ready':>21} {'ratio':>6}")
    for k in ("base", "delta"):
        parts = {p: statistics.median(x[p] for x in server[k][1:]) * 1000
                 for p in ("read_decode_seconds", "copy_seconds", "swap_wait_seconds", "load_seconds")}
        print(f"  {k:<8} {nbytes[k]:>12,} {fl[k] * 1000:>23.1f} ms {med[k] * 1000:>18.1f} ms "
              f"{med[k] / fl[k]:>5.2f}x   (in the replica: read+decode {parts['read_decode_seconds']:.1f}, "
              f"copy {parts['copy_seconds']:.1f}, swap wait {parts['swap_wait_seconds']:.1f}, "
              f"all {parts['load_seconds']:.1f} ms)")

    # pauses seen by concurrent samplers: a quiet window, then the same length with hot loads
    child = start_samplers(port, seconds=6.0)
    # wait for the streams to get going (a condition, not a fixed sleep: on a busy machine it takes seconds)
    if child.stderr.readline().strip() != "streaming":
        raise RuntimeError("sampler child ended before streaming: " + child.stderr.read())
    time.sleep(0.5)
    q0 = time.perf_counter()
    time.sleep(2.0)
    q1 = time.perf_counter()
    n_loads, engine_pause = 0, 0.0
    while time.perf_counter() - q1 < 2.0 or n_loads < 4:
        for identity, previous in (("snap-base", None), ("snap-delta", "snap-base")):
            hl.load(identity, previous=previous)
            engine_pause = max(engine_pause, hl.last.get("max_sampler_pause_seconds", 0.0))
        n_loads += 2
    h1 = time.perf_counter()
    gaps = json.loads(child.communicate(timeout=120)[0])
    quiet = sorted(g for t, g in gaps if q0 <= t < q1)
    busy = sorted(g for t, g in gaps if q1 <= t < h1)
    print(f"  concurrent samplers (4 streams, own process): median chunk gap {quiet[len(quiet) // 2] * 1000:.1f} ms; "
          f"longest gap without hot loads {quiet[-1] * 1000:.1f} ms, during {n_loads} hot loads "
          f"{busy[-1] * 1000:.1f} ms (p99 {quiet[int(len(quiet) * .99)] * 1000:.1f} / "
          f"{busy[int(len(busy) * .99)] * 1000:.1f} ms); the replica's own longest step gap during loads "
          f"{engine_pause * 1000:.1f} ms; load average {os.getloadavg()[0]:.1f}")
    print(f"  pause the hot loads added (longest gap during minus without): {(busy[-1] - quiet[-1]) * 1000:.1f} ms "
          "(target <= 50)")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--sampler-child":
        import asyncio
        asyncio.run(_sampler_child(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="small,75m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine", default="builtin", help="comma-separated: builtin, vllm (each in turn)")
    ap.add_argument("--format", default="arc_v2", help="the delta snapshot's format (arc_v2, workbench_v1, ...)")
    ap.add_argument("--compare", default="", help="comma-separated source trees whose replica runs too (before/after)")
    args = ap.parse_args()
    torch.set_num_threads(1)     # the replica computes single-threaded too (WORKBENCH_DEPLOYMENT_THREADS)
    from workbench import models

    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cat_dir:
        names = []
        for m in args.models.split(","):
            if m == "small":
                names.append(models.SMALL_MODEL)
            elif m == "tiny":
                names.append(models.DEFAULT_MODEL)
            elif m == "75m":
                d = make_medium(Path(cat_dir))
                catalog = Path(cat_dir) / "models.json"
                catalog.write_text(json.dumps({MEDIUM: str(d)}))
                os.environ["WORKBENCH_MODEL_CATALOG"] = env["WORKBENCH_MODEL_CATALOG"] = str(catalog)
                names.append(MEDIUM)
            else:
                names.append(m)
        for name in names:
            bench_model(name, args.repeats, env, args.engine.split(","), args.format,
                        [None, *filter(None, args.compare.split(","))])


if __name__ == "__main__":
    main()
