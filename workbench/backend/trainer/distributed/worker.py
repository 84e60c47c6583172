"""One rank of an N-rank trainer job; started by the elastic agent (launch.py), never by hand.

    python -m workbench.backend.trainer.distributed.worker --job-dir DIR --port-file FILE --host H
    (environment from the agent: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)

Every rank joins the process group (gloo: the engine computes on CPU), loads the base model and builds
a `ShardedTrainer`. Rank 0 then runs the single-process entry point (`__main__.main`: port file once
serving, API key required, job lock) with that backend behind a `BroadcastingEngine` (ranks.py); the
other ranks follow until rank 0 tells them to stop. A rank whose agent
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

    threads = os.environ.get("WORKBENCH_TRAINER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    dist.init_process_group("gloo", timeout=_GROUP_TIMEOUT)
    from .engine import ShardedTrainer
    from .ranks import BroadcastingEngine, follow

    if rank == 0:
        # The single-process entry point, serving a broadcasting sharded backend: same port file,
        # API key check, job lock, staging cleanup and shutdown as a 1-rank trainer.
        from workbench.backend.trainer.__main__ import main as trainer_main

        def backend(*a, **kw):
            return BroadcastingEngine(ShardedTrainer(*a, **kw))

        code = trainer_main(["--job-dir", str(args.job_dir), "--port-file", str(args.port_file), "--host", args.host],
                            backend_factory=backend)
    else:
        from workbench import models
        from workbench.backend.trainer.local_torch import DEFAULT_EXACT_MAX_DATUMS
        from workbench.backend.trainer.protocol import JobConfig

        job = JobConfig.load(args.job_dir / "job.json")
        log.info("job %s: rank %d/%d loading %s", job.job_id, rank, dist.get_world_size(), job.base_model)
        engine = ShardedTrainer(args.job_dir, job, models.load_model(job.base_model), models.local_path(job.base_model),
                                base_loader=lambda: models.load_model(job.base_model),
                                exact_max_datums=int(os.environ.get("WORKBENCH_TRAINER_EXACT_DATUMS")
                                                     or DEFAULT_EXACT_MAX_DATUMS))
        follow(engine)
        code = 0
    log.info("rank %d stopped (exit %d)", rank, code)
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter teardown: the process group's threads could hold it for seconds
