"""Recipes without a backend: config validation, TrainingCheckpoints logic, data order, losses, promote.

Fast (no trainer, no server): fakes stand in for the SDK clients where a call would reach the backend.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from workbench.recipes import async_rl_loop, dpo_loop, igpo_loop, orpo_loop, rl_loop, sft_loop
from workbench.recipes.utils import ConfigError, InfraConfig, TrainingCheckpoints, WeightSyncConfig
from workbench.recipes.utils import data as D
from workbench.recipes.utils import losses as L
from workbench.recipes.utils.checkpoints import logical_name, newest_first

TINY = "accounts/workbench/models/qwen3-tiny"
JOB = "accounts/workbench/rlorTrainerJobs"


# ---- config validation (fails before any backend call) ---------------------------------------------
def _fails(main, cfg, *needles):
    with pytest.raises(ConfigError) as info:
        main(cfg)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


@pytest.fixture
def no_backend(monkeypatch):
    """Any attempt to reach a backend fails the test: validation must come first."""
    import workbench.connect

    def boom(*a, **k):
        raise AssertionError("the recipe tried to connect before validating its config")

    monkeypatch.setattr(workbench.connect, "connect", boom)


@pytest.mark.parametrize("module", [sft_loop, rl_loop, dpo_loop, orpo_loop, async_rl_loop, igpo_loop])
def test_init_from_checkpoint_and_adapter_are_exclusive(tmp_path, no_backend, module):
    cfg = module.Config(log_path=str(tmp_path), lora_rank=8, init_from_checkpoint="job-a:step-4",
                        warm_start_from_adapter="accounts/workbench/models/adapter")
    _fails(module.main, cfg, "init_from_checkpoint", "warm_start_from_adapter", "mutually exclusive")


@pytest.mark.parametrize("module", [sft_loop, rl_loop, dpo_loop, orpo_loop, async_rl_loop, igpo_loop])
def test_warm_start_needs_lora(tmp_path, no_backend, module):
    cfg = module.Config(log_path=str(tmp_path), warm_start_from_adapter="accounts/workbench/models/adapter")
    _fails(module.main, cfg, "warm_start_from_adapter requires lora_rank > 0")


def test_completions_per_prompt_at_least_two(tmp_path, no_backend):
    _fails(rl_loop.main, rl_loop.Config(log_path=str(tmp_path), completions_per_prompt=1), "completions_per_prompt",
           "group")


def test_bad_output_model_id_uses_the_sdk_validator(tmp_path, no_backend):
    msg = _fails(sft_loop.main, sft_loop.Config(log_path=str(tmp_path), output_model_id="My_Model"), "output_model_id")
    assert "lowercase" in msg
    _fails(dpo_loop.main, dpo_loop.Config(log_path=str(tmp_path), output_model_id="x" * 64), "too long")


def test_missing_dataset_and_many_errors_at_once(tmp_path, no_backend):
    msg = _fails(sft_loop.main, sft_loop.Config(log_path=str(tmp_path), dataset=str(tmp_path / "nope.jsonl"),
                                                batch_size=0, init_from_checkpoint="no-colon",
                                                weight_sync=WeightSyncConfig(dcp_save_interval=-1)),
                 "nope.jsonl", "file not found", "batch_size", "job-id:checkpoint-name", "dcp_save_interval")
    assert msg.count("\n  - ") == 4


def test_rl_numeric_checks(tmp_path, no_backend):
    _fails(rl_loop.main, rl_loop.Config(log_path=str(tmp_path), kl_beta=-1, temperature=0, eps_clip=1.5, tis_cap=0,
                                        grad_accumulation_normalization="mean"),
           "kl_beta", "temperature", "eps_clip", "tis_cap", "grad_accumulation_normalization")


def test_async_rl_staleness_budget_and_sync_interval(tmp_path, no_backend):
    _fails(async_rl_loop.main, async_rl_loop.Config(log_path=str(tmp_path), max_head_offpolicy_versions=2, kl_beta=-1,
                                                    weight_sync=WeightSyncConfig(weight_sync_interval=2)),
           "max_head_offpolicy_versions must be 0 or 1", "weight_sync_interval must be 1", "kl_beta")
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "rl", "base_model": TINY, "lora_rank": 0}))
    _fails(async_rl_loop.main, async_rl_loop.Config(log_path=str(tmp_path)), "recipe='async-rl'")


def test_rerun_must_match_the_recorded_run(tmp_path, no_backend):
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "sft", "base_model": TINY, "lora_rank": 0}))
    _fails(sft_loop.main, sft_loop.Config(log_path=str(tmp_path), lora_rank=4), "lora_rank=4", "new log_path")
    _fails(dpo_loop.main, dpo_loop.Config(log_path=str(tmp_path)), "recipe='dpo'")


def test_completed_run_returns_its_summary_without_work(tmp_path, no_backend):
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "sft", "base_model": TINY, "lora_rank": 0,
                                                   "status": "completed", "summary": {"steps": 7}}))
    out = sft_loop.main(sft_loop.Config(log_path=str(tmp_path)))
    assert out == {"steps": 7, "already_completed": True}


def test_configs_document_every_field():
    import ast
    import inspect

    for module in (sft_loop, rl_loop, dpo_loop, orpo_loop, async_rl_loop, igpo_loop):
        fields = []   # the Config class and its dataclass bases (the shared fields live in RecipeConfig)
        for klass in module.Config.__mro__[:-1]:
            body = ast.parse(inspect.getsource(klass)).body[0].body
            fields += [n.target.id for n in body if isinstance(n, ast.AnnAssign)]
            for i, node in enumerate(body):
                if isinstance(node, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                        f"{klass.__module__}.{klass.__name__}.{node.target.id} has no docstring"
        for common in ("log_path", "base_model", "dataset", "tokenizer_model", "learning_rate", "lora_rank",
                       "output_model_id", "init_from_checkpoint", "warm_start_from_adapter", "weight_sync",
                       "infra", "seed"):
            assert common in fields, (module.__name__, common)
    assert WeightSyncConfig().dcp_save_interval == 0 and WeightSyncConfig().weight_sync_interval == 1
    assert InfraConfig().training_shape_id is None


# ---- TrainingCheckpoints against fakes --------------------------------------------------------------
class _Future:
    def __init__(self, value=None):
        self.value = value

    def result(self, timeout=None):
        return self.value


class FakeClient:
    session_id = "0a1b2c3d"

    def __init__(self, fw, job):
        self.fw, self.job, self.calls = fw, job, []

    def save_state(self, name):
        self.calls.append(("save_state", name))
        self.fw.add(self.job, name, "CHECKPOINT_TYPE_TRAINING", False)
        return _Future()

    def save_weights_for_sampler_ext(self, name, checkpoint_type=None):
        self.calls.append(("sampler", name, checkpoint_type))
        snap = f"{name}-{self.session_id}"
        self.fw.add(self.job, snap, "CHECKPOINT_TYPE_INFERENCE_BASE", True)
        return SimpleNamespace(snapshot_name=snap, path=snap)

    def resolve_checkpoint_path(self, name, source_job_id=None):
        return f"cross_job://{source_job_id}/{name}" if source_job_id else name

    def load_state_with_optimizer(self, path):
        self.calls.append(("load_with_optimizer", path))
        return _Future()

    def load_adapter(self, path):
        self.calls.append(("load_adapter", path))
        return _Future()


class FakeFw:
    def __init__(self):
        self.rows: dict[str, list[dict]] = {}
        self.t = 0
        self.promoted = []

    def add(self, job, cid, ctype, promotable, create_time=None):
        self.t += 1
        self.rows.setdefault(job, []).append({
            "name": f"{JOB}/{job}/checkpoints/{cid}", "checkpointType": ctype, "promotable": promotable,
            "createTime": create_time or f"2026-01-01T00:00:{self.t:02d}.000001Z"})

    def list_checkpoints(self, job_id):
        return list(self.rows.get(job_id, []))

    def promote_checkpoint(self, *, name, output_model_id, base_model):
        self.promoted.append(name)
        return {"name": f"accounts/workbench/models/{output_model_id}", "sourceCheckpoint": name}


def _ckpt(tmp_path, job="job-a", lora_rank=0, fw=None):
    fw = fw or FakeFw()
    client = FakeClient(fw, job)
    ckpt = TrainingCheckpoints(client, fw, trainer_id=job, log_path=tmp_path, lora_rank=lora_rank, save_every=4)
    return ckpt, client, fw


def test_save_writes_the_cursor_before_the_dcp_and_skips_existing_rows(tmp_path):
    ckpt, client, fw = _ckpt(tmp_path)
    seen = []
    original = client.save_state

    def save_state(name):
        seen.append(json.loads((tmp_path / "dataloader.json").read_text()))   # already written
        return original(name)

    client.save_state = save_state
    assert ckpt.should_save(4) and not ckpt.should_save(3) and not ckpt.should_save(0)
    ckpt.save("step-4", resumable=True, promotable=False, data_consumed=64)
    assert seen == [{"step-4": 64}]
    out = ckpt.save("step-4", resumable=True, promotable=True, data_consumed=64)   # final save at a saved step
    assert out["skipped"] == ["resumable"] and out["promotable"] == "step-4-0a1b2c3d"
    out = ckpt.save("step-4", resumable=False, promotable=True)
    assert out["skipped"] == ["promotable"]
    assert [c[0] for c in client.calls] == ["save_state", "sampler"]
    with pytest.raises(ValueError):
        ckpt.save("step-5", resumable=True, promotable=False)   # no data_consumed


def test_promotable_save_after_a_delta_weight_sync_of_the_same_name(tmp_path):
    ckpt, client, fw = _ckpt(tmp_path)
    fw.add("job-a", "step-6-0a1b2c3d", "CHECKPOINT_TYPE_INFERENCE_ARC_V2", False)   # WeightSyncer delta
    out = ckpt.save("step-6", resumable=False, promotable=True)
    assert client.calls[-1] == ("sampler", "step-6-base", "base") and out["promotable"] == "step-6-base-0a1b2c3d"


def test_dataloader_keeps_the_newest_twenty(tmp_path):
    ckpt, _, _ = _ckpt(tmp_path)
    for step in range(1, 26):
        ckpt.save(f"step-{step}", resumable=True, promotable=False, data_consumed=step * 10)
    entries = json.loads((tmp_path / "dataloader.json").read_text())
    assert list(entries) == [f"step-{s}" for s in range(6, 26)] and entries["step-25"] == 250


def test_resume_priority_and_newest_row_by_parsed_time(tmp_path):
    fw = FakeFw()
    # second-precision "…:13Z" sorts AFTER "…:13.5Z" as a string, but is older as a time
    fw.add("job-a", "step-8", "CHECKPOINT_TYPE_TRAINING", False, "2026-01-01T00:00:13Z")
    fw.add("job-a", "step-4", "CHECKPOINT_TYPE_TRAINING", False, "2026-01-01T00:00:12.000001Z")
    fw.add("job-a", "step-12", "CHECKPOINT_TYPE_TRAINING", False, "2026-01-01T00:00:13.500000Z")
    fw.add("job-a", "step-16", "CHECKPOINT_TYPE_TRAINING", False, "2026-01-01T00:00:14Z")   # no cursor: ignored
    fw.add("job-a", "step-20-0a1b2c3d", "CHECKPOINT_TYPE_INFERENCE_BASE", True, "2026-01-01T00:00:15Z")
    (tmp_path / "dataloader.json").write_text(json.dumps({"step-4": 40, "step-8": 80, "step-12": 120}))
    ckpt, client, _ = _ckpt(tmp_path, fw=fw)
    info = ckpt.resume(init_from_checkpoint="other-job:step-2")     # own progress wins over init
    assert (info.step, info.data_consumed, info.source, info.checkpoint) == (12, 120, "resume", "step-12")
    assert client.calls == [("load_with_optimizer", "step-12")]


def test_init_from_checkpoint_resets_step_and_cursor(tmp_path):
    ckpt, client, _ = _ckpt(tmp_path)
    info = ckpt.resume(init_from_checkpoint="job-b:step-8")
    assert (info.step, info.data_consumed, info.source, info.source_job_id) == (0, 0, "init_from_checkpoint", "job-b")
    assert client.calls == [("load_with_optimizer", "cross_job://job-b/step-8")]


def test_adapter_warm_start_and_fresh_start(tmp_path):
    ckpt, client, _ = _ckpt(tmp_path, lora_rank=8)
    assert ckpt.resume(warm_start_from_adapter="accounts/workbench/models/ad").source == "adapter"
    assert client.calls == [("load_adapter", "accounts/workbench/models/ad")]
    fresh, client2, _ = _ckpt(tmp_path / "other")
    assert fresh.resume() is None and client2.calls == []
    with pytest.raises(ConfigError, match="mutually exclusive"):
        fresh.resume(init_from_checkpoint="a:b", warm_start_from_adapter="x")
    with pytest.raises(ConfigError, match="lora_rank"):
        fresh.resume(warm_start_from_adapter="x")


def test_promote_latest_newest_promotable_or_named(tmp_path):
    ckpt, _, fw = _ckpt(tmp_path)
    fw.add("job-a", "step-2-0a1b2c3d", "CHECKPOINT_TYPE_INFERENCE_BASE", True)
    fw.add("job-a", "step-3-0a1b2c3d", "CHECKPOINT_TYPE_INFERENCE_ARC_V2", False)
    fw.add("job-a", "step-4", "CHECKPOINT_TYPE_TRAINING", False)
    ckpt.promote_latest("m1", TINY)
    ckpt.promote_latest("m2", TINY, checkpoint_name="step-2")
    assert fw.promoted == [f"{JOB}/job-a/checkpoints/step-2-0a1b2c3d"] * 2
    with pytest.raises(RuntimeError, match="no promotable"):
        ckpt.promote_latest("m3", TINY, checkpoint_name="step-3")
    assert logical_name("step-5-45dda197") == "step-5" and logical_name("step-5") == "step-5"


def test_promote_from_job_matches_exact_and_logical_names(monkeypatch):
    import fireworks.training.sdk as sdk

    from workbench.recipes import promote

    fw = FakeFw()
    fw.add("job-p", "step-2-0a1b2c3d", "CHECKPOINT_TYPE_INFERENCE_BASE", True)
    fw.add("job-p", "step-2-99999999", "CHECKPOINT_TYPE_INFERENCE_BASE", True)
    fw.add("job-p", "step-4-0a1b2c3d", "CHECKPOINT_TYPE_INFERENCE_BASE", True)
    fw.add("job-p", "step-6", "CHECKPOINT_TYPE_TRAINING", False)
    monkeypatch.setattr(sdk, "FireworksClient", lambda api_key, base_url: fw)
    backend = SimpleNamespace(api_key="k", base_url="http://x")
    promote.promote_from_job("job-p", "a", TINY, backend=backend)
    promote.promote_from_job("job-p", "b", TINY, "step-2", backend=backend)
    promote.promote_from_job("job-p", "c", TINY, "step-2-0a1b2c3d", backend=backend)
    assert [short.rsplit("/", 1)[-1] for short in fw.promoted] == ["step-4-0a1b2c3d", "step-2-99999999",
                                                                   "step-2-0a1b2c3d"]
    with pytest.raises(promote.PromoteError, match="not promotable"):
        promote.promote_from_job("job-p", "d", TINY, "step-6", backend=backend)
    with pytest.raises(promote.PromoteError, match="lowercase"):
        promote.promote_from_job("job-p", "Bad", TINY, backend=backend)
    assert fw.promoted[-1].endswith("step-2-0a1b2c3d") and len(fw.promoted) == 3


def test_newest_first_breaks_ties_by_step():
    rows = [{"name": f"x/checkpoints/step-{s}", "createTime": "2026-01-01T00:00:00Z"} for s in (2, 10, 4)]
    assert [r["name"][-7:] for r in newest_first(rows)] == ["step-10", "/step-4", "/step-2"]


# ---- data order -------------------------------------------------------------------------------------
def test_epoch_schedule_resumes_exactly():
    sched = D.EpochSchedule(n=23, batch_size=5, epochs=3, seed=7)
    assert sched.steps_per_epoch == 5 and sched.total_steps == 15

    def run(consumed, steps):
        out = []
        for _ in range(steps):
            epoch, idx = sched.next_batch(consumed)
            out.append((epoch, tuple(idx)))
            consumed += len(idx)
        return out, consumed

    full, end = run(0, 15)
    assert end == 69 and all(len(set(i for e, b in full if e == ep for i in b)) == 23 for ep in range(3))
    first, mid = run(0, 7)
    rest, end2 = run(mid, 8)
    assert first + rest == full and end2 == end
    assert D.EpochSchedule(23, 5, 3, 7).order(1) == D.EpochSchedule(23, 5, 3, 8).order(0)   # seed + epoch
    assert sched.next_batch(69) == (3, [])


def test_eval_carve_out_is_seeded_and_disjoint():
    rows = [{"i": i} for i in range(250)]
    train, evals = D.split_eval(rows, 3, None)
    assert len(evals) == 25 and len(train) == 225 and not {r["i"] for r in evals} & {r["i"] for r in train}
    assert D.split_eval(rows, 3, None)[1] == evals and D.split_eval(rows, 4, None)[1] != evals
    assert len(D.split_eval([{"i": i} for i in range(5000)], 0, None)[1]) == 100


def test_render_chat_trains_assistant_content_and_eos_only():
    tok = D.load_recipe_tokenizer(None, TINY)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "<answer>5</answer>"},
            {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "<answer>2</answer>"}]
    r = D.render_chat(tok, msgs)
    trained = [t for t, w in zip(r.tokens, r.weights) if w]
    assert tok.decode(trained, skip_special_tokens=False) == "<answer>5</answer><|im_end|><answer>2</answer><|im_end|>"
    last = D.render_chat(tok, msgs, "last_assistant_message")
    assert tok.decode([t for t, w in zip(last.tokens, last.weights) if w], skip_special_tokens=False) \
        == "<answer>2</answer><|im_end|>"
    datum = D.to_datum(r)
    assert datum.model_input.to_ints() == r.tokens[:-1]
    assert list(datum.loss_fn_inputs["weights"].data) == r.weights[1:]


def test_shipped_data_sets_are_well_formed():
    for path, kind in ((D.ARITHMETIC_SFT, "sft"), (D.ARITHMETIC_RL, "rl"), (D.ARITHMETIC_PREFERENCES, "preference")):
        rows = D.read_jsonl(path)
        D.check_rows(rows, kind, str(path))
    rl = D.read_jsonl(D.ARITHMETIC_RL)
    assert len(rl) == 100 and all(L.arithmetic_reward(f"<answer>{r['ground_truth']}</answer>", r) == 1.0 for r in rl)
    assert D.make_arithmetic_sft() == D.read_jsonl(D.ARITHMETIC_SFT)   # regenerable bit for bit


# ---- losses -----------------------------------------------------------------------------------------
def test_reward_parsing():
    row = {"ground_truth": 12}
    assert L.arithmetic_reward("<answer>12</answer>", row) == 1.0
    assert L.arithmetic_reward("blah <answer> 12 </answer><|im_end|>", row) == 1.0
    assert L.arithmetic_reward("<answer>13</answer>", row) == 0.0
    assert L.arithmetic_reward("12", row) == 0.0


def test_group_advantages():
    assert L.group_advantages([1.0, 1.0, 1.0]) is None
    adv = L.group_advantages([1.0, 0.0, 0.0, 0.0])
    assert abs(sum(adv)) < 1e-9 and adv[0] > 0 and abs(adv[0] - (0.75 / (math.sqrt(0.1875) + 1e-8))) < 1e-9


def test_grpo_loss_matches_the_formula():
    torch.manual_seed(0)
    prompt_len, resp = 3, 4
    lp = (torch.rand(prompt_len - 1 + resp) * -2).requires_grad_(True)
    inf = [float(v) for v in (lp.detach()[prompt_len - 1:] + torch.tensor([0.1, -0.2, 3.0, 0.0]))]
    ref = [float(v) for v in (lp.detach()[prompt_len - 1:] - 0.3)]
    s = L.GrpoSample(advantage=-0.7, response_start=prompt_len - 1, inference_logprobs=inf, ref_logprobs=ref)
    loss, metrics = L.make_grpo_loss([s], kl_beta=0.05, eps_clip=0.2, eps_clip_high=0.3, tis_cap=5.0)(None, [lp])
    loss.backward()
    r = lp.detach()[prompt_len - 1:]
    tis = torch.clamp(torch.exp(r - torch.tensor(inf)), max=5.0)
    d = torch.tensor(ref) - r
    expected = (0.7 * tis + 0.05 * (torch.exp(d) - d - 1)).sum()     # ratio = 1: max(-A, -A) = -A
    assert abs(float(loss.detach()) - float(expected)) < 1e-5
    grad = lp.grad[prompt_len - 1:]
    expected_grad = -(-0.7) * tis + 0.05 * (1 - torch.exp(d))          # d/dlogp of each term
    assert torch.allclose(grad, expected_grad, atol=1e-5) and lp.grad[:prompt_len - 1].abs().sum() == 0
    assert metrics["grpo/tokens"] == 4 and metrics["grpo/tis_weight"] <= 5.0


def test_grpo_loss_per_token_advantages_and_mask():
    """IGPO: per-token advantages; tokens the policy did not sample (tool results) carry no loss and no KL."""
    torch.manual_seed(0)
    lp = (torch.rand(5) * -2).requires_grad_(True)
    resp = lp.detach()[1:]
    adv, mask = [0.5, 0.5, 0.0, -1.0], [1.0, 1.0, 0.0, 1.0]
    inf = [float(resp[0]), float(resp[1]), 0.0, float(resp[3])]       # no sampling logprob for the masked one
    ref = [float(v) for v in resp - 0.2]
    s = L.GrpoSample(0.0, 1, inf, ref_logprobs=ref, advantages=adv, mask=mask)
    loss, metrics = L.make_grpo_loss([s], kl_beta=0.1, eps_clip=0.2, eps_clip_high=None, tis_cap=5.0)(None, [lp])
    loss.backward()
    d = torch.tensor(ref) - resp
    kl = torch.exp(d) - d - 1
    expected = sum((-a + 0.1 * float(k)) * m for a, k, m in zip(adv, kl, mask))
    assert abs(float(loss.detach()) - expected) < 1e-5
    assert lp.grad[3] == 0 and lp.grad[1] != 0 and metrics["grpo/tokens"] == 3


def test_igpo_turn_advantages_and_lookup_task():
    from workbench.recipes.utils.lookup_task import (COLORS, answer, lookup_reward, lookup_tool, make_lookup_rows,
                                                     make_lookup_sft, make_lookup_warm_start)

    # two trajectories: the first looked up (IG 2.0) then answered right, the second answered at once, wrong
    adv = igpo_loop.turn_advantages([[2.0, 0.0], [0.0]], [1.0, 0.0], gamma=0.5, ig_weight=1.0)
    ig_n = [(v - 2 / 3) / ((8 / 9) ** 0.5 + 1e-6) for v in (2.0, 0.0, 0.0)]
    out_n = [(v - 1 / 3) / ((2 / 9) ** 0.5 + 1e-6) for v in (0.0, 1.0, 0.0)]
    r = [i + o for i, o in zip(ig_n, out_n)]
    assert adv[0] == pytest.approx([r[0] + 0.5 * r[1], r[1]]) and adv[1] == pytest.approx([r[2]])
    assert adv[0][0] > 0 > adv[1][0]
    rows = make_lookup_rows(8, seed=3)
    assert rows == make_lookup_rows(8, seed=3) and len({r["ground_truth"] for r in make_lookup_rows(64)}) > 1
    row = rows[0]
    box = row["messages"][0]["content"].split("box ")[1].split("?")[0]
    assert lookup_tool(f"lookup {box}", row) == f"result: {row['facts'][box]}"
    assert lookup_tool("no call", row) is None and lookup_tool("lookup 99", row) == "result: unknown"
    assert lookup_reward(f"<answer> {row['ground_truth']}</answer>", row) == 1.0 and lookup_reward("x", row) == 0.0
    assert lookup_reward(answer(row["ground_truth"]), row) == 1.0
    demo = make_lookup_sft(2)[0]["messages"]
    assert [m["role"] for m in demo] == ["user", "assistant", "user", "assistant"]
    # the demonstration's answer repeats the tool result's color token (what the tiny model can learn to copy)
    from workbench.models import load_tokenizer
    tok = load_tokenizer(TINY)
    color = demo[2]["content"].split()[-1]
    assert tok.encode(" " + color, add_special_tokens=False)[0] in tok.encode(demo[3]["content"], add_special_tokens=False)
    D.check_rows(D.read_jsonl(D.DATA_DIR / "lookup_igpo.jsonl"), "rl", "lookup_igpo.jsonl")
    # the warm-start mix: every 4th row ends at the call (its last assistant turn), the others at the answer
    warm = make_lookup_warm_start(8)
    assert [len(r["messages"]) for r in warm] == [2, 4, 4, 4, 2, 4, 4, 4]
    assert warm[0]["messages"][1]["content"].startswith("lookup ") and warm[1] == make_lookup_sft(8)[1]
    w = D.render_chat(tok, warm[1]["messages"], "last_assistant_message").weights
    assert 0 < sum(w) < sum(D.render_chat(tok, warm[1]["messages"]).weights)
    # with guess rows: the prompt answered at once with a random color (no lookup), the other kinds unchanged
    mixed = make_lookup_warm_start(400, mix="CFGF")
    guesses = [r["messages"] for r in mixed[2::4]]
    assert mixed[:2] == warm[:2] and all(len(m) == 2 and m[1]["content"].startswith("<answer> ") for m in guesses)
    assert len({m[1]["content"] for m in guesses}) == len(COLORS)
    with pytest.raises(ValueError, match="mix"):
        make_lookup_warm_start(8, mix="CX")


def test_igpo_config_checks(tmp_path, no_backend):
    _fails(igpo_loop.main, igpo_loop.Config(log_path=str(tmp_path), max_turns=0, gamma=2.0, tool_fn=3, answer_fn=4,
                                            reproducible_rollouts="yes"),
           "max_turns", "gamma", "tool_fn", "answer_fn", "reproducible_rollouts")


def test_dpo_and_orpo_losses():
    lp = [torch.tensor([-1.0, -1.0], requires_grad=True), torch.tensor([-3.0, -1.0], requires_grad=True)]
    data = [SimpleNamespace(loss_fn_inputs={"weights": SimpleNamespace(data=[1.0, 1.0])})] * 2
    loss, m = L.make_dpo_loss([(-2.0, -4.0)], beta=0.5)(data, lp)
    assert abs(float(loss.detach()) - math.log(2)) < 1e-6 and m["dpo/accuracy"] == 0.0   # equal to the reference: margin 0
    loss.backward()
    assert lp[0].grad[0] < 0 and lp[1].grad[0] > 0   # raise chosen, lower rejected
    lp = [t.detach().requires_grad_(True) for t in lp]
    loss, m = L.make_orpo_loss(orpo_lambda=1.0)(data, lp)
    assert m["orpo/accuracy"] == 1.0 and abs(m["orpo/nll"] - 1.0) < 1e-6
    assert abs(float(L.log_odds(torch.tensor(math.log(0.5))))) < 1e-6
