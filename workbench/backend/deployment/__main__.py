"""Entry point of a deployment replica process (one OS process per replica).

    WORKBENCH_API_KEY=... python -m workbench.backend.deployment --deployment-dir DIR --port-file FILE [--host 127.0.0.1]

Reads DIR/deployment.json ({"deployment_id", "account", "base_model", "home"}, written by the control
plane), binds HOST on a free port, and writes that port to FILE (temp file + os.replace, so a reader
never sees a partial number) as soon as the HTTP server accepts connections. The base model (and the
snapshot recorded in DIR/state.json, if any) loads in the background meanwhile: /healthz answers at
once, the hot-load GET reports readiness false, and completions answer 425 until the weights are in.

Lifetime: on SIGTERM/SIGINT uvicorn stops accepting, gives requests in flight GRACEFUL_S to finish,
then re-raises the signal, which ends the process at once (nothing waits for a hot load or a
tokenization still running in a worker thread; the OS reclaims everything). The replica also stops by itself when its parent process (the control
plane) dies, however it died: nothing could reach or stop it any more.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from workbench.checkpoints.layout import DeploymentLayout
from workbench.common import atomic_write_text


GRACEFUL_S = 3


def watch_parent(parent_pid: int) -> None:
    """SIGTERM ourselves once the parent is gone (we are re-parented: getppid() changes). Polled,
    not PR_SET_PDEATHSIG: that fires when the parent *thread* that spawned us exits, and the control
    plane starts replicas from worker threads."""
    def run():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        print(f"deployment replica: parent process {parent_pid} is gone; shutting down", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    if parent_pid > 1:
        threading.Thread(target=run, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None, make_replica=None) -> int:
    """`make_replica(deployment_dir, config)` builds the Replica (default: the built-in engine;
    vllm_replica.main passes VllmReplica)."""
    ap = argparse.ArgumentParser(prog="python -m workbench.backend.deployment")
    ap.add_argument("--deployment-dir", required=True, type=Path)
    ap.add_argument("--port-file", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (the default)")
    args = ap.parse_args(argv)
    watch_parent(os.getppid())

    layout = DeploymentLayout(args.deployment_dir.resolve())
    try:
        config = json.loads(layout.config_file.read_text())
        for key in ("deployment_id", "base_model"):
            if not config.get(key):
                raise ValueError(f"deployment.json has no {key!r}")
    except (OSError, ValueError) as e:
        print(f"deployment replica: cannot read {layout.config_file}: {e}", file=sys.stderr)
        return 2
    if config.get("home"):
        os.environ.setdefault("WORKBENCH_HOME", str(config["home"]))

    # The engine thread releases the GIL inside every torch op and must win it back ~100 times per
    # decode step. While a hot load (numpy/torch work in another thread) or the event loop holds it,
    # each hand-back waits up to the switch interval (5 ms by default): a step of 100 ops then
    # stretches by far more than the load itself costs. 0.5 ms bounds that convoy effect.
    sys.setswitchinterval(float(os.environ.get("WORKBENCH_SWITCH_INTERVAL", "0.0005")))

    import uvicorn
    from .builtin import BuiltinReplica
    from .server import create_app

    api_key = os.environ.get("WORKBENCH_API_KEY") or None
    if api_key is None:
        # Never serve unauthenticated, even on loopback: any local user could hot-load or sample.
        print("deployment replica: WORKBENCH_API_KEY is not set; refusing to start unauthenticated", file=sys.stderr)
        return 2
    replica = (make_replica or BuiltinReplica)(layout.root, config)
    app = create_app(replica, api_key)

    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
    # IPPROTO_TCP, and a socket made with proto 0 leaves Nagle on, so every keep-alive response
    # written in two pieces (headers, body) waited ~40 ms for the client's delayed ACK (measured).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    # loop="asyncio", not uvloop: uvloop costs the replica ~1.8 MiB of RSS for ~0.1-0.3 ms per request on
    # loopback, within the noise of a completion (bench/cold_start.py; measured in issue 16's notes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           loop="asyncio", timeout_keep_alive=75,
                                           timeout_graceful_shutdown=GRACEFUL_S))

    def announce():
        # the port file is the control plane's "ready to serve HTTP" signal: write it only once
        # uvicorn really accepts connections
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.01)
        atomic_write_text(args.port_file, f"{port}\n")
        print(f"deployment {config['deployment_id']} serving on {args.host}:{port}", flush=True)

    threading.Thread(target=announce, name="announce", daemon=True).start()
    replica.start()
    try:
        server.run(sockets=[sock])
    finally:
        replica.stop()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # not sys.exit: interpreter shutdown joins the server's worker threads, and a hot load or a long
    # tokenization there would keep a stopped replica alive for its whole duration
    os._exit(code)
