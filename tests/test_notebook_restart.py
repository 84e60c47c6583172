"""Reconnecting after a REAL kernel restart (jupyter_client): the same cell run again gives back the same
trainer job and deployment, no extra processes, the history, the trainer's weights, and a delta chain that
restarts with a full base load. Also: interrupting the cell while it waits leaves nothing duplicated.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import TINY

pytestmark = pytest.mark.timeout(600)
DEP = "restart-serving"

IMPORTS = """
import json
import workbench as wb
from fireworks.training.sdk import AdamParams, DeploymentManager, FiretitanServiceClient, TrainerJobManager
from workbench.notebook.data import COLORS, eval_items, sft_datums
"""

SETUP = IMPORTS + """
run = wb.open({run_dir!r})
trainer = run.trainer(base_model={model!r}, lora_rank=0, learning_rate=1e-3)
deployment = run.deployment({dep!r})
client = trainer.client
data = sft_datums(run.tokenizer, COLORS[:4])
adam = AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
items = eval_items(COLORS[:4])
print(json.dumps({{"job_id": trainer.job_id, "created": trainer.created, "deployment": deployment.deployment_id,
                  "deployment_created": deployment.created, "step": run.step}}))
"""

TRAIN = """
for step in run.monitor().steps({last}):
    fb = client.forward_backward(data, "cross_entropy").result()
    client.optim_step(adam).result()
    run.log(step, loss=fb.metrics["loss:sum"], data_consumed=step * len(data))
snap = run.sync({name!r})
res = run.evaluate(items, wb.exact_match("answer"), name="colors", max_tokens=6)
rows = {{r["checkpoint_id"]: r for r in run.checkpoint_rows()}}
print(json.dumps({{"snapshot": snap, "type": rows[snap]["type"], "held": deployment.current_snapshot(),
                  "eval_snapshot": res.snapshot, "step": run.step,
                  "probe": client.forward(data, "cross_entropy").result().metrics["loss:sum"]}}))
"""

SPY = """
sent = []
_hotload = run.deployment_manager.hotload
def _spy(*args, **kwargs):
    sent.append([kwargs.get("snapshot_identity"), kwargs.get("incremental_snapshot_metadata")])
    return _hotload(*args, **kwargs)
run.deployment_manager.hotload = _spy
"""

HISTORY = """
print(json.dumps({"steps": run.store.metric_series("loss")[0], "evals": len(run.store.evaluations()),
                  "hotloads": list(run.store.hotloads()["checkpoint_type"]), "step": run.step,
                  "probe": client.forward(data, "cross_entropy").result().metrics["loss:sum"]}))
"""


def _execute(kc, code: str, timeout: float = 240, interrupt_on_display: str | None = None, km=None) -> dict:
    """Run a cell; return {"status", "stdout", "ename", "evalue", "displays"}. With `interrupt_on_display`,
    interrupt the kernel (the stop button) once a display containing that text appears."""
    out = {"stdout": "", "ename": None, "evalue": None, "displays": []}
    msg_id = kc.execute(code)
    deadline = time.time() + timeout
    while True:
        if time.time() > deadline:
            raise TimeoutError(f"cell did not finish in {timeout}s:\n{code}\n{out}")
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except Exception:  # queue.Empty
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            out["stdout"] += content["text"]
        elif kind in ("display_data", "update_display_data", "execute_result"):
            text = content["data"].get("text/plain", "")
            out["displays"].append(text)
            if interrupt_on_display and interrupt_on_display in text:
                km.interrupt_kernel()
                interrupt_on_display = None
        elif kind == "error":
            out["ename"], out["evalue"] = content["ename"], content["evalue"]
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:   # this cell's reply: an interrupted cell's late reply may still be queued before it
        reply = kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    out["status"] = reply["content"]["status"]
    return out


def _json_line(out: dict) -> dict:
    assert out["status"] == "ok", out
    return json.loads([line for line in out["stdout"].splitlines() if line.startswith("{")][-1])


def _listing(backend) -> tuple[list[str], list[str]]:
    jobs = backend.get("/v1/accounts/workbench/rlorTrainerJobs").json()["rlorTrainerJobs"]
    deps = backend.get("/v1/accounts/workbench/deployments").json()["deployments"]
    return [j["name"].split("/")[-1] for j in jobs], [d["name"].split("/")[-1] for d in deps]


@pytest.fixture()
def kernel(backend):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**__import__("os").environ, "WORKBENCH_HOME": str(backend.home)})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_same_cell_after_kernel_restart_reconnects(backend, kernel, tmp_path):
    km, kc = kernel
    setup = SETUP.format(run_dir=str(tmp_path / "run"), model=TINY, dep=DEP)

    # 1. interrupted while waiting for the trainer and deployment: rerunning the cell creates nothing twice
    assert _execute(kc, IMPORTS)["status"] == "ok"
    first = _execute(kc, setup, interrupt_on_display="… trainer", km=km)
    assert first["ename"] == "KeyboardInterrupt", first
    assert "interrupted" in first["displays"][-1]  # the progress lines say so
    before = _json_line(_execute(kc, setup))
    assert _listing(backend) == ([before["job_id"]], [DEP])

    trained = _json_line(_execute(kc, TRAIN.format(last=4, name="before-restart")))
    assert trained["type"] == "base" and trained["held"] == trained["snapshot"] == trained["eval_snapshot"]
    processes = sorted(backend.children())
    assert len(processes) == 2  # one trainer, one deployment

    # 2. a real kernel restart, then the very same cell
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=60)
    after = _json_line(_execute(kc, setup))
    assert after["job_id"] == before["job_id"] and after["created"] is False
    assert after["deployment"] == DEP and after["deployment_created"] is False
    assert after["step"] == 4
    assert _listing(backend) == ([before["job_id"]], [DEP])
    assert sorted(backend.children()) == processes  # the same trainer and deployment processes, nothing new

    history = _json_line(_execute(kc, HISTORY))
    assert history["steps"] == [1, 2, 3, 4] and history["evals"] == 1 and history["hotloads"] == ["base"]
    assert history["probe"] == pytest.approx(trained["probe"], rel=1e-5)  # the trainer kept its weights

    # 3. the delta chain: a new session's first sync is a full base load, the next one a delta on top of it.
    # Record what the SDK's WeightSyncer actually sends to the deployment (DeploymentManager.hotload).
    spy = _execute(kc, SPY)
    assert spy["status"] == "ok", spy
    resumed = _json_line(_execute(kc, TRAIN.format(last=5, name="after-restart")))
    assert resumed["type"] == "base" and resumed["held"] == resumed["snapshot"] == resumed["eval_snapshot"]
    assert resumed["snapshot"].startswith("after-restart-") and resumed["step"] == 5
    delta = _json_line(_execute(kc, TRAIN.format(last=6, name="delta-after-restart")))
    assert delta["type"] == "delta" and delta["held"] == delta["snapshot"] == delta["eval_snapshot"]
    sent = _json_line(_execute(kc, "print(json.dumps({'sent': sent}))"))["sent"]
    assert sent[0] == [resumed["snapshot"], None]  # the first load after the restart is a full one
    assert sent[1] == [delta["snapshot"], {"previous_snapshot_identity": resumed["snapshot"],
                                           "compression_format": "arc_v2", "checksum_format": "alder32"}]
    final = _json_line(_execute(kc, HISTORY))
    assert final["steps"] == [1, 2, 3, 4, 5, 6] and final["evals"] == 3
    assert final["hotloads"] == ["base", "base", "delta"]
    assert _listing(backend) == ([before["job_id"]], [DEP])
    assert sorted(backend.children()) == processes


def test_reopen_resumes_a_stopped_trainer(backend, tmp_path, capsys):
    """The trainer process died (FAILED): opening the run again resumes the same job (reconnect_and_wait)."""
    import os
    import signal
    import subprocess

    import workbench as wb

    run = wb.open(tmp_path / "run2", home=backend.home)
    trainer = run.trainer(base_model=TINY, wait=True)
    run.log(1, loss=1.0)
    job_id = trainer.job_id
    pids = subprocess.run(["pgrep", "-f", f"workbench.backend.trainer --job-dir {backend.home}/jobs/{job_id}"],
                          capture_output=True, text=True).stdout.split()
    assert pids
    os.kill(int(pids[0]), signal.SIGKILL)
    deadline = time.time() + 30
    while run.trainer_manager.get(job_id)["state"] != "JOB_STATE_FAILED" and time.time() < deadline:
        time.sleep(0.2)
    assert run.trainer_manager.get(job_id)["state"] == "JOB_STATE_FAILED"
    run.close()

    run = wb.open(tmp_path / "run2")            # the recorded backend, no home= needed
    trainer = run.trainer(base_model=TINY, wait=True)
    assert trainer.job_id == job_id and not trainer.created and trainer.resumed_from == "JOB_STATE_FAILED"
    assert run.trainer_manager.get(job_id)["state"] == "JOB_STATE_RUNNING"
    assert "has been resumed" in capsys.readouterr().out
    from workbench.notebook.data import COLORS, sft_datums

    fwd = trainer.client.forward(sft_datums(run.tokenizer, COLORS[:2]), "cross_entropy").result()
    assert fwd.metrics["loss:sum"] > 0  # the resumed trainer trains again
    jobs, _ = _listing(backend)
    assert jobs.count(job_id) == 1
    assert list(run.store.events()["kind"]).count("trainer_resumed") == 1
    run.close()
