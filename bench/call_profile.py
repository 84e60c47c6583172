"""Where the fixed cost of one trainer call goes: a 1x4-token `forward` through the SDK, layer by layer.

    python bench/call_profile.py [--model tiny|small|<model name>] [--calls 40]
    python bench/call_profile.py --compare /tmp/cp-before [--calls 100]      # before/after, one run

--compare TREE starts a second backend from another checkout of workbench (PYTHONPATH=TREE for its
control plane and trainer) and interleaves SDK forwards through both gateways, printing for each the
latency (median, 10th percentile) and the CPU time per call of the control plane, the trainer and
this client process (from /proc: on a busy machine latency is mostly waiting for a core, while CPU
time per call is what the change itself costs or saves), then this client's CPU per call against the
canned server by thread (the SDK's event loop, pyqwest's tokio workers, the caller). Nothing else is run
in that mode.

Starts `workbench serve` in a temporary home and one trainer, then times (medians of --calls each,
interleaved so machine noise hits all alike):
  - in-process torch forward of the same 1x4 tokens (the compute floor)
  - raw httpx GET /api/v1/healthz straight to the trainer (one loopback HTTP round trip + uvicorn/FastAPI)
  - the same GET through the control plane's gateway (adds the proxy hop)
  - SDK forward(...).result() straight to the trainer's port (SDK client + trainer, no gateway)
  - SDK forward(...).result() through the gateway (what a user's loop pays)
  - SDK forward(...).result() against bench/canned_trainer.py, a server with canned answers and no workbench
    code (the SDK's own floor: client-side cost no server can remove; also a side in --compare)
then, per SDK call, the HTTP requests the SDK makes (counted and timed by wrapping httpx's
AsyncClient.send in this process), the client-side cProfile of the calling thread, and with --py-spy
a sampled profile of the trainer and the control plane (py-spy, non-idle samples) grouped by the
innermost package on the stack (torch, fastapi/starlette, uvicorn, json, httpx, ...).
Prints the load average at start and end.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import re
import shutil
import subprocess
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"tiny": "accounts/workbench/models/qwen3-tiny", "small": "accounts/workbench/models/qwen3-small"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# Innermost package on a sampled stack -> what that time is spent on (first match from the leaf up).
CATEGORIES = [("torch", "torch compute"), ("transformers", "torch compute"), ("workbench/models", "torch compute"),
              ("json", "JSON"), ("orjson", "JSON"), ("pydantic", "pydantic"), ("httpx", "httpx/httpcore (proxy client)"),
              ("httpcore", "httpx/httpcore (proxy client)"), ("h11", "HTTP parsing (h11/httptools)"),
              ("httptools", "HTTP parsing (h11/httptools)"), ("uvicorn", "uvicorn"), ("starlette", "fastapi/starlette"),
              ("fastapi", "fastapi/starlette"), ("anyio", "anyio/threads hand-off"), ("concurrent/futures", "threads"),
              ("threading", "threads"), ("asyncio", "asyncio loop"), ("sqlite3", "sqlite"), ("workbench", "workbench code")]


def categorize(raw: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        files = re.findall(r"\(([^)]*)\)", stack)
        leaf = stack.rsplit(";", 1)[-1]
        # py-spy counts a thread inside a syscall as busy; on a loaded machine these are mostly waits for a CPU.
        # uvloop's transports are C: a send shows as the Python line that called transport.write.
        if ("_SelectorSocketTransport.write" in leaf or "sock_sendall" in leaf or "SocketStream.send" in leaf
                or "_CoalescingTransport._flush" in leaf or "UpstreamPool.relay" in leaf):
            counts["socket send syscalls"] += int(n)
            continue
        if "Selector.select" in leaf or "Runner.run" in leaf or "run_forever" in leaf:
            counts["epoll wait (event loop)"] += int(n)   # under uvloop: its C loop (epoll, reads, callbacks)
            continue
        if "_write_to_self" in leaf:
            counts["waking the event loop from a worker thread"] += int(n)
            continue
        label = "other"
        for f in reversed(files):
            hit = next((cat for key, cat in CATEGORIES if f"/{key}" in f or f.startswith(key)), None)
            if hit:
                label = hit
                break
        counts[label] += int(n)
    return counts


def cpu_seconds(pid: int) -> float:
    """Time on a CPU of a whole process (all its live threads), from the scheduler's own nanosecond count
    (/proc/PID/task/*/schedstat): exact, unlike tick-sampled utime/stime."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass   # a thread that ended meanwhile
    return total / 1e9


def client_cpu_by_thread() -> collections.Counter:
    """CPU seconds of this process's threads, by what each is: the Python thread's name where it has one
    (the SDK's event loop is `Thread-1 (_background_thread_func)`), else the OS thread name (pyqwest's
    Rust transport runs in `tokio-rt-worker` threads)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    by_thread: collections.Counter = collections.Counter()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
        except (OSError, IndexError, ValueError):
            continue   # a thread that ended meanwhile
        by_thread[name] += ns / 1e9
    return by_thread


def start_canned(client, datum, workdir: Path) -> tuple[subprocess.Popen, str]:
    """bench/canned_trainer.py in its own process, answering forwards with the result `client` just got for
    `datum` from a real trainer (so the SDK parses the same body); (process, base_url)."""
    import orjson

    def wire(value):   # the SDK's result types are dataclasses; TensorData keeps its values in numpy
        if hasattr(value, "to_numpy") and hasattr(value, "dtype"):
            return {"data": value.tolist(), "dtype": str(getattr(value.dtype, "value", value.dtype)),
                    "shape": value.shape}
        if dataclasses.is_dataclass(value):
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if not f.name.startswith("_")}
        raise TypeError(type(value))

    result = client.forward(datum, "cross_entropy").result()
    body_file, port_file = workdir / "canned-forward.json", workdir / "canned-port"
    body_file.write_bytes(orjson.dumps(result, default=wire, option=orjson.OPT_PASSTHROUGH_DATACLASS))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("canned_trainer.py")), str(port_file),
                             str(body_file)])
    deadline = time.time() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("bench/canned_trainer.py did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"


def compare(model_name: str, other_tree: str, calls: int) -> None:
    """Interleaved SDK forwards through two backends: this tree's and `other_tree`'s."""
    import tinker
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig, TrainerJobManager

    from workbench.backend.home import ensure_api_key, resolve_home
    from workbench.backend.server import start_detached, stop

    trees = {"this tree": os.getcwd() if Path("workbench").is_dir() else str(Path(__file__).parents[1]),
             "other tree": str(Path(other_tree).resolve())}
    load_start = loadavg()
    sides, homes, services = {}, [], []
    saved = os.environ.get("PYTHONPATH")
    try:
        for name, tree in trees.items():
            os.environ["PYTHONPATH"] = tree   # the backend and its trainer import this tree's workbench
            home = resolve_home(tempfile.mkdtemp(prefix="wb-callab-"))
            homes.append(home)
            info = start_detached(home)
            key = ensure_api_key(home)
            mgr = TrainerJobManager(api_key=key, base_url=info["base_url"])
            created = mgr.create(TrainerJobConfig(base_model=model_name, lora_rank=0, learning_rate=1e-4))
            endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=0.2, timeout_s=300)
            service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=key)
            services.append(service)
            children = subprocess.run(["pgrep", "-P", str(info["pid"])], capture_output=True, text=True).stdout
            trainer_pid = next(int(c) for c in children.split()
                               if created.job_id in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace"))
            sides[name] = {"client": service.create_training_client(base_model=model_name, lora_rank=0),
                           "pids": {"control plane": info["pid"], "trainer": trainer_pid},
                           "lat": [], "cpu": collections.Counter()}
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    canned = None
    try:
        datum = [tinker.Datum(model_input=tinker.ModelInput.from_ints([11, 12, 13, 14]),
                              loss_fn_inputs={"target_tokens": tinker.TensorData(data=[12, 13, 14, 15],
                                                                                 dtype="int64", shape=[4])})]
        # The SDK's own floor, measured in the same interleaved blocks (see bench/canned_trainer.py).
        canned, canned_url = start_canned(sides["this tree"]["client"], datum, Path(homes[0]))
        canned_service = FiretitanServiceClient(base_url=canned_url, api_key="canned")
        services.append(canned_service)
        sides["SDK floor"] = {"client": canned_service.create_training_client(base_model=model_name, lora_rank=0),
                              "pids": {"canned server": canned.pid}, "lat": [], "cpu": collections.Counter()}
        for side in sides.values():
            for _ in range(5):
                side["client"].forward(datum, "cross_entropy").result()   # warm up
        block = 10   # interleave blocks of calls so load changes hit both sides alike
        for _ in range(max(1, calls // block)):
            for side in sides.values():
                before = {n: cpu_seconds(p) for n, p in side["pids"].items()}
                client_before = cpu_seconds(os.getpid())
                threads_before = client_cpu_by_thread()
                for _ in range(block):
                    t = time.perf_counter()
                    side["client"].forward(datum, "cross_entropy").result()
                    side["lat"].append(time.perf_counter() - t)
                side["cpu"]["client (SDK)"] += cpu_seconds(os.getpid()) - client_before
                side.setdefault("threads", collections.Counter()).update(client_cpu_by_thread())
                side["threads"].subtract(threads_before)
                for n, p in side["pids"].items():
                    side["cpu"][n] += cpu_seconds(p) - before[n]
        print(f"model {model_name}; load average at start {load_start}, at end {loadavg()}")
        columns = ["control plane", "trainer", "canned server", "client (SDK)"]
        print(f"{'':12s} {'median ms':>10s} {'p10 ms':>8s}   CPU ms per call: "
              + " ".join(f"{c:>13s}" for c in columns) + f" {'sum':>6s}")
        for name, side in sides.items():
            n = len(side["lat"])
            lat = sorted(side["lat"])
            cpu = {k: v / n * 1e3 for k, v in side["cpu"].items()}
            print(f"{name:12s} {statistics.median(lat) * 1e3:10.2f} {lat[n // 10] * 1e3:8.2f}   {'':16s}"
                  + " ".join(f"{cpu[c]:13.2f}" if c in cpu else f"{'-':>13s}" for c in columns)
                  + f" {sum(cpu.values()):6.2f}")
        floor = sides["SDK floor"]
        print("client CPU ms per call against the canned server, by thread (the SDK's own work per call):")
        for name, sec in floor["threads"].most_common(6):
            print(f"  {name:40s} {sec / len(floor['lat']) * 1e3:6.2f}")
        print("trees: " + ", ".join(f"{k} = {v}" for k, v in trees.items()) + f"; {n} calls each; SDK floor = "
              "the same SDK call against bench/canned_trainer.py (canned answers, no workbench code)")
    finally:
        for s in services:
            s.close()
        if canned is not None:
            canned.kill()
            canned.wait()
        for home in homes:
            stop(home)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny, small or a full model name")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--compare", metavar="TREE", default=None,
                    help="A/B mode: also run a backend from this checkout and compare per-call cost")
    ap.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                    help="also sample the trainer and the control plane with py-spy for this long")
    args = ap.parse_args()
    model_name = MODELS.get(args.model, args.model)
    os.environ.setdefault("WORKBENCH_TRAINER_THREADS", "1")
    if args.compare:
        compare(model_name, args.compare, args.calls)
        return

    import httpx
    import tinker
    import torch
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig, TrainerJobManager

    from workbench.backend.home import ensure_api_key, resolve_home
    from workbench.backend.server import start_detached, stop
    from workbench.models import load_model

    torch.set_num_threads(int(os.environ["WORKBENCH_TRAINER_THREADS"]))
    load_start = loadavg()
    home = resolve_home(tempfile.mkdtemp(prefix="wb-callprof-"))
    info = start_detached(home)
    key = ensure_api_key(home)
    services, canned = [], None
    try:
        mgr = TrainerJobManager(api_key=key, base_url=info["base_url"])
        created = mgr.create(TrainerJobConfig(base_model=model_name, lora_rank=0, learning_rate=1e-4))
        endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=0.2, timeout_s=300)
        port_files = [p for p in home.rglob("port") if created.job_id in str(p)]
        direct_url = f"http://127.0.0.1:{int(port_files[0].read_text().strip())}"

        via_gateway = FiretitanServiceClient(base_url=endpoint.base_url, api_key=key)
        direct = FiretitanServiceClient(base_url=direct_url, api_key=key)
        services += [via_gateway, direct]
        gw_client = via_gateway.create_training_client(base_model=model_name, lora_rank=0)
        direct_client = direct.create_training_client(base_model=model_name, lora_rank=0)
        datum = [tinker.Datum(model_input=tinker.ModelInput.from_ints([11, 12, 13, 14]),
                              loss_fn_inputs={"target_tokens": tinker.TensorData(data=[12, 13, 14, 15],
                                                                                 dtype="int64", shape=[4])})]
        canned, canned_url = start_canned(direct_client, datum, home)
        canned_service = FiretitanServiceClient(base_url=canned_url, api_key="canned")
        services.append(canned_service)
        canned_client = canned_service.create_training_client(base_model=model_name, lora_rank=0)
        model = load_model(model_name)
        ids = torch.tensor([[11, 12, 13, 14]])
        http = httpx.Client(headers={"X-Api-Key": key}, timeout=60)

        def local():
            with torch.no_grad():
                model(input_ids=ids)

        paths = {
            "in-process torch forward 1x4": local,
            "httpx GET healthz, direct": lambda: http.get(direct_url + "/api/v1/healthz").raise_for_status(),
            "httpx GET healthz, via gateway": lambda: http.get(endpoint.base_url + "/api/v1/healthz")
            .raise_for_status(),
            "SDK forward 1x4, direct": lambda: direct_client.forward(datum, "cross_entropy").result(),
            "SDK forward 1x4, via gateway": lambda: gw_client.forward(datum, "cross_entropy").result(),
            "SDK forward 1x4, canned server": lambda: canned_client.forward(datum, "cross_entropy").result(),
        }
        times = {name: [] for name in paths}
        for fn in paths.values():
            fn()   # warm up every path
        for _ in range(args.calls):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}

        # The HTTP requests one SDK forward makes, and how long each takes end to end.
        sent: list[tuple[str, float]] = []
        original_send = httpx.AsyncClient.send

        async def timed_send(self, request, *a, **kw):
            t = time.perf_counter()
            try:
                return await original_send(self, request, *a, **kw)
            finally:
                sent.append((request.url.path.rsplit("/api/v1/", 1)[-1], time.perf_counter() - t))

        httpx.AsyncClient.send = timed_send
        per_call = []
        for _ in range(args.calls):
            sent.clear()
            t = time.perf_counter()
            direct_client.forward(datum, "cross_entropy").result()
            per_call.append((time.perf_counter() - t, list(sent)))
        httpx.AsyncClient.send = original_send

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            direct_client.forward(datum, "cross_entropy").result()
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(30)

        spy = {}
        if args.py_spy and not shutil.which("py-spy"):
            print("py-spy not found on PATH (pip install py-spy); skipping the sampled profile")
        elif args.py_spy:
            children = subprocess.run(["pgrep", "-P", str(info["pid"])], capture_output=True, text=True).stdout.split()
            trainer_pid = next((int(c) for c in children
                                if created.job_id in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")),
                               None)
            pids = {"control plane": info["pid"]}
            if trainer_pid:
                pids["trainer"] = trainer_pid
            procs = {name: subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(args.py_spy)),
                                             "--rate", "250", "--format", "raw", "--nonblocking",
                                             "-o", str(home / f"spy-{pid}.txt")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for name, pid in pids.items()}
            n_spy, t_end = 0, time.time() + args.py_spy
            while time.time() < t_end:
                gw_client.forward(datum, "cross_entropy").result()
                n_spy += 1
            for name, proc in procs.items():
                proc.wait(60)
                out_file = home / f"spy-{pids[name]}.txt"
                spy[name] = categorize(out_file.read_text()) if out_file.exists() else None

        load_end = loadavg()
        print(f"model {model_name}, {args.calls} calls per path, medians; load average at start {load_start}, "
              f"at end {load_end}")
        for name, ms in med.items():
            print(f"{name:34s} {ms:8.2f} ms")
        local_ms = med["in-process torch forward 1x4"]
        print("split of the SDK call's fixed cost (SDK via gateway minus in-process compute):")
        print(f"  total fixed cost                    {med['SDK forward 1x4, via gateway'] - local_ms:8.2f} ms")
        print(f"  gateway proxy hop                   "
              f"{med['SDK forward 1x4, via gateway'] - med['SDK forward 1x4, direct']:8.2f} ms "
              f"(healthz: {med['httpx GET healthz, via gateway'] - med['httpx GET healthz, direct']:.2f} ms)")
        print(f"  SDK floor (canned server)           {med['SDK forward 1x4, canned server']:8.2f} ms "
              f"(the SDK, its HTTP stack and 2 loopback round trips; no server can remove it)")
        print(f"  trainer server beyond the floor     "
              f"{med['SDK forward 1x4, direct'] - med['SDK forward 1x4, canned server'] - local_ms:8.2f} ms "
              f"(SDK direct minus floor minus compute: HTTP serving, futures, worker hand-off)")
        print(f"  one bare loopback HTTP round trip   {med['httpx GET healthz, direct']:8.2f} ms")
        n_req = statistics.median(len(reqs) for _, reqs in per_call)
        in_http = statistics.median(sum(d for _, d in reqs) for _, reqs in per_call) * 1e3
        total = statistics.median(t for t, _ in per_call) * 1e3
        by_path = collections.defaultdict(list)
        for _, reqs in per_call:
            for path, d in reqs:
                by_path[path].append(d)
        print(f"per direct SDK forward: {n_req:.0f} HTTP request(s), {in_http:.2f} ms inside httpx send, "
              f"{total:.2f} ms in all -> {total - in_http:.2f} ms in the SDK outside HTTP (futures, thread hand-off)")
        for path, ds in by_path.items():
            print(f"    {path:28s} x{len(ds) / len(per_call):.1f} per call, median {statistics.median(ds) * 1e3:7.2f} ms")
        for name, counts in spy.items():
            if not counts:
                print(f"py-spy: no samples of the {name}")
                continue
            tot = sum(counts.values())
            print(f"py-spy, {name}: {tot} non-idle samples at 250 Hz over {args.py_spy:.0f} s "
                  f"({n_spy} SDK calls via gateway, {tot / 250 / max(n_spy, 1) * 1e3:.1f} ms CPU-busy per call):")
            for label, n in counts.most_common(10):
                print(f"    {label:36s} {100 * n / tot:5.1f} %")
        print("cProfile of the client side of the direct SDK call (cumulative, top functions):")
        print("\n".join(out.getvalue().splitlines()[:45]))
    finally:
        for s in services:
            s.close()
        if canned is not None:
            canned.kill()
            canned.wait()
        stop(home)


if __name__ == "__main__":
    main()
