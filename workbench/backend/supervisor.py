"""Starts, watches and stops the trainer and deployment processes of a control plane.

    sup = Supervisor(home, api_key, on_exit=callback)
    proc = sup.start("trainer", job_id, ["-m", "workbench.backend.trainer", ...], run_dir)
    port = proc.wait_ready(timeout=120)     # the child writes its port file once it serves
    sup.stop("trainer", job_id)

Every child binds 127.0.0.1 on a port of its own choosing and writes it to `<run_dir>/port` when it is
ready; the control plane proxies to that port. Children get the API key in their environment and
check it too, so the loopback ports are not an unauthenticated side door.

Children die with the control plane: each runs in its own process group and gets SIGKILL from the
kernel when the control plane dies (PR_SET_PDEATHSIG, set through prctl between fork and exec), so a
crashed or killed `workbench serve` never leaves a trainer running on a job directory that a later
resume will own. The signal follows the *thread* that forked the child, so every child is forked from
one long-lived spawner thread. A normal stop sends SIGTERM to the child's group and waits for the exit
(an idle child exits in well under a second); SIGKILL is only the fallback after `STOP_GRACE_S`.

A watcher thread notices children that exit on their own and calls `on_exit(kind, key, returncode,
log_tail)` so the control plane can mark a job FAILED or restart a deployment replica.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workbench.checkpoints.layout import HomeLayout

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 5.0
"""Seconds a child gets between SIGTERM and SIGKILL (an idle trainer or replica exits well within it)."""
READY_POLL_S = 0.01
"""How often `wait_ready` looks for the port file: each look is one failed open, so polling finely is
free, while every interval is latency a job's create -> RUNNING pays (half of it on average)."""


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec: no locks, no allocation-heavy work
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # not Linux: children then outlive a crashed control plane; `workbench stop` still works
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died before prctl took effect: nobody would ever stop us

    return preexec


@dataclass
class ChildProcess:
    kind: str
    key: str
    popen: subprocess.Popen
    run_dir: Path
    log_path: Path
    started_at: float = field(default_factory=time.time)
    stopping: bool = False

    @property
    def port_file(self) -> Path:
        return self.run_dir / "port"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float) -> int:
        """Block until the child has written its port file; raise if it exits or times out first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            port = self.port()
            if port:
                return port
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.kind} process exited with code {self.popen.returncode} before it was "
                                   f"ready:\n{log_tail(self.log_path)}")
            time.sleep(READY_POLL_S)
        raise TimeoutError(f"{self.kind} process not ready after {timeout:.0f}s:\n{log_tail(self.log_path)}")


def default_trainer_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Supervisor:
    def __init__(self, home: Path, api_key: str,
                 on_exit: Callable[[str, str, int, str], None] | None = None):
        self.home = home
        self.api_key = api_key
        self.on_exit = on_exit
        self._children: dict[tuple[str, str], ChildProcess] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # PR_SET_PDEATHSIG fires when the forking *thread* exits: fork from one thread that lives as long
        # as the supervisor (a ThreadPoolExecutor worker never retires while the executor is open).
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor-spawn")
        self._watcher = threading.Thread(target=self._watch, name="supervisor-watch", daemon=True)
        self._watcher.start()

    def start(self, kind: str, key: str, args: list[str], run_dir: Path, python: str | None = None,
              extra_env: dict | None = None) -> ChildProcess:
        """Start `python <args>` for (kind, key), stopping any previous process of that key first.
        `python`: another interpreter (a vLLM replica runs in vLLM's own environment); `extra_env`
        is added to the child's environment."""
        self.stop(kind, key)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "port").unlink(missing_ok=True)
        log_path = HomeLayout(self.home).log_file(kind, key)
        log_path.parent.mkdir(exist_ok=True)
        env = dict(os.environ, WORKBENCH_API_KEY=self.api_key, WORKBENCH_HOME=str(self.home),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # Every trainer, replica and the notebook kernel share the machine's cores. torch's default
        # (one thread per core in each process) oversubscribes them: measured ~10x slower steps on 2
        # cores. Give each trainer half the cores unless the user chose; replicas default to 1.
        env.setdefault("WORKBENCH_TRAINER_THREADS", str(default_trainer_threads()))
        env.update(extra_env or {})
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # logs may quote requests
        with os.fdopen(fd, "ab") as log:
            now = time.time()   # to the millisecond: bench/cold_start.py times the spawn by it
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} "
                      f"starting {kind} {key}\n".encode())
            log.flush()
            popen = self._spawner.submit(
                subprocess.Popen, [python or sys.executable, *args, "--port-file", str(run_dir / "port")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(run_dir),
                process_group=0, preexec_fn=_die_with_parent(os.getpid())).result()
        child = ChildProcess(kind, key, popen, run_dir, log_path)
        with self._lock:
            self._children[(kind, key)] = child
        return child

    def get(self, kind: str, key: str) -> ChildProcess | None:
        with self._lock:
            child = self._children.get((kind, key))
        if child is not None and child.popen.poll() is not None:
            return None
        return child

    def stop(self, kind: str, key: str, timeout: float = STOP_GRACE_S) -> None:
        with self._lock:
            child = self._children.pop((kind, key), None)
        if child is None:
            return
        child.stopping = True
        _terminate(child.popen, timeout)
        child.port_file.unlink(missing_ok=True)

    def stop_all(self) -> None:
        self._closed.set()
        with self._lock:
            children = list(self._children.values())
            self._children.clear()
        for child in children:  # all at once: the stops overlap instead of adding up
            child.stopping = True
            _signal_group(child.popen, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            _terminate(child.popen, max(0.0, deadline - time.monotonic()))
            child.port_file.unlink(missing_ok=True)
        self._spawner.shutdown(wait=False)

    def children(self) -> list[ChildProcess]:
        with self._lock:
            return list(self._children.values())

    def _watch(self) -> None:
        while not self._closed.wait(0.25):
            with self._lock:
                exited = [(k, c) for k, c in self._children.items() if c.popen.poll() is not None]
                for k, _ in exited:
                    del self._children[k]
            for (kind, key), child in exited:
                child.port_file.unlink(missing_ok=True)
                if not child.stopping and self.on_exit is not None:
                    try:
                        self.on_exit(kind, key, child.popen.returncode, log_tail(child.log_path))
                    except Exception as e:  # the watcher must survive a failing callback
                        print(f"supervisor: on_exit callback failed: {e!r}", file=sys.stderr)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    """Signal the child's process group (it leads one: process_group=0), while the child is unreaped."""
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        popen.send_signal(sig)


def _terminate(popen: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait for the exit (not a fixed sleep), SIGKILL only if it has not exited after `timeout`."""
    _signal_group(popen, signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(popen, signal.SIGKILL)
        popen.wait(10)
