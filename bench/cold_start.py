"""Cold start and resident memory of the backend's processes, driven through the official SDK.

    python bench/cold_start.py [--model accounts/workbench/models/qwen3-tiny] [--no-importtime]

Starts `workbench serve` in a temporary home (port 0), creates a trainer on the embedded model
(shape `qwen3-tiny-cpu`) and then a deployment of it, and prints:
  - serve -> control plane ready (server.json written and /healthz answering), s
  - trainer create -> RUNNING with a healthy service (SDK wait_for_ready, 0.05 s polling), s
  - deployment create -> READY (SDK wait_for_ready, 0.05 s polling), s
  - RSS (VmRSS) and peak RSS (VmHWM) of the control plane, the trainer and the deployment replica, MiB,
    and of the trainer again after one forward_backward + optim_step through the SDK
  - the load average at start and end (the figures mean little on a loaded machine without it)
and, per process, the 8 heaviest third-party imports `python -X importtime` attributes to
importing its entry module in a fresh interpreter (where the cold start goes).
Every process it starts is stopped at the end (the control plane stops its children).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=TINY)
    ap.add_argument("--shape", default=TINY_SHAPE)
    ap.add_argument("--no-importtime", action="store_true", help="skip the per-process import profiles")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
        t0 = time.perf_counter()
        created = trainers.create(TrainerJobConfig(base_model=args.model, training_shape_ref=profile.training_shape,
                                                   lora_rank=0, learning_rate=1e-4))
        trainers.wait_for_ready(created.job_id, poll_interval_s=0.05, timeout_s=300)
        figures["trainer create -> RUNNING"] = time.perf_counter() - t0

        deployments = DeploymentManager(api_key=key, base_url=base_url)
        t0 = time.perf_counter()
        deployments.create_or_get(DeploymentConfig(deployment_id="cold-start", base_model=args.model,
                                                   min_replica_count=1, max_replica_count=1))
        deployments.wait_for_ready("cold-start", poll_interval_s=0.05, timeout_s=300)
        figures["deployment create -> READY"] = time.perf_counter() - t0

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
        service.close()
    finally:
        load_end = loadavg()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)     # the control plane stops its trainers and replicas
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)

    print(f"model {args.model}, shape {args.shape}; load average at start {load_start}, at end {load_end}")
    for name, seconds in figures.items():
        print(f"{name:34s} {seconds:7.2f} s")
    print(f"{'process':16s} {'pid':>8s} {'RSS MiB':>9s} {'peak MiB':>9s}")
    for name, (pid, now, peak) in rss.items():
        print(f"{name:16s} {pid or '-':>8} {now:9.1f} {peak:9.1f}")
    if not args.no_importtime:
        for name, modules in ENTRY_MODULES.items():
            total, heavy = import_profile(modules)
            print(f"imports of the {name} ({modules}): {total:.2f} s in all (load {loadavg()}); heaviest non-workbench:")
            for pkg, seconds in heavy:
                print(f"    {pkg:70s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
