"""The SFT recipe end to end on a real backend: learning, kill -9 and resume bit for bit, promotion,
init_from_checkpoint, and the promote tool.

The recipes find the backend through FIREWORKS_BASE_URL / FIREWORKS_API_KEY (workbench.connect), set
here to a `workbench serve` in a temporary home that the module stops at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

# 90 training rows (the shipped 100 minus a 10-row held-out carve-out), 16 per step: 6 steps per epoch,
# so 12 steps cross an epoch boundary (reshuffle with seed + 1) and evaluate twice.
SFT = dict(epochs=2, batch_size=16, learning_rate=3e-3, max_steps=12, seed=0)
SAVE_EVERY = 4




def sft_config(log_path, **overrides):
    from workbench.recipes.sft_loop import Config
    from workbench.recipes.utils import WeightSyncConfig

    kw = dict(SFT, weight_sync=WeightSyncConfig(dcp_save_interval=SAVE_EVERY))
    kw.update(overrides)
    return Config(log_path=str(log_path), **kw)


def train_lines(log_path) -> dict[int, dict]:
    from workbench.recipes.utils import read_metrics

    rows = [r for r in read_metrics(log_path) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in rows}


def weights(backend, job_id: str, checkpoint: str, with_optimizer: bool = False):
    from workbench.checkpoints import load_train_state
    from workbench.models import load_model

    model = load_model(TINY)
    opt = torch.optim.AdamW(model.parameters()) if with_optimizer else None
    load_train_state(backend.home / "jobs" / job_id / "checkpoints" / checkpoint, model, opt)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if with_optimizer:
        for i, s in enumerate(opt.state_dict()["state"].values()):
            for k, v in s.items():
                state[f"optim.{i}.{k}"] = torch.as_tensor(v).clone()
        assert any(k.startswith("optim.0.exp_avg") for k in state), "no optimizer state was loaded"
    return state


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def run_a(recipe_backend, tmp_path_factory):
    """The uninterrupted reference run."""
    from workbench.recipes.sft_loop import main

    log_path = tmp_path_factory.mktemp("sft-a")
    return main(sft_config(log_path)), log_path


def test_sft_lowers_held_out_loss(run_a):
    from workbench.recipes.utils import read_metrics

    summary, log_path = run_a
    assert summary["steps"] == 12 and summary["data_consumed"] == 180 and summary["eval_rows"] == 10
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    print(f"\nSFT held-out loss {before:.3f} -> {after:.3f} (ppl {summary['eval_ppl_after']:.2f})")
    assert before > 5.0 and after < 0.5 * before
    evals = [r["step"] for r in read_metrics(log_path) if "eval/loss" in r]
    assert evals == [0, 6, 12]                       # before training and after each epoch
    lines = train_lines(log_path)
    assert sorted(lines) == list(range(1, 13)) and lines[6]["data_consumed"] == 90 and lines[7]["epoch"] == 1
    run = json.loads((log_path / "run.json").read_text())
    assert run["status"] == "completed" and run["trainers"]["policy"] == summary["trainer_job_id"]
    assert summary["final_checkpoint"] == "step-12" and summary["sampler_checkpoint"].startswith("step-12-")


def test_killed_run_resumes_exactly_and_promotes(recipe_backend, run_a, tmp_path):
    from workbench.recipes.sft_loop import main

    summary_a, log_a = run_a
    log_b = tmp_path / "sft-b"
    cfg_kw = dict(SFT, dcp_save_interval=SAVE_EVERY)
    code = ("import json, sys\n"
            "from workbench.recipes.sft_loop import Config, main\n"
            "from workbench.recipes.utils import WeightSyncConfig\n"
            "kw = json.loads(sys.argv[2]); every = kw.pop('dcp_save_interval')\n"
            "main(Config(log_path=sys.argv[1], output_model_id='sft-resumed', "
            "weight_sync=WeightSyncConfig(dcp_save_interval=every), **kw))\n")
    with open(tmp_path / "child.log", "wb") as out:
        child = subprocess.Popen([sys.executable, "-c", code, str(log_b), json.dumps(cfg_kw)], stdout=out,
                                 stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.time() + 240
        try:
            while time.time() < deadline:
                if (log_b / "metrics.jsonl").exists() and max(train_lines(log_b) or [0]) >= 5:
                    break
                if child.poll() is not None:
                    pytest.fail(f"the run ended before it could be killed:\n{(tmp_path / 'child.log').read_text()}")
                time.sleep(0.05)
            else:
                pytest.fail("the run never reached step 5")
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)
    killed_at = max(train_lines(log_b))
    job_b = json.loads((log_b / "run.json").read_text())["trainers"]["policy"]
    assert killed_at < 12, "the run finished before the kill"
    # take the trainer down too: the rerun must resume the stopped job (reconnect_and_wait), not a new one
    os.kill(_trainer_pid(recipe_backend, job_b), signal.SIGKILL)
    mgr = recipe_backend.trainer_manager()
    deadline = time.time() + 60
    while mgr.get(job_b)["state"] != "JOB_STATE_FAILED" and time.time() < deadline:
        time.sleep(0.2)
    assert mgr.get(job_b)["state"] == "JOB_STATE_FAILED"

    summary = main(sft_config(log_b, output_model_id="sft-resumed"))
    resumed = int(summary["resumed_from"].split("-")[1])
    print(f"\nkilled (recipe and trainer) after step {killed_at}; resumed from step-{resumed} on the same trainer "
          f"{job_b}")
    assert summary["resume_source"] == "resume" and summary["trainer_job_id"] == job_b
    assert resumed % SAVE_EVERY == 0 and killed_at - SAVE_EVERY <= resumed <= killed_at and resumed >= SAVE_EVERY
    assert summary["start_step"] == resumed and summary["steps"] == 12

    # every step logged once, with the uninterrupted run's data cursor and bit-identical losses
    a, b = train_lines(log_a), train_lines(log_b)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step]["data_consumed"] == a[step]["data_consumed"], step
        assert b[step]["train/loss"] == a[step]["train/loss"], (step, b[step]["train/loss"], a[step]["train/loss"])
    cursors = json.loads((log_b / "dataloader.json").read_text())
    assert cursors == {f"step-{s}": a[s]["data_consumed"] for s in (4, 8, 12)}

    # final weights AND optimizer state equal those of the uninterrupted run, bit for bit
    assert_same(weights(recipe_backend, summary_a["trainer_job_id"], "step-12", with_optimizer=True),
                weights(recipe_backend, job_b, "step-12", with_optimizer=True))

    # promoted at the end, from this run's final sampler snapshot
    model = summary["model"]
    assert model["name"] == "accounts/workbench/models/sft-resumed" and model["state"] == "READY"
    assert model["sourceCheckpoint"].endswith(f"/rlorTrainerJobs/{job_b}/checkpoints/{summary['sampler_checkpoint']}")
    assert recipe_backend.get("/v1/accounts/workbench/models/sft-resumed").json()["kind"] == "HF_BASE_MODEL"

    again = main(sft_config(log_b, output_model_id="sft-resumed"))       # a completed run is not redone
    assert again["already_completed"] and again["model"]["name"] == model["name"]


def test_init_from_checkpoint_starts_at_step_zero_with_the_other_jobs_state(recipe_backend, run_a, tmp_path):
    from workbench.recipes.sft_loop import main

    summary_a, log_a = run_a
    job_a = summary_a["trainer_job_id"]
    summary = main(sft_config(tmp_path / "sft-c", init_from_checkpoint=f"{job_a}:step-8", max_steps=0))
    assert summary["resume_source"] == "init_from_checkpoint" and summary["resumed_from"] == "step-8"
    assert (summary["start_step"], summary["steps"], summary["data_consumed"]) == (0, 0, 0)
    assert summary["trainer_job_id"] != job_a and summary["final_checkpoint"] == "step-0"
    assert_same(weights(recipe_backend, job_a, "step-8", with_optimizer=True),
                weights(recipe_backend, summary["trainer_job_id"], "step-0", with_optimizer=True))
    # and it trains on from there: its first step sees the first batch of the data, step counter at 1
    more = main(sft_config(tmp_path / "sft-d", init_from_checkpoint=f"{job_a}:step-8", max_steps=1))
    line = train_lines(tmp_path / "sft-d")[1]
    assert more["steps"] == 1 and line["data_consumed"] == 16
    assert line["train/loss"] < 0.5 * train_lines(log_a)[1]["train/loss"]   # it starts from trained weights


def test_promote_tool_and_cli(recipe_backend, run_a):
    from workbench.recipes.promote import PromoteError, promote_from_job

    summary_a, _ = run_a
    job_a = summary_a["trainer_job_id"]
    model = promote_from_job(job_a, "sft-a-step-12", TINY, "step-12")      # logical name, no session suffix
    assert model["sourceCheckpoint"].endswith(summary_a["sampler_checkpoint"]) and model["state"] == "READY"
    with pytest.raises(PromoteError, match="not promotable"):
        promote_from_job(job_a, "sft-a-step-4", TINY, "step-4")            # a DCP-only checkpoint
    env = dict(os.environ)
    ok = subprocess.run([sys.executable, "-m", "workbench.recipes.promote", "--job-id", job_a, "--output-model-id",
                         "sft-a-cli", "--base-model", TINY], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "accounts/workbench/models/sft-a-cli"
    bad = subprocess.run([sys.executable, "-m", "workbench.recipes.promote", "--job-id", job_a, "--output-model-id",
                          "Bad_Id", "--base-model", TINY], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "lowercase" in bad.stderr
    assert not Path(recipe_backend.home / "models" / "workbench" / "Bad_Id").exists()


def _trainer_pid(backend, job_id: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"workbench.backend.trainer --job-dir {backend.home}/jobs/{job_id}"],
                         capture_output=True, text=True).stdout.split()
    assert out, "trainer process not found"
    return int(out[0])
