"""01_quickstart survives a real kernel restart in the middle (jupyter_client): after the training cell the kernel
restarts, every cell runs again from the top, and the notebook gets back the same trainer job and deployment,
with no extra processes; only its explicit last cell stops the backend and removes its folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from test_notebook_restart import _execute, _json_line

pytestmark = pytest.mark.timeout(900)
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_quickstart.ipynb"

PROBE = """
import json, subprocess
from workbench.backend.home import read_server_info
_info = read_server_info(Path(os.environ["WORKBENCH_HOME"]))
_kids = subprocess.run(["pgrep", "-P", str(_info["pid"])], capture_output=True, text=True).stdout.split()
print(json.dumps({"job_id": run.job_id, "deployments": run.deployment_ids, "server_pid": _info["pid"],
                  "children": sorted(_kids), "step": run.step, "home": os.environ["WORKBENCH_HOME"],
                  "jobs": [j["name"].split("/")[-1] for j in run._http(
                      "GET", "/v1/accounts/workbench/rlorTrainerJobs")["rlorTrainerJobs"]]}))
"""


def code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_quickstart_rerun_after_kernel_restart(tmp_path):
    from jupyter_client.manager import KernelManager

    cells = code_cells()
    steps = int(re.search(r"^STEPS\b.*?=\s*(\d+)", "\n".join(cells), re.MULTILINE).group(1))
    training = next(i for i, c in enumerate(cells) if "monitor.steps(" in c)
    cleanup = len(cells) - 1
    assert "stop_backend=True" in cells[cleanup] and "atexit" not in "".join(cells)
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_HOME", "FIREWORKS_BASE_URL",
                                                             "FIREWORKS_API_KEY")}
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))  # the notebook's folder: tutorial-runs/ is created here
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    home = None
    try:
        for cell in cells[:training + 1]:
            out = _execute(kc, cell, timeout=600)
            assert out["status"] == "ok", (cell, out)
        before = _json_line(_execute(kc, PROBE))
        home = before["home"]
        assert Path(home).is_relative_to(tmp_path / "tutorial-runs" / "01_quickstart")
        assert len(before["children"]) == 2 and before["step"] == steps

        km.restart_kernel(now=True)  # nothing registered in the kernel stops the backend on a restart
        kc.wait_for_ready(timeout=60)
        for cell in cells[:cleanup]:
            out = _execute(kc, cell, timeout=600)
            assert out["status"] == "ok", (cell, out)
        after = _json_line(_execute(kc, PROBE))
        assert after["job_id"] == before["job_id"] and after["deployments"] == before["deployments"]
        assert after["server_pid"] == before["server_pid"] and after["children"] == before["children"]
        assert after["jobs"] == before["jobs"] == [before["job_id"]]
        assert after["step"] == steps  # the training cell continued where it was: nothing left to do

        out = _execute(kc, cells[cleanup], timeout=300)
        assert out["status"] == "ok" and "cleaned up" in out["stdout"], out
        assert not (tmp_path / "tutorial-runs" / "01_quickstart").exists()
        assert not os.path.exists(f"/proc/{before['server_pid']}") or \
            open(f"/proc/{before['server_pid']}/stat").read().split(")")[-1].split()[0] == "Z"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        if home and Path(home).exists():  # a failed assertion above: do not leave the backend running
            subprocess.run([os.sys.executable, "-m", "workbench.cli", "stop", "--home", home],
                           capture_output=True, timeout=120)
