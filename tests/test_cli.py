"""`workbench serve --detach | status | stop` as a user runs them, and what they leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from conftest import TINY, pid_alive, wait_for


def wb(*args, home, check=True):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=120, check=check,
                          env=dict(os.environ, WORKBENCH_HOME=str(home)))


def wait_for_state(base_url: str, key: str, job_id: str, state: str, deadline_s: float = 600.0) -> dict:
    """The job once it reaches `state` (or whatever it is at the deadline): a loaded machine starts trainers slowly."""
    deadline = time.monotonic() + deadline_s
    while True:
        job = httpx.get(f"{base_url}/v1/accounts/workbench/rlorTrainerJobs/{job_id}",
                        headers={"X-Api-Key": key}, timeout=60).json()
        if job["state"] == state or job["state"] == "JOB_STATE_FAILED" or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_detach_status_stop_stops_every_process(tmp_path):
    home = tmp_path / "home"
    out = wb("serve", "--detach", home=home).stdout
    info = json.loads((home / "server.json").read_text())
    assert info["base_url"] in out and info["base_url"].startswith("http://127.0.0.1:")
    assert oct(os.stat(home / "api_key").st_mode & 0o777) == "0o600"
    key = (home / "api_key").read_text().strip()
    # A second --detach attaches to the running server instead of starting another.
    assert json.loads((home / "server.json").read_text())["pid"] == info["pid"]
    wb("serve", "--detach", home=home)
    assert json.loads((home / "server.json").read_text())["pid"] == info["pid"]

    r = httpx.post(f"{info['base_url']}/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=cli-job",
                   headers={"X-Api-Key": key}, json={"trainingConfig": {"baseModel": TINY}}, timeout=30)
    assert r.status_code == 200
    job = wait_for_state(info["base_url"], key, "cli-job", "JOB_STATE_RUNNING")
    assert job["state"] == "JOB_STATE_RUNNING"
    status = wb("status", home=home).stdout
    assert "cli-job" in status and "JOB_STATE_RUNNING" in status
    children = subprocess.run(["pgrep", "-P", str(info["pid"])], capture_output=True, text=True).stdout.split()
    assert children, "the trainer should be a child of the control plane"

    assert "stopped" in wb("stop", home=home).stdout
    for pid in [info["pid"], *map(int, children)]:
        wait_for(lambda: not pid_alive(pid), 120, f"process {pid} to exit after `workbench stop`")
    assert not (home / "server.json").exists()
    assert wb("status", home=home, check=False).returncode == 1

    # Restarting the backend keeps the job, paused until resumed (its process did not survive).
    wb("serve", "--detach", home=home)
    info = json.loads((home / "server.json").read_text())
    job = httpx.get(f"{info['base_url']}/v1/accounts/workbench/rlorTrainerJobs/cli-job",
                    headers={"X-Api-Key": key}, timeout=60).json()
    assert job["state"] == "JOB_STATE_PAUSED"
    wb("stop", home=home)
