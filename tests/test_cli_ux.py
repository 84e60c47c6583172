"""The CLI as a new user meets it: `ls` / `rm`, one-line errors with exit 1, help on every flag, closed pipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import TINY, wait_for


def wb(*args, home, timeout=180):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, WORKBENCH_HOME=str(home)))


def assert_one_line_error(r, *words):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in ("console", "cookbook", "discord", "Tinker"):
        assert w.lower() not in err.lower(), err
    for w in words:
        assert w in err, err


def test_errors_are_one_line_without_a_backend(tmp_path):
    home = tmp_path / "nohome"
    assert_one_line_error(wb("ls", home=home), "no workbench backend is running")
    assert_one_line_error(wb("rm", "--all", home=home), "no workbench backend is running")
    # an invalid model id is refused before anything is contacted
    r = wb("promote", "--job-id", "j", "--output-model-id", "Bad_Id!", "--base-model", TINY, home=home)
    assert_one_line_error(r)
    # --debug shows the traceback instead
    r = wb("ls", "--debug", home=home)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_every_flag_has_help_text(tmp_path):
    for command in ("serve", "stop", "status", "ls", "rm", "promote", "demo"):
        out = subprocess.run([sys.executable, "-m", "workbench.cli", command, "--help"], capture_output=True,
                             text=True, timeout=60).stdout
        options = out.split("options:")[-1]
        # every option line ("  --flag ...") is followed by text on the same line or the next one
        entries = re.split(r"\n  (?=-)", "\n" + options.strip("\n"))
        for entry in entries:
            entry = entry.strip()
            if not entry.startswith("-"):
                continue
            flag_part, _, rest = entry.partition("  ")
            assert rest.strip() or "\n" in entry, f"{command}: {flag_part!r} has no help text"
        assert "--home" in options and "--debug" in options, command


def test_ls_rm_and_errors_on_a_running_backend(backend):
    home = backend.home
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=ux-job",
                     json={"trainingConfig": {"baseModel": TINY}})
    assert r.status_code == 200, r.text
    r = backend.post("/v1/accounts/workbench/deployments?deploymentId=ux-dep",
                     json={"baseModel": TINY, "minReplicaCount": 0, "maxReplicaCount": 1})
    assert r.status_code == 200, r.text
    out = wb("ls", home=home)
    assert out.returncode == 0, out.stderr
    assert re.search(r"trainer\s+ux-job\s", out.stdout) and re.search(r"deployment\s+ux-dep\s", out.stdout)
    assert "workbench rm" in out.stdout

    # one clear line for the expected failures
    assert_one_line_error(wb("rm", "no-such-thing", home=home), "no trainer job or deployment 'no-such-thing'")
    assert_one_line_error(wb("rm", home=home), "workbench rm ID")
    r = wb("promote", "--job-id", "no-such-job", "--output-model-id", "m1", "--base-model", TINY, home=home)
    assert_one_line_error(r)

    # rm one job: gone from ls, shown as deleted by ls --all, its process stopped
    out = wb("rm", "ux-job", home=home)
    assert out.returncode == 0 and "deleted trainer ux-job" in out.stdout, out.stderr
    listing = wb("ls", home=home).stdout
    assert "ux-job" not in listing and "ux-dep" in listing
    assert re.search(r"ux-job\s+DELETED", wb("ls", "--all", home=home).stdout)
    # rm --all: every live one
    out = wb("rm", "--all", home=home)
    assert out.returncode == 0 and "deleted deployment ux-dep" in out.stdout, out.stderr
    assert "no trainer jobs or deployments" in wb("ls", home=home).stdout
    wait_for(lambda: not backend.children(), what="the job's and deployment's processes to exit")


def test_status_json_into_a_closed_pipe(backend):
    """`workbench status --json | head -c1`: the reader leaves early; no BrokenPipeError, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "workbench.cli", "status", "--json", "--home", str(backend.home)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    p.stdout.close()  # the pipe is closed before the command writes anything
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert "BrokenPipe" not in err and "Traceback" not in err, err
    assert p.returncode == 0


@pytest.mark.parametrize("command", ["ls", "status"])
def test_commands_succeed_in_a_pipe(backend, command):
    r = subprocess.run(f"{sys.executable} -m workbench.cli {command} --home {backend.home} | head -1", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
