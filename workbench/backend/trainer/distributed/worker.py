"""One rank of an N-rank trainer job; started by the elastic agent (launch.py), never by hand.

    python -m workbench.backend.trainer.distributed.worker --job-dir DIR --port-file FILE --host H
    (environment from the agent: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)

Every rank joins the process group (gloo: the engine computes on CPU), loads the base model and builds
a `ShardedEngine`. Rank 0 then serves the trainer wire exactly like a single-process trainer
(`__main__.serve`: port file once serving, API key required), with collective operations broadcast to
the other ranks (ranks.py); the other ranks follow until rank 0 tells them to stop. A rank whose agent
dies gets SIGTERM (PR_SET_PDEATHSIG), so no rank outlives its job.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("workbench.trainer.worker")

# Followers wait in a broadcast while the trainer is idle (a notebook may think for hours); a dead peer
# is detected by the agent, not by this timeout.
_GROUP_TIMEOUT = datetime.timedelta(days=7)
_PR_SET_PDEATHSIG = 1


def _die_with_agent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() == 1:   # the agent died before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m " + __spec__.name if __spec__ else "worker")
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--port-file", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    _die_with_agent()
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s")

    import torch
    import torch.distributed as dist

    from workbench import models
    from workbench.backend.trainer.engine import DEFAULT_EXACT_MAX_DATUMS, JobConfig

    from .engine import ShardedEngine
    from .ranks import BroadcastingEngine, follow

    threads = os.environ.get("WORKBENCH_TRAINER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    api_key = os.environ.get("WORKBENCH_API_KEY") or None
    if rank == 0 and api_key is None:
        log.error("WORKBENCH_API_KEY is not set; refusing to start an unauthenticated trainer")
        return 2
    dist.init_process_group("gloo", timeout=_GROUP_TIMEOUT)
    job = JobConfig.load(args.job_dir / "job.json")
    if rank == 0:
        from workbench.checkpoints import cleanup_partial

        for root in (args.job_dir / "checkpoints", args.job_dir / "sampler"):
            cleanup_partial(root)
    log.info("job %s: rank %d/%d loading %s (lora_rank=%d)", job.job_id, rank, dist.get_world_size(),
             job.base_model, job.lora_rank)
    model_dir = models.local_path(job.base_model)   # ModelNotFoundError: the rank fails, so does the job
    engine = ShardedEngine(args.job_dir, job, models.load_model(job.base_model), model_dir,
                           base_loader=lambda: models.load_model(job.base_model),
                           exact_max_datums=int(os.environ.get("WORKBENCH_TRAINER_EXACT_DATUMS")
                                                or DEFAULT_EXACT_MAX_DATUMS))
    if rank == 0:
        from workbench.backend.trainer.__main__ import serve
        from workbench.backend.trainer.server import create_app

        broadcasting = BroadcastingEngine(engine)
        app = create_app(broadcasting, api_key,
                         long_poll_s=float(os.environ.get("WORKBENCH_TRAINER_LONG_POLL_S") or 20.0))
        try:
            serve(app, args.host, args.port_file, job.job_id)
        finally:
            broadcasting.stop()
    else:
        follow(engine)
    dist.destroy_process_group()
    log.info("job %s: rank %d stopped", job.job_id, rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
