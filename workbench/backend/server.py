"""Running the control plane: in the foreground, detached, and stopping it.

    serve_foreground(home, host="127.0.0.1", port=0)   # blocks; what `workbench serve` does
    info = start_detached(home)                          # returns once the server answers; `serve --detach`
    stop(home)                                           # stops it and every process it started

The server writes `server.json` only once it accepts connections, so anyone who finds the file can
connect at once. `server.json` and `api_key` are how clients (the notebook layer, recipes, the CLI)
find a running backend.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from workbench.checkpoints.layout import HomeLayout

from .home import ensure_api_key, pid_alive, read_server_info, server_file, write_json_atomic


def serve_foreground(home: Path, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
    import uvicorn

    from .coalesce import CoalescingHttpToolsProtocol
    from .control_plane.app import create_app

    # One home, however it was given (--home, $WORKBENCH_HOME or the default): everything in this process
    # that resolves the home itself (the model catalog `models.json`, the promoted-model registry) and
    # every process it starts must see the same one.
    os.environ["WORKBENCH_HOME"] = str(home)
    info = read_server_info(home)
    if info and pid_alive(info.get("pid")) and info.get("pid") != os.getpid() and _healthy(info, home):
        raise SystemExit(f"a workbench backend already runs for {home} at {info['base_url']} (pid {info['pid']}); "
                         "use `workbench stop` first")
    api_key = ensure_api_key(home)
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it
    # every keep-alive response waits ~40 ms for the client\'s delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    base_url = f"http://{url_host}:{bound_port}"

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            write_json_atomic(server_file(home), {"base_url": base_url, "pid": os.getpid(), "host": host,
                                                  "port": bound_port, "home": str(home), "started_at": time.time()},
                              mode=0o600)
            print(f"workbench backend serving at {base_url} (home {home})", flush=True)

    # One segment per answer (coalesce.py); the event loop is uvloop ("auto": uvloop is a dependency).
    config = uvicorn.Config(create_app(home, api_key), log_level=log_level, timeout_keep_alive=75,
                            lifespan="on", access_log=False, http=CoalescingHttpToolsProtocol)
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        info = read_server_info(home)
        if info and info.get("pid") == os.getpid():
            server_file(home).unlink(missing_ok=True)


def _healthy(info: dict, home: Path) -> bool:
    key = ensure_api_key(home)
    try:
        return httpx.get(f"{info['base_url']}/healthz", headers={"X-Api-Key": key}, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def running_server(home: Path) -> dict | None:
    """The server.json of a live, answering backend for `home`, else None."""
    info = read_server_info(home)
    if info and pid_alive(info.get("pid")) and _healthy(info, home):
        return info
    return None


def start_detached(home: Path, host: str = "127.0.0.1", port: int = 0, timeout: float = 90.0) -> dict:
    info = running_server(home)
    if info:
        return info
    ensure_api_key(home)
    log_path = HomeLayout(home).control_plane_log
    log_path.parent.mkdir(exist_ok=True)
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "serve", "--home", str(home), "--host", host, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, WORKBENCH_HOME=str(home)))
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = read_server_info(home)
        if info and info.get("pid") == proc.pid and _healthy(info, home):
            return info
        if proc.poll() is not None:
            # Lost a race with another starter? Then use theirs.
            info = running_server(home)
            if info:
                return info
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError("workbench serve exited before it was ready:\n" + "\n".join(tail))
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError(f"workbench serve did not become ready in {timeout:.0f}s (see {home / 'logs'})")


def stop(home: Path, timeout: float = 30.0) -> bool:
    """Stop the backend of `home` (it stops its trainers and deployments). False if none ran."""
    info = read_server_info(home)
    if not info or not pid_alive(info.get("pid")):
        server_file(home).unlink(missing_ok=True)
        return False
    pid = info["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    server_file(home).unlink(missing_ok=True)
    return True
