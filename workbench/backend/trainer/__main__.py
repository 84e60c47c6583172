"""Entry point of one trainer process (one per trainer job), spawned by the control plane.

    WORKBENCH_API_KEY=<key> python -m workbench.backend.trainer --job-dir DIR --port-file FILE [--host 127.0.0.1]

Reads `DIR/job.json` ({"job_id", "account", "base_model", "lora_rank", "learning_rate",
"max_context_length", "home"}), loads the base model (fp32), binds an ephemeral port, and only once
uvicorn is serving writes that port to FILE atomically (temp file + os.replace): the control plane
waits for the file, so its appearance means "ready". Logs go to stderr.

Lifetime. The process first takes the job directory's ownership lock (`trainer.lock`, flock, see
`workbench.checkpoints.layout.hold_job_lock`): if another live trainer holds it, it waits up to
WORKBENCH_TRAINER_LOCK_WAIT_S (default 10) for that one to exit, then refuses to start (exit status 4),
so two trainers never write one job directory. SIGTERM/SIGINT stop it cleanly (exit 0, within ~1 s
when idle); so does the death of its parent (PR_SET_PDEATHSIG set by the supervisor, and a watchdog
on getppid for the window before that and for other platforms). If the operation worker cannot
continue, the process exits with status 3 and the reason as its last log line. The process ends with
os._exit once uvicorn has stopped: every file it writes is atomic, and interpreter teardown (torch and
thread-pool joins) could otherwise hold a dead trainer for many seconds.
Every request must carry the key as `X-Api-Key` or `Authorization: Bearer`; if WORKBENCH_API_KEY is
unset the process refuses to start (exit status 2): a trainer is never served unauthenticated.

A job whose job.json asks for more than one rank ("nodes" x "ranks_per_node") runs as N processes
under torch.distributed instead (see distributed/launch.py); this process is then their launcher.

A single-process full-parameter job on a Qwen3 model runs the plain-torch Qwen3 of
`workbench.models.qwen3_torch` (bit-identical results, no transformers import: less memory, faster
start); LoRA jobs, N-rank jobs, other architectures and WORKBENCH_TRAINER_MODEL_IMPL=transformers load
the model with transformers.

Optional environment: WORKBENCH_TRAINER_THREADS (torch intra-op threads; default torch's own),
WORKBENCH_TRAINER_LONG_POLL_S (retrieve_future hold, default 20), WORKBENCH_TRAINER_EXACT_DATUMS
(requests up to this many datums run datum by datum, bit-compatible with a plain torch loop; default 0,
i.e. equal-length datums are batched).
"""

from __future__ import annotations

import os
import time

# The first instant this module runs (interpreter up): taken before any other import, for the start-up
# timeline (see `Startup`).
_INTERPRETER_UP = (time.time(), os.times())

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

log = logging.getLogger("workbench.trainer")


def _forked_at() -> float | None:
    """Wall-clock time this process was forked (10 ms resolution: /proc/self/stat's start time in clock
    ticks since boot against CLOCK_BOOTTIME now), or None off Linux."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Startup:
    """This process's start-up timeline: (phase, wall-clock time, CPU seconds user+system of this process
    so far) per phase, logged as one `startup {json}` line once the trainer serves. bench/cold_start.py
    reads it to show where a cold start goes, and CPU seconds argue the quiet-machine figure on a
    loaded one."""

    def __init__(self) -> None:
        wall, times = _INTERPRETER_UP
        forked = _forked_at()
        self.marks: list[tuple[str, float, float]] = [] if forked is None else [("forked", forked, 0.0)]
        self.marks.append(("interpreter up", wall, times.user + times.system))

    def mark(self, phase: str) -> None:
        times = os.times()
        self.marks.append((phase, time.time(), times.user + times.system))

    def line(self) -> str:
        return json.dumps([[phase, round(wall, 4), round(cpu, 3)] for phase, wall, cpu in self.marks])


EXIT_FATAL = 3        # the worker could not continue (reason in the last log line)
EXIT_LOCKED = 4       # another live trainer owns the job directory


def _take_job_lock(job_dir: Path, wait_s: float) -> int | None:
    """The job directory's ownership lock (an open fd held for the process's life), or None if another
    live trainer still holds it after `wait_s` seconds."""
    from workbench.checkpoints.layout import JobLayout, hold_job_lock, job_lock_owner

    layout = JobLayout(job_dir)
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            return hold_job_lock(layout)
        except BlockingIOError:
            owner = job_lock_owner(layout)
            if time.monotonic() >= deadline:
                log.error("job directory %s is owned by another live trainer (pid %s); refusing to start",
                          job_dir, owner)
                return None
            if not announced:
                log.warning("job directory %s is owned by trainer pid %s; waiting up to %.0fs for it to exit",
                            job_dir, owner, wait_s)
                announced = True
            time.sleep(0.1)


def _watch_parent(on_orphaned) -> None:
    """Call `on_orphaned()` once if this process is re-parented (its parent died)."""
    parent = os.getppid()
    if parent <= 1:
        return   # started by init / a reaper: nothing to watch

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        log.warning("parent process %d died: stopping", parent)
        on_orphaned()
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _plain_or_transformers(name: str, model_dir: Path):
    """The base-model loader of a single-process full-parameter job: the plain-torch Qwen3
    (`workbench.models.qwen3_torch`, bit-identical to transformers' and without its import cost) when it
    supports the model, else transformers."""
    from workbench import models
    from workbench.models import qwen3_torch

    def load():
        return qwen3_torch.load(model_dir) or models.load_model(name)
    return load


def main(argv: list[str] | None = None, backend_factory=None) -> int:
    """Run one trainer process; `backend_factory` (LocalTorchTrainer's signature) replaces the
    single-process backend: rank 0 of an N-rank job passes its broadcasting sharded backend."""
    parser = argparse.ArgumentParser(prog="python -m workbench.backend.trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--job-dir", required=True, type=Path, help="the job directory holding job.json")
    parser.add_argument("--port-file", required=True, type=Path, help="written with the port once serving")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    startup = Startup()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A stop requested while the model is still loading is a clean exit too (uvicorn takes over the
    # signal handlers once it serves).
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(0))
    server_box: dict = {}

    def orphaned() -> None:
        server = server_box.get("server")
        if server is None:
            _exit_now(0)        # still starting: nothing to shut down gracefully
        os.kill(os.getpid(), signal.SIGTERM)   # the same path as a requested stop
    _watch_parent(orphaned)
    if backend_factory is None:
        from .distributed.launch import launch_if_distributed

        code = launch_if_distributed(args.job_dir, args.port_file, args.host)
        if code is not None:   # the job asked for N > 1 ranks: they ran (and ended) under torch.distributed
            return code
    lock_fd = _take_job_lock(args.job_dir, float(os.environ.get("WORKBENCH_TRAINER_LOCK_WAIT_S") or 10))
    if lock_fd is None:
        return EXIT_LOCKED
    startup.mark("job lock held")

    import torch
    import uvicorn

    from workbench import models
    from workbench.checkpoints.layout import JobLayout
    from workbench.backend.coalesce import CoalescingHttpToolsProtocol
    from workbench.common import atomic_write_text

    from .local_torch import DEFAULT_EXACT_MAX_DATUMS, LocalTorchTrainer
    from .protocol import JobConfig
    from .server import create_app

    startup.mark("imports done")
    # torch's default thread count is kept unless overridden: CPU kernels reduce in a thread-count-
    # dependent order, so the default is what makes results reproducible by a plain torch process on
    # the same machine (Adam with a tiny eps turns 1e-7 gradient differences into visible weight
    # differences). On a crowded machine, WORKBENCH_TRAINER_THREADS=1 avoids oversubscription.
    threads = os.environ.get("WORKBENCH_TRAINER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    job = JobConfig.load(JobLayout(args.job_dir).config_file)
    api_key = os.environ.get("WORKBENCH_API_KEY") or None
    if api_key is None:
        # Never serve unauthenticated, even on loopback: any local user could drive the trainer.
        log.error("WORKBENCH_API_KEY is not set; refusing to start an unauthenticated trainer")
        return 2
    # A crash mid-save (kill -9) can leave staging directories behind; they were never listed.
    # Safe while we hold the job lock: no other trainer can be saving into this directory.
    from workbench.checkpoints import cleanup_partial

    for root in JobLayout(args.job_dir).checkpoint_roots:
        cleanup_partial(root)

    log.info("job %s: loading %s (lora_rank=%d)", job.job_id, job.base_model, job.lora_rank)
    try:
        model_dir = models.local_path(job.base_model)
        plain = backend_factory is None and job.lora_rank == 0 and \
            os.environ.get("WORKBENCH_TRAINER_MODEL_IMPL", "auto") != "transformers"
        load_base = _plain_or_transformers(job.base_model, model_dir) if plain else \
            (lambda: models.load_model(job.base_model))
        model = load_base()
    except models.ModelNotFoundError as e:
        # No port file is written: the control plane sees the process exit and fails the job.
        log.error("job %s: cannot load base model: %s", job.job_id, e)
        return 2
    startup.mark("model loaded")
    log.info("job %s: model implementation %s.%s", job.job_id, type(model).__module__, type(model).__name__)
    backend = (backend_factory or LocalTorchTrainer)(
        args.job_dir, job, model, model_dir, base_loader=load_base,
        exact_max_datums=int(os.environ.get("WORKBENCH_TRAINER_EXACT_DATUMS") or DEFAULT_EXACT_MAX_DATUMS))
    fatal: dict[str, str] = {}

    def on_fatal(reason: str) -> None:
        # The worker cannot continue: stop serving (queued futures already carry the reason) and exit
        # non-zero, so the control plane marks the job FAILED with this log's last lines.
        fatal["reason"] = reason
        server.should_exit = True

    startup.mark("backend built")
    app = create_app(backend, api_key, on_fatal=on_fatal,
                     long_poll_s=float(os.environ.get("WORKBENCH_TRAINER_LONG_POLL_S") or 20.0))
    startup.mark("app created")

    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it
    # every keep-alive response waits ~40 ms for the client\'s delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, 0))
    port = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # release held long-polls at once instead of after the grace period
            # A signal handler may interrupt the loop mid-step: schedule, never run, the release here.
            try:
                asyncio.get_running_loop().call_soon_threadsafe(app.state.begin_shutdown)
            except RuntimeError:
                pass
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after its graceful shutdown, so the process would die
            # "killed by SIGTERM" (-15). A requested stop that completed gracefully is a clean exit: 0.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list) and sig == signal.SIGTERM:
                captured[:] = [s for s in captured if s != signal.SIGTERM]

    # Keep-alive well above the clients' pool expiry (httpx: 5 s), so idle pooled connections are closed
    # by the client side first and a request never races a server-side close.
    # A short graceful window: held long-polls are released at once (begin_shutdown), so only a request
    # being answered right now needs it.
    # http=: each answer leaves in one segment (see coalesce.py).
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1,
                            timeout_keep_alive=75, lifespan="on", http=CoalescingHttpToolsProtocol)
    server = _Server(config)
    server_box["server"] = server

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.005)   # uvicorn has no "started" event; each interval delays RUNNING
        if server.started:
            atomic_write_text(args.port_file, f"{port}\n")
            startup.mark("port written")
            log.info("job %s: serving on %s:%d", job.job_id, args.host, port)
            log.info("job %s: startup %s", job.job_id, startup.line())
        await task

    # uvloop (a dependency) when importable: its loop costs less per request than asyncio's on every
    # trainer call; uvicorn's own run() would pick it the same way ("auto").
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - an install without it still serves, a little slower
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve())
    backend.close()
    if fatal:
        log.error("job %s: trainer failed: %s", job.job_id, fatal["reason"])
        return EXIT_FATAL
    log.info("job %s: trainer stopped", job.job_id)
    return 0


if __name__ == "__main__":
    _exit_now(main())
