"""Cold start and resident memory of the backend's processes, driven through the official SDK.

    python bench/cold_start.py [--model accounts/workbench/models/qwen3-tiny] [--no-importtime]
    python bench/cold_start.py --compare /tmp/before-tree --runs 3 --no-importtime   # side by side

Starts `workbench serve` in a temporary home (port 0), creates a trainer on the embedded model
(shape `qwen3-tiny-cpu`) and then a deployment of it, and prints:
  - serve -> control plane ready (server.json written and /healthz answering), s
  - trainer create -> RUNNING with a healthy service (SDK wait_for_ready, 0.05 s polling), s, and the
    trainer's CPU seconds (user + system, /proc) by then: on a loaded machine wall time stretches, CPU
    time much less, so it is what argues the quiet-machine figure
  - the trainer's phase timeline, s after the create request (and its CPU s at each): the control
    plane's spawn (the supervisor's log header), fork, interpreter up, job lock held, imports done,
    model loaded, backend built, app created, port written (the trainer's `startup` log line), the
    control plane's RUNNING (the job's updateTime) and the SDK seeing RUNNING + healthz
  - deployment create -> READY (SDK wait_for_ready, 0.05 s polling), s, and the replica's CPU s by then
  - RSS (VmRSS) and peak RSS (VmHWM) of the control plane, the trainer and the deployment replica, MiB;
    of the trainer again after one forward_backward + optim_step through the SDK (at once, and once it
    has been idle long enough to give the step's freed heap back), and of the replica
    again after serving a few completions (token prompts through the SDK's DeploymentSampler and a
    text prompt over HTTP, n=4, 32 tokens each), at once and once idle (as the trainer)
  - the load average at start and end (the figures mean little on a loaded machine without it)
and, per process, the 8 heaviest third-party imports `python -X importtime` attributes to
importing its entry module in a fresh interpreter (where the cold start goes).
Every process it starts is stopped at the end (the control plane stops its children).

`--compare TREE` measures two source trees side by side: this bench's own tree and TREE (another
checkout, e.g. `git worktree add /tmp/before main`), run alternately `--runs` times each (each run a
fresh `workbench serve` with PYTHONPATH set to that tree), and prints the median and range of every
figure per tree, with each run's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

TINY = "accounts/workbench/models/qwen3-tiny"
TINY_SHAPE = "accounts/workbench/trainingShapes/qwen3-tiny-cpu"

# What each process imports before it serves (its `python -m` module plus the imports that module's
# main() does lazily); importing them in a fresh interpreter is the import cost of its cold start.
ENTRY_MODULES = {
    "control plane": "workbench.cli, uvicorn, workbench.backend.control_plane.app",
    "trainer": ("workbench.backend.trainer.__main__, torch, uvicorn, workbench.models, workbench.models.qwen3_torch, "
                "workbench.backend.trainer.local_torch, workbench.backend.trainer.server"),
    "deployment": ("workbench.backend.deployment.__main__, uvicorn, workbench.backend.deployment.builtin, "
                   "workbench.backend.deployment.server"),
}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [g for k in kids for g in descendants(k)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trainer_timeline(home: Path, job_id: str, created_at: float, ready_at: float,
                     running_time: str | None) -> dict[str, float]:
    """The trainer's start-up phases as `trainer @ <phase>` (s after the create request was sent) and
    `trainer CPU @ <phase>` (its CPU seconds then): the control plane's spawn (its log header), the
    trainer's own `startup` line (trees before it was logged lack those), the control plane's RUNNING
    (the job's updateTime) and the SDK's wait_for_ready returning."""
    out: dict[str, float] = {}
    text = (home / "logs" / f"trainer-{job_id}.log").read_text(errors="replace")
    spawns = re.findall(r"^===== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(\.\d+)? starting trainer", text, re.M)
    if spawns:
        stamp, frac = spawns[-1]
        out["trainer @ control plane spawns"] = (time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
                                                 + float(frac or 0) - created_at)
    phases = re.findall(r"startup (\[.*\])$", text, re.M)
    for phase, wall, cpu in (json.loads(phases[-1]) if phases else []):
        out[f"trainer @ {phase}"] = wall - created_at
        out[f"trainer CPU @ {phase}"] = cpu
    if running_time:
        out["trainer @ job RUNNING (control plane)"] = (
            datetime.strptime(running_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
            - created_at)
    out["trainer @ RUNNING + healthz (SDK)"] = ready_at - created_at
    return out


def find_child(root: int, module: str) -> int | None:
    for pid in descendants(root):
        if f"-m {module}" in cmdline(pid):
            return pid
    return None


def import_profile(modules: str, top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """Total seconds to import `modules` (comma-separated) in a fresh interpreter, and the `top` heaviest first imports of
    non-workbench modules (those imported directly by workbench code or at top level, so no time counts twice)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {modules}"],
                         capture_output=True, text=True, env=os.environ.copy()).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append((len(m.group(3)) // 2, m.group(4), int(m.group(2)) / 1e6))
    total = sum(cum for depth, _, cum in rows if depth == 0)
    # A row's parent is the next row after it with a smaller depth (children are printed first).
    heavy: dict[str, float] = {}
    for i, (depth, name, cum) in enumerate(rows):
        chain, d = [], depth
        for later_depth, later_name, _ in rows[i + 1:]:
            if later_depth < d:
                chain.append(later_name)
                d = later_depth
                if d == 0:
                    break
        root = name.split(".")[0]
        if root == "workbench" or name.startswith("encodings"):
            continue
        if all(p.split(".")[0] == "workbench" for p in chain):
            label = f"{name} (via {chain[0]})" if chain else name
            heavy[label] = heavy.get(label, 0.0) + cum
    return total, sorted(heavy.items(), key=lambda kv: -kv[1])[:top]


def serve_completions(base_url: str, key: str, model: str) -> None:
    """A few completions through the control plane: token prompts with the official DeploymentSampler (the
    text comes back detokenized) and a text prompt over HTTP (the replica tokenizes it)."""
    from fireworks.training.sdk import DeploymentSampler

    sampler = DeploymentSampler(inference_url=base_url, model=model, api_key=key)

    async def go():
        for start in (10, 50, 90):
            out = await sampler.sample_with_prompt_tokens(list(range(start, start + 24)), n=4, max_tokens=32,
                                                          ignore_eos=True, logprobs=True)
            assert len(out) == 4
    asyncio.run(go())
    r = httpx.post(base_url + "/inference/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": model, "prompt": "What is 2+2? Answer:", "n": 4, "max_tokens": 32,
                         "logprobs": True, "stream": False})
    r.raise_for_status()


def measure(args) -> tuple[dict, dict, str, str]:
    """One cold start: (figures in s, {process: (pid, RSS MiB, peak MiB)}, load average at start, at end)."""
    from fireworks.training.sdk import DeploymentConfig, DeploymentManager, TrainerJobConfig, TrainerJobManager

    load_start = loadavg()
    home = Path(tempfile.mkdtemp(prefix="wb-cold-"))
    log = open(home / "serve.log", "ab")
    t0 = time.perf_counter()
    serve = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", "--home", str(home), "--port", "0"],
                             stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, WORKBENCH_HOME=str(home)),
                             start_new_session=True)
    figures, rss = {}, {}
    try:
        deadline = time.time() + 120
        base_url = None
        while time.time() < deadline and base_url is None:
            info_file = home / "server.json"
            if info_file.exists():
                try:
                    info = json.loads(info_file.read_text())
                except json.JSONDecodeError:
                    info = {}
                if info.get("pid") == serve.pid:
                    try:
                        if httpx.get(info["base_url"] + "/healthz", timeout=5).status_code < 500:
                            base_url = info["base_url"]
                    except httpx.HTTPError:
                        pass
            if serve.poll() is not None:
                raise RuntimeError((home / "serve.log").read_text())
            time.sleep(0.02)
        if base_url is None:
            raise TimeoutError("workbench serve did not start")
        figures["serve -> control plane ready"] = time.perf_counter() - t0
        key = (home / "api_key").read_text().strip()

        trainers = TrainerJobManager(api_key=key, base_url=base_url)
        profile = trainers.resolve_training_profile(args.shape)
        t0, created_at = time.perf_counter(), time.time()
        created = trainers.create(TrainerJobConfig(base_model=args.model, training_shape_ref=profile.training_shape,
                                                   lora_rank=0, learning_rate=1e-4))
        trainers.wait_for_ready(created.job_id, poll_interval_s=0.05, timeout_s=300)
        figures["trainer create -> RUNNING"] = time.perf_counter() - t0
        ready_at = time.time()
        trainer_pid = find_child(serve.pid, "workbench.backend.trainer")
        if trainer_pid:
            figures["trainer CPU s until RUNNING"] = cpu_seconds(trainer_pid)
        figures.update(trainer_timeline(home, created.job_id, created_at, ready_at,
                                        trainers.get(created.job_id).get("updateTime")))

        deployments = DeploymentManager(api_key=key, base_url=base_url)
        t0 = time.perf_counter()
        deployment = deployments.create_or_get(DeploymentConfig(deployment_id="cold-start", base_model=args.model,
                                                                min_replica_count=1, max_replica_count=1))
        deployments.wait_for_ready("cold-start", poll_interval_s=0.05, timeout_s=300)
        figures["deployment create -> READY"] = time.perf_counter() - t0
        replica_pid = find_child(serve.pid, "workbench.backend.deployment")
        if replica_pid:
            figures["deployment CPU s until READY"] = cpu_seconds(replica_pid)

        rss["control plane"] = (serve.pid, *rss_mib(serve.pid))
        for name, module in (("trainer", "workbench.backend.trainer"), ("deployment", "workbench.backend.deployment")):
            pid = find_child(serve.pid, module)
            rss[name] = (pid, *rss_mib(pid)) if pid else (None, float("nan"), float("nan"))
        # The trainer once it trains: the optimizer (torch.optim imports torch._dynamo) and the gradients.
        import tinker
        from fireworks.training.sdk import FiretitanServiceClient

        endpoint = trainers.wait_for_ready(created.job_id, poll_interval_s=0.05, timeout_s=300)
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=key)
        client = service.create_training_client(base_model=args.model, lora_rank=0)
        datum = tinker.Datum(model_input=tinker.ModelInput.from_ints(list(range(10, 42))),
                             loss_fn_inputs={"target_tokens": tinker.TensorData(data=list(range(11, 43)),
                                                                               dtype="int64", shape=[32])})
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-4)).result()
        pid = rss["trainer"][0]
        rss["trainer after 1 step"] = (pid, *rss_mib(pid)) if pid else (None, float("nan"), float("nan"))
        # Once idle (its queue empty 1 s: common.IDLE_RELEASE_S), a trainer gives the step's
        # freed heap back to the OS. Not imported from there: --compare runs this bench over older trees.
        time.sleep(3.0)
        rss["trainer idle after 1 step"] = (pid, *rss_mib(pid)) if pid else (None, float("nan"), float("nan"))
        service.close()
        serve_completions(base_url, key, deployment.inference_model or deployment.name)
        pid = rss["deployment"][0]
        rss["deployment after completions"] = (pid, *rss_mib(pid)) if pid else (None, float("nan"), float("nan"))
        # Likewise a replica's engine, idle 1 s after work (common.IDLE_RELEASE_S), drops
        # its KV cache and gives the freed heap back.
        time.sleep(3.0)
        rss["deployment idle after completions"] = (pid, *rss_mib(pid)) if pid else (None, float("nan"),
                                                                                       float("nan"))
    finally:
        load_end = loadavg()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)     # the control plane stops its trainers and replicas
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)     # only after a run that succeeded: a failed one keeps its logs
    return figures, rss, load_start, load_end


def compare(args) -> None:
    """Alternate runs of this tree and `args.compare`, then print each figure's median and range per tree."""
    trees = {"this tree": str(Path(__file__).resolve().parents[1]), "compared": str(Path(args.compare).resolve())}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(args.runs):
        for name, tree in trees.items():
            cmd = [sys.executable, __file__, "--json", "--model", args.model, "--shape", args.shape, "--no-importtime"]
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
            if out.returncode != 0:
                raise RuntimeError(f"run {i + 1} of {name} ({tree}) failed:\n{out.stderr[-4000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            print(f"run {i + 1} {name:9s} load {result['load_start']} -> {result['load_end']}", flush=True)
    print(f"\nmodel {args.model}, shape {args.shape}; median [min-max] of {args.runs} alternating runs each")
    print(f"  this tree: {trees['this tree']}\n  compared:  {trees['compared']}")
    keys = list(runs["this tree"][0]["figures"]) + [f"{p} RSS MiB" for p in runs["this tree"][0]["rss"]]

    def values(name: str, key: str) -> list[float]:
        if key.endswith(" RSS MiB"):
            return [r["rss"].get(key[:-8], [None, float("nan")])[1] for r in runs[name]]
        return [r["figures"].get(key, float("nan")) for r in runs[name]]

    print(f"{'':42s} {'this tree':>24s} {'compared':>24s}")
    for key in keys:
        cells = []
        for name in trees:
            v = values(name, key)
            cells.append(f"{statistics.median(v):8.2f} [{min(v):.2f}-{max(v):.2f}]")
        print(f"{key:42s} {cells[0]:>24s} {cells[1]:>24s}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=TINY)
    ap.add_argument("--shape", default=TINY_SHAPE)
    ap.add_argument("--no-importtime", action="store_true", help="skip the per-process import profiles")
    ap.add_argument("--compare", metavar="TREE", help="also measure this source tree, alternating with ours")
    ap.add_argument("--runs", type=int, default=3, help="with --compare: runs of each tree")
    ap.add_argument("--json", action="store_true", help="print one JSON line of the figures (used by --compare)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.compare:
        compare(args)
        return
    figures, rss, load_start, load_end = measure(args)
    if args.json:
        print(json.dumps({"figures": figures, "rss": rss, "load_start": load_start, "load_end": load_end}))
        return
    print(f"model {args.model}, shape {args.shape}; load average at start {load_start}, at end {load_end}")
    for name, seconds in figures.items():
        if not name.startswith("trainer CPU @"):
            cpu = figures.get(name.replace("trainer @", "trainer CPU @"))
            cpu = f"   CPU {cpu:5.2f} s" if name.startswith("trainer @") and cpu is not None else ""
            print(f"{name:42s} {seconds:7.2f} s{cpu}")
    print(f"{'process':30s} {'pid':>8s} {'RSS MiB':>9s} {'peak MiB':>9s}")
    for name, (pid, now, peak) in rss.items():
        print(f"{name:30s} {pid or '-':>8} {now:9.1f} {peak:9.1f}")
    if not args.no_importtime:
        for name, modules in ENTRY_MODULES.items():
            total, heavy = import_profile(modules)
            print(f"imports of the {name} ({modules}): {total:.2f} s in all (load {loadavg()}); heaviest non-workbench:")
            for pkg, seconds in heavy:
                print(f"    {pkg:70s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
