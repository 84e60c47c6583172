"""Starting an N-rank trainer job with torch.distributed's elastic launcher (what `torchrun` runs).

    python -m workbench.backend.trainer --job-dir DIR --port-file FILE          # the control plane's spawn
    python -m workbench.backend.trainer.distributed.launch --job-dir DIR --node-rank 1   # each further node

The control plane writes the topology into `DIR/job.json`: "nodes" (default 1) and "ranks_per_node"
(default 1), plus "master_addr"/"master_port" when nodes > 1. With more than one rank, the trainer
entry point (`__main__.py`) hands over to `launch_if_distributed`, which runs the elastic agent in
that same process: it starts this node's ranks (`worker.py`), watches them, and, because
`max_restarts` is 0, stops every rank as soon as one fails and exits non-zero with the failing rank's
log tail as its last output lines (the control plane then marks the job FAILED with that tail).

Rendezvous. One node: torchrun's `--standalone` (c10d on localhost, an ephemeral port). Several nodes:
the static rendezvous — node 0 hosts the TCPStore at master_addr:master_port, every node passes its
`--node-rank`, and global ranks are `node_rank * ranks_per_node + local_rank`, so rank 0 (the one
serving HTTP and writing the port file) is always on node 0, the node the control plane started. Nodes
must share the job directory's filesystem (checkpoints are sharded files every rank writes).

Each rank's stdout/stderr go to `DIR/ranks/node<R>/.../<local_rank>/std{out,err}.log` and are teed to
the launcher's own log with a `[default<rank>]:` prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("workbench.trainer.launch")

WORKER_MODULE = "workbench.backend.trainer.distributed.worker"
_TAIL_LINES = 12


@dataclass(frozen=True)
class Topology:
    """How many processes a job runs as, read from job.json."""

    nodes: int = 1
    """Machines (elastic agents) the job spans; every node runs `ranks_per_node` ranks."""
    ranks_per_node: int = 1
    """Processes per node (one per accelerator; CPU ranks when there is none)."""
    master_addr: str = "127.0.0.1"
    """Multi-node only: the address of node 0, where the static rendezvous' TCPStore listens."""
    master_port: int = 29500
    """Multi-node only: the TCPStore's port on node 0."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @classmethod
    def load(cls, job_dir: Path) -> "Topology":
        raw = json.loads((Path(job_dir) / "job.json").read_text())
        return cls(nodes=int(raw.get("nodes") or 1), ranks_per_node=int(raw.get("ranks_per_node") or 1),
                   master_addr=str(raw.get("master_addr") or "127.0.0.1"),
                   master_port=int(raw.get("master_port") or 29500))


def trainer_topology(job: dict) -> dict:
    """job.json's topology keys for a trainer-job row (nodeCount x trainingConfig.acceleratorCount).

    Multi-node jobs get a rendezvous address: $WORKBENCH_TRAINER_MASTER_ADDR (this machine's address
    the other nodes can reach; default 127.0.0.1, i.e. "nodes" on this machine) and a free port on it.
    """
    nodes = int(job.get("nodeCount") or 1)
    ranks = int((job.get("trainingConfig") or {}).get("acceleratorCount") or 1)
    out = {"nodes": nodes, "ranks_per_node": ranks}
    if nodes > 1:
        import os
        import socket

        addr = os.environ.get("WORKBENCH_TRAINER_MASTER_ADDR") or "127.0.0.1"
        with socket.socket() as s:   # node 0's agent binds it again moments later (static rendezvous)
            s.bind((addr, 0))
            out.update(master_addr=addr, master_port=s.getsockname()[1])
    return out


def launcher_args(job_dir: Path, port_file: Path, host: str, topo: Topology, node_rank: int) -> list[str]:
    """torchrun's command line for this node (the same arguments `torchrun` would take)."""
    log_dir = Path(job_dir) / "ranks" / f"node{node_rank}"
    args = ["--nnodes", str(topo.nodes), "--nproc-per-node", str(topo.ranks_per_node), "--max-restarts", "0",
            "--monitor-interval", "0.2", "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3"]
    if topo.nodes == 1:
        args += ["--standalone"]
    else:
        args += ["--rdzv-backend", "static", "--node-rank", str(node_rank), "--master-addr", topo.master_addr,
                 "--master-port", str(topo.master_port)]
    return args + ["-m", WORKER_MODULE, "--job-dir", str(job_dir), "--port-file", str(port_file), "--host", host]


def _rank_log_tail(log_dir: Path, local_rank: int) -> str:
    files = sorted(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        return "(no log)"
    lines = files[-1].read_text(errors="replace").splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def launch(job_dir: Path, port_file: Path, host: str, topo: Topology, node_rank: int = 0) -> int:
    """Run this node's ranks to completion under the elastic agent; 0 on a clean stop, 1 if a rank failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = launcher_args(job_dir, port_file, host, topo, node_rank)
    log.info("node %d/%d: starting %d rank(s): torchrun %s", node_rank, topo.nodes, topo.ranks_per_node,
             " ".join(argv))
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        log_dir = Path(job_dir) / "ranks" / f"node{node_rank}"
        for rank, failure in sorted(e.failures.items()):
            # Last in the log, so the control plane's FAILED message (the log's tail) shows it.
            print(f"trainer rank {rank} (node {node_rank}, local rank {failure.local_rank}) failed with exit code "
                  f"{failure.exitcode}; its log ends:\n{_rank_log_tail(log_dir, failure.local_rank)}",
                  file=sys.stderr, flush=True)
        return 1
    except SignalException as e:   # stopped (SIGTERM from the control plane): the agent stopped the ranks
        log.info("node %d: stopped by signal %s", node_rank, e.sigval)
        return 0
    return 0


def launch_if_distributed(job_dir: Path, port_file: Path, host: str) -> int | None:
    """If job.json asks for more than one rank, launch node 0's ranks and return the exit code; else None."""
    topo = Topology.load(job_dir)
    if topo.world_size <= 1:
        return None
    return launch(job_dir, port_file, host, topo, node_rank=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.backend.trainer.distributed.launch",
                                     description="Start the ranks of one further node of an N-node trainer job.")
    parser.add_argument("--job-dir", required=True, type=Path, help="the job directory (shared with node 0)")
    parser.add_argument("--node-rank", required=True, type=int, help="this node's rank, 1..nodes-1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    topo = Topology.load(args.job_dir)
    if not 0 < args.node_rank < topo.nodes:
        parser.error(f"--node-rank must be in 1..{topo.nodes - 1} (node 0 is started by the control plane)")
    # Only global rank 0 (node 0) writes the port file; this path is never written.
    return launch(args.job_dir, args.job_dir / "ranks" / f"node{args.node_rank}.port", "127.0.0.1", topo,
                  node_rank=args.node_rank)


if __name__ == "__main__":
    sys.exit(main())
