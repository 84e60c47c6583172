"""Child-process lifetime: children die with their parent, stops are prompt, a job directory has one owner.

Driven with small stand-in child programs (the supervisor's contract is about processes, not about what
they compute); the end-to-end version with a real control plane and trainer is in test_control_plane.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from workbench.backend.control_plane.core import evict_stale_owner
from workbench.backend.supervisor import Supervisor
from workbench.checkpoints.layout import JobLayout, job_lock_owner

from conftest import pid_alive, wait_for


# A child that serves nothing: writes its port file (so it is "ready"), then idles; SIGTERM exits at once.
IDLE_CHILD = ("import sys, time, signal; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
              "open(sys.argv[-1], 'w').write('1'); time.sleep(3600)")
STUBBORN_CHILD = ("import sys, time, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "open(sys.argv[-1], 'w').write('1'); time.sleep(3600)")


def test_stop_of_an_idle_child_is_prompt(tmp_path):
    sup = Supervisor(tmp_path, "k")
    try:
        child = sup.start("trainer", "j1", ["-c", IDLE_CHILD], tmp_path / "j1")
        child.wait_ready(120)
        t0 = time.monotonic()
        sup.stop("trainer", "j1")
        elapsed = time.monotonic() - t0
        assert not pid_alive(child.pid)
        assert elapsed < 2.0, f"stop of an idle child took {elapsed:.2f}s"
        assert child.popen.returncode == 0  # exited on SIGTERM, not killed
    finally:
        sup.stop_all()


def test_stop_falls_back_to_sigkill(tmp_path):
    sup = Supervisor(tmp_path, "k")
    try:
        child = sup.start("trainer", "j2", ["-c", STUBBORN_CHILD], tmp_path / "j2")
        child.wait_ready(120)
        sup.stop("trainer", "j2", timeout=0.5)
        assert not pid_alive(child.pid)
        assert child.popen.returncode == -signal.SIGKILL
    finally:
        sup.stop_all()


def test_children_die_with_a_killed_parent(tmp_path):
    """SIGKILL of the supervising process (as of a crashed `workbench serve`) takes its children with it."""
    code = (
        "import sys, time, threading; from pathlib import Path; from workbench.backend.supervisor import Supervisor\n"
        f"home = Path({str(tmp_path)!r}); sup = Supervisor(home, 'k')\n"
        # started from a short-lived thread: the death signal must still follow the process, not this thread
        "box = {}\n"
        f"t = threading.Thread(target=lambda: box.update(c=sup.start('trainer', 'j', ['-c', {STUBBORN_CHILD!r}], home / 'j')))\n"
        "t.start(); t.join(); box['c'].wait_ready(120)\n"
        "print(box['c'].pid, flush=True); time.sleep(3600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert pid_alive(child_pid), "the child died with the (joined) thread that started it"
        t0 = time.monotonic()
        parent.kill()
        parent.wait()
        wait_for(lambda: not pid_alive(child_pid), 60, "the child to die with its killed parent")
        assert time.monotonic() - t0 < 10
    finally:
        parent.kill()


OWNER = ("import sys, time, signal; from pathlib import Path; "
         "from workbench.checkpoints.layout import JobLayout, hold_job_lock; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "hold_job_lock(JobLayout(Path(sys.argv[2]))); print('held', flush=True); time.sleep(float(sys.argv[3]))")


def _owner(job: JobLayout, hold_s: float, argv0: str = "workbench.backend.trainer") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", OWNER, argv0, str(job.root), str(hold_s)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_resume_waits_for_an_exiting_owner(tmp_path):
    job = JobLayout(tmp_path / "jobs" / "j")
    owner = _owner(job, hold_s=1.0)
    try:
        evict_stale_owner(job)
        assert job_lock_owner(job) is None
        wait_for(lambda: owner.poll() is not None, 30, "the stale owner to exit")
        assert owner.returncode == 0  # it exited on its own: it was waited for, not killed
    finally:
        owner.kill()


def test_resume_kills_a_stale_trainer_that_does_not_exit(tmp_path, monkeypatch):
    from workbench.backend.control_plane import core

    monkeypatch.setattr(core, "STALE_OWNER_WAIT_S", 0.5)
    job = JobLayout(tmp_path / "jobs" / "j")
    owner = _owner(job, hold_s=3600)
    try:
        evict_stale_owner(job)
        assert job_lock_owner(job) is None
        owner.wait(30)
        assert owner.returncode == -signal.SIGKILL
    finally:
        owner.kill()


def test_resume_never_kills_a_process_that_is_not_a_trainer(tmp_path, monkeypatch):
    from workbench.backend.control_plane import core

    monkeypatch.setattr(core, "STALE_OWNER_WAIT_S", 0.3)
    job = JobLayout(tmp_path / "jobs" / "j")
    owner = _owner(job, hold_s=3600, argv0="something-else")
    try:
        with pytest.raises(RuntimeError, match="still owned"):
            evict_stale_owner(job)
        assert owner.poll() is None
    finally:
        owner.kill()
        owner.wait()



def test_a_starting_backend_restarts_only_the_deployments_that_were_serving(tmp_path):
    """`serve` brings back the deployments that were serving (or starting) when the backend stopped, and no
    other: not one scaled to zero, FAILED or deleted. A start cut short by the stop is not a failure, so the
    next start brings the same ones back again (run twice)."""
    from conftest import TINY

    from workbench.backend.control_plane.core import ControlPlane
    from workbench.backend.store import Store

    home = tmp_path / "home"
    home.mkdir()
    rows = {"serving": ("READY", 1), "starting": ("CREATING", 1), "scaled-to-zero": ("READY", 0),
            "failed": ("FAILED", 1)}
    store = Store(home / "state.db")
    for dep_id, (state, replicas) in rows.items():
        store.put("deployments", dep_id, {"name": f"accounts/workbench/deployments/{dep_id}", "state": state,
                                          "maxReplicaCount": replicas, "baseModel": TINY})
    store.close()
    (home / "deployments" / "deleted").mkdir(parents=True)   # a deleted deployment's leftovers: no row
    for _ in range(2):
        cp = ControlPlane(home, "k")
        cp.startup()
        try:
            started = sorted(c.key for c in cp.supervisor.children() if c.kind == "deployment")
            assert started == ["serving", "starting"]
        finally:
            cp.shutdown()   # before the replicas are ready
        store = Store(home / "state.db")
        states = {d["name"].split("/")[-1]: d["state"] for d in store.list("deployments")}
        store.close()
        assert states == {dep_id: state for dep_id, (state, _) in rows.items()}
