"""Torch thread count of a deployment replica's threads.

    set_torch_threads()     # first thing in every thread that runs torch work (engine, loads)
"""

from __future__ import annotations

import os


def set_torch_threads() -> None:
    """One intra-op thread by default (WORKBENCH_DEPLOYMENT_THREADS): the replica shares two cores with its
    own event loop, the trainer and the notebook, and OpenMP workers spin-waiting on busy cores made a
    batch-16 linear 7x slower than single-threaded here (measured; see bench/sampling.py). OpenMP's
    thread count is per OS thread, so every thread that runs torch work calls this."""
    import torch
    n = int(os.environ.get("WORKBENCH_DEPLOYMENT_THREADS", "1"))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
