"""The recipes learn on the embedded model, on a real backend: GRPO and asynchronous GRPO from an SFT warm
start raise the mean reward, DPO and ORPO raise held-out preference accuracy; async RL and IGPO killed with
SIGKILL (recipe and trainer) and rerun with the same log_path reach the same final weights and optimizer
state, bit for bit, as an uninterrupted run. The printed numbers are what the report quotes.

Not asserted: that IGPO raises the lookup task's reward. From a 40-step SFT warm start, 10 IGPO steps moved
the held-out reward 0.141 -> 0.188 (from 60 SFT steps: 0.219 -> 0.234), within the noise of 64 samples:
the model learns the two-turn protocol but not yet to copy the looked-up color. Measured since: the
64 demonstrations are memorized (held-out copy accuracy stays at chance in-process, 0.17-0.41 over 400
steps); with 4096 distinct demonstrations an in-process SFT (batch 16, lr 6e-3) starts copying abruptly
after ~150 steps (teacher-forced accuracy 0.83 by step 180). Through the recipes, warm starts of 150 and
240 steps on 1024 distinct demonstrations call the tool in 97-99% of trajectories but answer at chance,
and 10 IGPO steps (4 groups x 8) leave the held-out reward there (0.281 -> 0.234, 0.234 -> 0.266; 128
samples). In-process, loss on the answer turn only (`last_assistant_message`) makes copying appear after
~60 steps (accuracy 1.0 by step 90); as a second 50-step SFT stage (lr 6e-3, fresh Adam) through the
recipe it broke the untrained tool-call turn instead (tool calls 0.32, reward 0). A warm start that both
calls and copies still needs several hundred SFT steps, more than this module can spend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_recipes_sft import _trainer_pid, assert_same, weights

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


IGPO_SFT_STEPS = 40


@pytest.fixture(scope="module")
def arithmetic_warm_start(recipe_backend, tmp_path_factory):
    """The 16 additions a, b in 0..3 and a short SFT run on them, shared by the GRPO and async GRPO tests: it
    memorizes them partially (greedy mostly right, sampling at temperature 1 often wrong), which RL sharpens."""
    from workbench.recipes import sft_loop
    from workbench.recipes.utils import data as D

    tmp = tmp_path_factory.mktemp("arith")
    sft_data, rl_data = tmp / "sft.jsonl", tmp / "rl.jsonl"
    D.write_jsonl(sft_data, D.make_arithmetic_sft(max_operand=3))
    D.write_jsonl(rl_data, D.make_arithmetic_rl(max_operand=3))
    sft = sft_loop.main(sft_loop.Config(log_path=str(tmp / "sft"), dataset=str(sft_data),
                                        evaluation_dataset=str(sft_data), epochs=100, batch_size=16, max_steps=45,
                                        learning_rate=6e-3))
    assert sft["eval_loss_after"] < 0.5
    return sft, rl_data


def _steps(log_path) -> dict[int, dict]:
    from workbench.recipes.utils import read_metrics

    rows = [r for r in read_metrics(log_path) if "rollout/reward" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in rows}


def _kill_and_resume(backend, tmp_path, module: str, kw: dict, save_every: int, kill_after: int):
    """Run recipe `module` with `kw` in a child process, SIGKILL it and its trainer once step `kill_after` is
    logged, then rerun it in-process with the same log_path. Returns (summary, killed at step, log_path)."""
    import importlib

    from workbench.recipes.utils import WeightSyncConfig

    recipe = importlib.import_module(f"workbench.recipes.{module}")
    log_b = tmp_path / f"{module}-killed"
    code = ("import json, sys, importlib\n"
            f"m = importlib.import_module('workbench.recipes.{module}')\n"
            "from workbench.recipes.utils import WeightSyncConfig\n"
            "m.main(m.Config(log_path=sys.argv[1], weight_sync=WeightSyncConfig(dcp_save_interval=int(sys.argv[3])),\n"
            "                **json.loads(sys.argv[2])))\n")
    with open(tmp_path / "child.log", "wb") as out:
        child = subprocess.Popen([sys.executable, "-c", code, str(log_b), json.dumps(kw), str(save_every)],
                                 stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.time() + 600
        try:
            while time.time() < deadline:
                if (log_b / "metrics.jsonl").exists() and max(_steps(log_b) or [0]) >= kill_after:
                    break
                if child.poll() is not None:
                    pytest.fail(f"the run ended before it could be killed:\n{(tmp_path / 'child.log').read_text()}")
                time.sleep(0.05)
            else:
                pytest.fail(f"the run never reached step {kill_after}")
        finally:
            child.kill()
            child.wait(30)
    killed_at = max(_steps(log_b))
    job = json.loads((log_b / "run.json").read_text())["trainers"]["policy"]
    os.kill(_trainer_pid(backend, job), signal.SIGKILL)
    mgr = backend.trainer_manager()
    deadline = time.time() + 120
    while mgr.get(job)["state"] != "JOB_STATE_FAILED" and time.time() < deadline:
        time.sleep(0.2)
    summary = recipe.main(recipe.Config(log_path=str(log_b), weight_sync=WeightSyncConfig(dcp_save_interval=save_every),
                                        **kw))
    return summary, killed_at, log_b


def _assert_resumed_exactly(backend, module: str, tmp_path, kw: dict, steps: int):
    """The resume check of async RL and IGPO: an uninterrupted run of `kw` and the same run killed after step 3
    and rerun (checkpoints every 2 steps) sample the same rollouts and end with the same weights and Adam state.
    `reproducible_rollouts` makes the deployment compute each sequence alone: batched, its logprobs (and with
    them the TIS weights) differ in the last bits between any two runs, resumed or not."""
    import importlib

    from workbench.recipes.utils import WeightSyncConfig

    recipe = importlib.import_module(f"workbench.recipes.{module}")
    kw = dict(kw, reproducible_rollouts=True, max_steps=steps)
    a = recipe.main(recipe.Config(log_path=str(tmp_path / f"{module}-whole"),
                                  weight_sync=WeightSyncConfig(dcp_save_interval=2), **kw))
    b, killed_at, log_b = _kill_and_resume(backend, tmp_path, module, kw, 2, 3)
    print(f"{module}: killed after step {killed_at}; resumed from {b['resumed_from']}")
    assert b["resume_source"] == "resume" and int(b["resumed_from"].split("-")[1]) >= 2 and b["steps"] == steps
    sa, sb = _steps(tmp_path / f"{module}-whole"), _steps(log_b)
    assert sorted(sb) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert sb[s]["rollout/reward"] == sa[s]["rollout/reward"], (s, sb[s], sa[s])
    assert_same(weights(backend, a["trainer_job_id"], f"step-{steps}", with_optimizer=True),
                weights(backend, b["trainer_job_id"], f"step-{steps}", with_optimizer=True))


def test_grpo_from_sft_warm_start_raises_mean_reward(recipe_backend, arithmetic_warm_start, tmp_path):
    from workbench.recipes import rl_loop
    from workbench.recipes.utils import WeightSyncConfig, read_metrics

    sft, rl_data = arithmetic_warm_start
    rl = rl_loop.main(rl_loop.Config(
        log_path=str(tmp_path / "grpo"), dataset=str(rl_data), evaluation_dataset=str(rl_data),
        init_from_checkpoint=f"{sft['trainer_job_id']}:{sft['final_checkpoint']}",
        epochs=20, max_steps=20, prompt_groups_per_step=8, completions_per_prompt=8, max_completion_tokens=8,
        learning_rate=2e-3, kl_beta=0.001, eval_interval=10,
        weight_sync=WeightSyncConfig(weight_sync_interval=1, dcp_save_interval=10)))
    before, after = rl["eval_reward_before"], rl["eval_reward_after"]
    print(f"\nGRPO eval reward {before:.3f} -> {after:.3f}; rollout reward first quarter "
          f"{rl['train_reward_first_quarter']:.3f} -> last quarter {rl['train_reward_last_quarter']:.3f}; "
          f"{rl['train_seconds']:.0f}s")
    assert rl["resume_source"] == "init_from_checkpoint" and rl["steps"] == 20
    assert rl["reference"].startswith("trainer ") and sft["trainer_job_id"] in rl["reference"]
    assert after > before + 0.05     # paired: the same seeds draw the evaluation samples before and after

    rows = read_metrics(tmp_path / "grpo")
    steps = [r for r in rows if "rollout/reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    synced = [(r["step"], r["sync/snapshot"]) for r in steps if "sync/snapshot" in r]
    assert synced and all(snapshot.startswith(f"step-{step}-") for step, snapshot in synced)
    updates = [r for r in steps if "grpo/tokens" in r]
    assert updates and all(r["grpo/clip_frac"] == 0.0 for r in updates)      # one update per batch: ratio 1
    assert any(r["grpo/kl"] > 0 for r in updates)                             # the reference is not the policy
    assert abs(sum(r["grpo/train_inference_diff"] for r in updates) / len(updates)) < 0.05   # TIS ~ 1
    run = json.loads((tmp_path / "grpo" / "run.json").read_text())
    assert set(run["trainers"]) == {"policy", "reference"} and run["status"] == "completed"
    # the run cleaned up after itself: its deployment is gone, its trainers are deleted
    deps = recipe_backend.get("/v1/accounts/workbench/deployments").json()["deployments"]
    assert all(d["state"] in ("DELETED", "DELETING") for d in deps if d["name"].endswith(run["deployment_id"]))


def _async_kw(arithmetic_warm_start) -> dict:
    sft, rl_data = arithmetic_warm_start
    return dict(dataset=str(rl_data), evaluation_dataset=str(rl_data), kl_beta=0.0, max_head_offpolicy_versions=1,
                init_from_checkpoint=f"{sft['trainer_job_id']}:{sft['final_checkpoint']}", epochs=20,
                max_completion_tokens=8, learning_rate=2e-3, eval_interval=0)


def test_async_rl_raises_reward(recipe_backend, arithmetic_warm_start, tmp_path):
    from workbench.recipes import async_rl_loop
    from workbench.recipes.utils import WeightSyncConfig

    a = async_rl_loop.main(async_rl_loop.Config(log_path=str(tmp_path / "async"), max_steps=12,
                                                prompt_groups_per_step=8, completions_per_prompt=8,
                                                weight_sync=WeightSyncConfig(dcp_save_interval=4),
                                                **_async_kw(arithmetic_warm_start)))
    before, after = a["eval_reward_before"], a["eval_reward_after"]
    print(f"\nasync GRPO eval reward {before:.3f} -> {after:.3f}; rollout reward first quarter "
          f"{a['train_reward_first_quarter']:.3f} -> last quarter {a['train_reward_last_quarter']:.3f}; "
          f"{a['train_seconds']:.0f}s")
    assert a["steps"] == 12 and after > before + 0.05
    steps = _steps(tmp_path / "async")
    # overlap: batch N+1 was sampled while step N trained, one version old -- except right after a checkpoint
    assert [steps[s]["async/staleness"] for s in range(1, 13)] == [0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    assert all(steps[s].get("async/overlap") == 1 for s in (1, 2, 3, 5, 6, 7, 9, 10, 11))


def test_async_rl_resumes_exactly(recipe_backend, arithmetic_warm_start, tmp_path):
    from workbench.recipes.utils import data as D

    small_eval = tmp_path / "eval2.jsonl"
    D.write_jsonl(small_eval, D.read_jsonl(arithmetic_warm_start[1])[:2])
    _assert_resumed_exactly(recipe_backend, "async_rl_loop", tmp_path,
                            dict(_async_kw(arithmetic_warm_start), evaluation_dataset=str(small_eval),
                                 prompt_groups_per_step=2, completions_per_prompt=4), steps=6)


@pytest.fixture(scope="module")
def lookup_warm_start(recipe_backend, tmp_path_factory):
    """The shipped lookup task's prompts, a held-out set, and a short SFT run on its demonstrations (40 steps:
    the model calls the tool in ~2/3 of the trajectories and is right ~1 time in 7, so groups have signal)."""
    from workbench.recipes import sft_loop
    from workbench.recipes.utils import data as D
    from workbench.recipes.utils.lookup_task import make_lookup_rows, make_lookup_sft

    tmp = tmp_path_factory.mktemp("lookup")
    rl_data, eval_data, sft_data = tmp / "lookup.jsonl", tmp / "lookup-eval.jsonl", tmp / "sft.jsonl"
    D.write_jsonl(rl_data, make_lookup_rows(64, seed=0))
    D.write_jsonl(eval_data, make_lookup_rows(16, seed=5))
    D.write_jsonl(sft_data, make_lookup_sft(64))
    sft = sft_loop.main(sft_loop.Config(log_path=str(tmp / "sft"), dataset=str(sft_data),
                                        evaluation_dataset=str(sft_data), epochs=100, batch_size=16,
                                        max_steps=IGPO_SFT_STEPS, learning_rate=6e-3))
    return dict(dataset=str(rl_data), evaluation_dataset=str(eval_data), epochs=20, max_completion_tokens=12,
                init_from_checkpoint=f"{sft['trainer_job_id']}:{sft['final_checkpoint']}", learning_rate=2e-3,
                kl_beta=0.0, eval_interval=0, max_turns=3)


def test_igpo_resumes_exactly(recipe_backend, lookup_warm_start, tmp_path):
    from workbench.recipes.utils import data as D
    from workbench.recipes.utils.lookup_task import make_lookup_rows

    small_eval = tmp_path / "eval2.jsonl"
    D.write_jsonl(small_eval, make_lookup_rows(2, seed=5))
    _assert_resumed_exactly(recipe_backend, "igpo_loop", tmp_path,
                            dict(lookup_warm_start, evaluation_dataset=str(small_eval), prompt_groups_per_step=2,
                                 completions_per_prompt=4), steps=6)


@pytest.mark.parametrize("recipe", ["dpo", "orpo"])
def test_preference_recipes_raise_preference_accuracy(recipe_backend, tmp_path, recipe):
    from workbench.recipes import dpo_loop, orpo_loop

    if recipe == "dpo":
        summary = dpo_loop.main(dpo_loop.Config(log_path=str(tmp_path / recipe), max_steps=20, batch_size=16,
                                                learning_rate=2e-3, beta=0.1))
    else:
        summary = orpo_loop.main(orpo_loop.Config(log_path=str(tmp_path / recipe), max_steps=20, batch_size=16,
                                                  learning_rate=3e-3, orpo_lambda=0.5))
    before, after = summary["pref_accuracy_before"], summary["pref_accuracy_after"]
    print(f"\n{recipe.upper()} held-out preference accuracy {before:.3f} -> {after:.3f} "
          f"({summary['eval_pairs']} pairs, {summary['train_seconds']:.0f}s)")
    assert summary["eval_pairs"] == 40 and summary["steps"] == 20
    assert after >= before + 0.15
    if recipe == "dpo":
        assert summary["reward_accuracy_after"] > 0.6
        assert (tmp_path / recipe / "reference_logprobs.json").exists()
