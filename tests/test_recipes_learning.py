"""The recipes learn on the embedded model, on a real backend: GRPO from an SFT warm start raises the
mean reward, DPO and ORPO raise held-out preference accuracy. Each run takes well under a minute of
training on 2 cores; the printed numbers are what the report quotes.
"""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.timeout(600)




def test_grpo_from_sft_warm_start_raises_mean_reward(recipe_backend, tmp_path):
    from workbench.recipes import rl_loop, sft_loop
    from workbench.recipes.utils import WeightSyncConfig, read_metrics
    from workbench.recipes.utils import data as D

    # The 16 additions a, b in 0..3: a short SFT run memorizes them partially (greedy mostly right,
    # sampling at temperature 1 often wrong), which GRPO then sharpens.
    sft_data, rl_data = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl"
    D.write_jsonl(sft_data, D.make_arithmetic_sft(max_operand=3))
    D.write_jsonl(rl_data, D.make_arithmetic_rl(max_operand=3))
    sft = sft_loop.main(sft_loop.Config(log_path=str(tmp_path / "sft"), dataset=str(sft_data),
                                        evaluation_dataset=str(sft_data), epochs=100, batch_size=16, max_steps=45,
                                        learning_rate=6e-3))
    assert sft["eval_loss_after"] < 0.5

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
