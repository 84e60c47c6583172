"""Entry point of one trainer process (one per trainer job), spawned by the control plane.

    WORKBENCH_API_KEY=<key> python -m workbench.backend.trainer --job-dir DIR --port-file FILE [--host 127.0.0.1]

Reads `DIR/job.json` ({"job_id", "account", "base_model", "lora_rank", "learning_rate",
"max_context_length", "home"}), loads the base model (fp32), binds an ephemeral port, and only once
uvicorn is serving writes that port to FILE atomically (temp file + os.replace): the control plane
waits for the file, so its appearance means "ready". Logs go to stderr. SIGTERM/SIGINT exit cleanly.
Every request must carry the key as `X-Api-Key` or `Authorization: Bearer`; if WORKBENCH_API_KEY is
unset the process refuses to start (exit status 2): a trainer is never served unauthenticated.

Optional environment: WORKBENCH_TRAINER_THREADS (torch intra-op threads; default torch's own),
WORKBENCH_TRAINER_LONG_POLL_S (retrieve_future hold, default 20), WORKBENCH_TRAINER_EXACT_DATUMS
(requests up to this many datums run datum by datum, bit-compatible with a plain torch loop; default 0,
i.e. equal-length datums are batched).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

log = logging.getLogger("workbench.trainer")


def _write_port_file(path: Path, port: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.backend.trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--job-dir", required=True, type=Path, help="the job directory holding job.json")
    parser.add_argument("--port-file", required=True, type=Path, help="written with the port once serving")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A stop requested while the model is still loading is a clean exit too (uvicorn takes over the
    # signal handlers once it serves).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    import torch
    import uvicorn

    from workbench import models

    from .local_torch import DEFAULT_EXACT_MAX_DATUMS, LocalTorchTrainer
    from .protocol import JobConfig
    from .server import create_app

    # torch's default thread count is kept unless overridden: CPU kernels reduce in a thread-count-
    # dependent order, so the default is what makes results reproducible by a plain torch process on
    # the same machine (Adam with a tiny eps turns 1e-7 gradient differences into visible weight
    # differences). On a crowded machine, WORKBENCH_TRAINER_THREADS=1 avoids oversubscription.
    threads = os.environ.get("WORKBENCH_TRAINER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    job = JobConfig.load(args.job_dir / "job.json")
    api_key = os.environ.get("WORKBENCH_API_KEY") or None
    if api_key is None:
        # Never serve unauthenticated, even on loopback: any local user could drive the trainer.
        log.error("WORKBENCH_API_KEY is not set; refusing to start an unauthenticated trainer")
        return 2
    # A crash mid-save (kill -9) can leave staging directories behind; they were never listed.
    from workbench.checkpoints import cleanup_partial

    for root in (args.job_dir / "checkpoints", args.job_dir / "sampler"):
        cleanup_partial(root)

    log.info("job %s: loading %s (lora_rank=%d)", job.job_id, job.base_model, job.lora_rank)
    try:
        model_dir = models.local_path(job.base_model)
        model = models.load_model(job.base_model)
    except models.ModelNotFoundError as e:
        # No port file is written: the control plane sees the process exit and fails the job.
        log.error("job %s: cannot load base model: %s", job.job_id, e)
        return 2
    backend = LocalTorchTrainer(
        args.job_dir, job, model, model_dir, base_loader=lambda: models.load_model(job.base_model),
        exact_max_datums=int(os.environ.get("WORKBENCH_TRAINER_EXACT_DATUMS") or DEFAULT_EXACT_MAX_DATUMS))
    app = create_app(backend, api_key,
                     long_poll_s=float(os.environ.get("WORKBENCH_TRAINER_LONG_POLL_S") or 20.0))

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
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            timeout_keep_alive=75, lifespan="on")
    server = _Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            _write_port_file(args.port_file, port)
            log.info("job %s: serving on %s:%d", job.job_id, args.host, port)
        await task

    asyncio.run(serve())
    log.info("job %s: trainer stopped", job.job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
