"""Lifetime of a trainer process: one owner per job directory, prompt stops, death with its parent,
and a full disk that fails one save without wedging the trainer (issue 13.1 and 13.7).

Real processes, spawned as the control plane spawns them; the deadlines are generous (a loaded
machine), and the measured stop times are printed for the record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fireworks.training.sdk import AdamParams, Datum, FiretitanServiceClient, ModelInput
from fireworks.training.sdk._core._exceptions import RequestFailedError
from workbench.models import DEFAULT_MODEL

from conftest import wait_for

KEY = "wb-test-key-lifetime"


def _job(home: Path, job_id: str) -> Path:
    job_dir = home / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({
        "job_id": job_id, "account": "t", "base_model": DEFAULT_MODEL, "lora_rank": 0,
        "learning_rate": 1e-4, "max_context_length": 64, "home": str(home)}))
    return job_dir


def _cmd(job_dir: Path) -> list[str]:
    return [sys.executable, "-m", "workbench.backend.trainer", "--job-dir", str(job_dir),
            "--port-file", str(job_dir / "port")]


def _env(**extra) -> dict:
    return {**os.environ, "WORKBENCH_API_KEY": KEY, "WORKBENCH_TRAINER_THREADS": "1", **extra}


def _start(job_dir: Path, log: Path, **env) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(job_dir), stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env(**env))
    wait_for(lambda: (job_dir / "port").exists() or proc.poll() is not None, 180, "the trainer to serve")
    assert proc.poll() is None, log.read_text()
    return proc


def _url(job_dir: Path) -> str:
    return f"http://127.0.0.1:{int((job_dir / 'port').read_text())}"


def test_one_live_trainer_per_job_dir_and_a_prompt_sigterm(tmp_path):
    job_dir = _job(tmp_path, "lock-job")
    first = _start(job_dir, tmp_path / "first.log")
    try:
        second = subprocess.run(_cmd(job_dir), env=_env(WORKBENCH_TRAINER_LOCK_WAIT_S="0.5"),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 4, second.stderr
        assert f"owned by another live trainer (pid {first.pid})" in second.stderr
        start = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        elapsed = time.monotonic() - start
        print(f"idle trainer stopped {elapsed:.2f}s after SIGTERM")
        assert elapsed < 10, elapsed       # ~0.3-1 s measured; generous for a loaded machine
    finally:
        if first.poll() is None:
            first.kill()
    # The lock died with its owner: a new trainer starts on the same directory at once.
    (job_dir / "port").unlink()
    again = _start(job_dir, tmp_path / "again.log", WORKBENCH_TRAINER_LOCK_WAIT_S="0")
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0


def test_trainer_exits_when_its_parent_dies(tmp_path):
    job_dir = _job(tmp_path, "orphan-job")
    pid_file = tmp_path / "trainer.pid"
    # A parent that starts the trainer (without PR_SET_PDEATHSIG, so the trainer's own watchdog is what
    # is tested), records its pid and then waits forever; it gets SIGKILLed.
    parent_code = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen({_cmd(job_dir)!r}, stdout=open({str(tmp_path / 'orphan.log')!r}, 'wb'),
                             stderr=subprocess.STDOUT)
        open({str(pid_file)!r}, 'w').write(str(p.pid))
        time.sleep(3600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=_env())
    try:
        wait_for(lambda: (job_dir / "port").exists(), 180, "the trainer to serve")
        trainer_pid = int(pid_file.read_text())
        parent.kill()
        parent.wait(timeout=30)
        start = time.monotonic()

        def gone() -> bool:
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                return True
            # A zombie (exited, not yet reaped by init) counts as gone.
            try:
                return Path(f"/proc/{trainer_pid}/stat").read_text().split()[2] == "Z"
            except OSError:
                return True
        wait_for(gone, 60, "the orphaned trainer to exit")
        print(f"orphaned trainer exited {time.monotonic() - start:.2f}s after its parent died")
        assert "parent process" in (tmp_path / "orphan.log").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root; skipped elsewhere — test_trainer_server covers the same rule)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_fails_one_save_and_the_trainer_keeps_serving(tmp_path, small_disk):
    job_dir = _job(small_disk, "disk-job")
    filler = small_disk / "filler"
    proc = _start(job_dir, tmp_path / "disk.log")     # the log lives off the small disk
    service = FiretitanServiceClient(base_url=_url(job_dir), api_key=KEY)
    try:
        tc = service.create_training_client(base_model=DEFAULT_MODEL, lora_rank=0)
        data = [Datum(model_input=ModelInput.from_ints([1, 17, 33, 45]), loss_fn_inputs={"target_tokens": [17, 33, 45, 2]})]
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(AdamParams(learning_rate=1e-3)).result()
        # Leave ~1 MiB free: a train state of this model (weights + Adam moments) needs ~13 MB.
        free = shutil.disk_usage(small_disk).free
        with open(filler, "wb") as f:
            f.write(b"\0" * (free - (1 << 20)))
        with pytest.raises(RequestFailedError) as info:
            tc.save_state("full").result(timeout=300)
        # torch reports a short write ("unexpected pos ..."); the trainer adds what and how much space.
        assert "train state 'full' was not written" in str(info.value) and "MiB free" in str(info.value)
        assert not (job_dir / "checkpoints" / "full").exists()
        # Still serving: training goes on, and once space is freed the same save succeeds.
        tc.forward_backward(data, "cross_entropy").result(timeout=300)
        tc.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=300)
        filler.unlink()
        tc.save_state("full").result(timeout=300)
        assert (job_dir / "checkpoints" / "full" / "workbench_checkpoint.json").exists()
        assert [p.name for p in (job_dir / "checkpoints").iterdir()] == ["full"]   # no staging leftovers
    finally:
        service.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
