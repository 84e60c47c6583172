"""In-process tests of the trainer's ordered worker and local torch backend (no subprocess, no HTTP).

The worker tests use fake jobs; the backend tests use the embedded tiny model in-process, which is how
field-level validation, normalization and LoRA construction are checked cheaply. The end-to-end
behaviour through the official SDK is in test_trainer_process.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from workbench.backend.trainer import protocol as p
from workbench.backend.trainer.local_torch import LocalTorchTrainer
from workbench.backend.trainer.protocol import JobConfig, UserError
from workbench.backend.trainer.server import FutureRecord, OrderedWorker, _Job
from workbench.models import DEFAULT_MODEL, load_model, local_path


# ---- ordered worker ------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, known=lambda mid: True, gap=0.3):
        self.loop = asyncio.new_event_loop()
        self.order: list[tuple[str, int | None]] = []
        self.done = threading.Event()
        self.worker = OrderedWorker(known, gap_timeout_s=gap)

    def submit(self, model_id, seq, expect_total):
        rec = FutureRecord(f"r{seq}", "op", model_id, seq, self.loop, asyncio.Event())

        def fn():
            self.order.append((model_id, seq))
            if len(self.order) == expect_total:
                self.done.set()
            return {"ok": True}
        self.worker.submit(_Job(rec, fn, time.monotonic()))
        return rec

    def close(self):
        self.worker.stop()
        self.loop.close()


def test_worker_runs_out_of_order_arrivals_in_seq_order():
    r = _Recorder()
    try:
        # Block the worker so all three arrive before anything runs (parallel chunks: 5, 6, 4).
        gate = threading.Event()
        r.worker.submit(_Job(FutureRecord("g", "op", None, None, r.loop, asyncio.Event()),
                             lambda: (gate.wait(5), {})[1], time.monotonic()))
        for seq in (2, 3, 1):
            r.submit("m", seq, 3)
        gate.set()
        assert r.done.wait(5)
        assert r.order == [("m", 1), ("m", 2), ("m", 3)]
    finally:
        r.close()


def test_worker_skips_a_lost_seq_after_the_gap_timeout():
    r = _Recorder(gap=0.3)
    try:
        start = time.monotonic()
        rec = r.submit("m", 2, 1)         # seq 1 never arrives
        assert r.done.wait(5)
        assert time.monotonic() - start >= 0.25
        assert rec.done and rec.result == {"ok": True}
        r.done.clear()
        r.submit("m", 1, 2)               # a late arrival still runs (after the skip)
        assert r.done.wait(5)
    finally:
        r.close()


def test_worker_releases_memory_once_per_idle_spell_never_between_queued_jobs():
    events: list[tuple[str, float]] = []
    idle = threading.Semaphore(0)

    def on_idle():
        events.append(("idle", time.monotonic()))
        idle.release()

    loop = asyncio.new_event_loop()
    worker = OrderedWorker(lambda mid: True, on_idle=on_idle, idle_s=0.2)

    def job(name, seconds):
        def fn():
            events.append((f"{name} start", time.monotonic()))
            time.sleep(seconds)   # a job longer than idle_s: no release may happen while it runs
            events.append((f"{name} end", time.monotonic()))
            return {}
        return _Job(FutureRecord(name, "op", None, None, loop, asyncio.Event()), fn, time.monotonic())

    try:
        worker.submit(job("a", 0.3))
        worker.submit(job("b", 0.3))
        assert idle.acquire(timeout=60)
        names = [name for name, _ in events]
        assert names == ["a start", "a end", "b start", "b end", "idle"]
        assert events[-1][1] - events[-2][1] >= 0.2 * 0.9   # after the queue stayed empty idle_s
        worker.submit(job("c", 0.0))                         # a new idle spell: one more release
        assert idle.acquire(timeout=60)
        assert [name for name, _ in events].count("idle") == 2
    finally:
        worker.stop()
        loop.close()


def test_worker_does_not_wait_for_unknown_models_and_reports_errors():
    r = _Recorder(known=lambda mid: False, gap=30)
    try:
        rec = FutureRecord("x", "forward", "ghost", 7, r.loop, asyncio.Event())
        finished = threading.Event()

        def fn():
            finished.set()
            raise UserError("model_id 'ghost' is not loaded")
        r.worker.submit(_Job(rec, fn, time.monotonic()))
        assert finished.wait(5)
        for _ in range(100):
            if rec.done:
                break
            time.sleep(0.01)
        assert rec.result["category"] == "user" and "ghost" in rec.result["error"]
        rec2 = FutureRecord("y", "forward", "ghost", 8, r.loop, asyncio.Event())
        r.worker.submit(_Job(rec2, lambda: 1 / 0, time.monotonic()))
        for _ in range(100):
            if rec2.done:
                break
            time.sleep(0.01)
        assert rec2.result["category"] == "server" and "ZeroDivisionError" in rec2.result["error"]
    finally:
        r.close()


# ---- engine ----------------------------------------------------------------------------------------
def _engine(tmp_path: Path, lora_rank: int = 0) -> LocalTorchTrainer:
    job = JobConfig("job-a", "acct", DEFAULT_MODEL, lora_rank, 1e-4, 64, tmp_path)
    return LocalTorchTrainer(tmp_path / "jobs" / "job-a", job, load_model(DEFAULT_MODEL), local_path(DEFAULT_MODEL),
                             base_loader=lambda: load_model(DEFAULT_MODEL))


# The wire bodies go through protocol.py exactly as server.py sends them.
def create(eng, body, model_id):
    return eng.create_model(model_id, p.parse_create_model(body))


def fwd(eng, model_id, body):
    return eng.forward(model_id, p.parse_forward_input(body, "forward_input", eng.limits))


def fwdbwd(eng, model_id, body):
    return eng.forward_backward(model_id, p.parse_forward_input(body, "forward_backward_input", eng.limits))


def step(eng, model_id, adam, normalization=None):
    return eng.optim_step(model_id, p.parse_adam_step(adam, normalization))


def _datum(tokens, targets, **extra):
    inputs = {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}}
    for key, values in extra.items():
        inputs[key] = {"data": values, "dtype": "float32", "shape": [len(values)]}
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}, "loss_fn_inputs": inputs}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = _engine(tmp_path_factory.mktemp("home"))
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m0")
    return eng


@pytest.mark.parametrize("datum, needle", [
    (_datum([1, 2, 3], [2, 3]), "data[1].loss_fn_inputs.target_tokens has shape [2]"),
    (_datum([1, 2, 3], [2, 3, 4], weights=[1.0, 1.0]), "data[1].loss_fn_inputs.weights has shape [2]"),
    (_datum([1, 2, 9999], [2, 3, 4]), "data[1].model_input token 9999"),
    (_datum([1, 2, 3], [2, 3, -1]), "data[1].loss_fn_inputs.target_tokens holds token -1"),
    ({"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1]}]}, "loss_fn_inputs": {}},
     "data[1].loss_fn_inputs.target_tokens is missing"),
    (_datum([1, 2, 3], [2, 3, 4], weights=[1.0, float("inf"), 1.0]), "data[1].loss_fn_inputs.weights.data holds"),
    (_datum(list(range(1, 70)), list(range(2, 71))), "max_context_length=64"),
    ({"model_input": {"chunks": [{"type": "image", "data": "x", "format": "png"}]}, "loss_fn_inputs": {}},
     "data[1].model_input.chunks[0].type='image'"),
])
def test_malformed_datums_name_field_and_index(engine, datum, needle):
    good = _datum([1, 2, 3], [2, 3, 4])
    with pytest.raises(UserError) as info:
        fwdbwd(engine, "m0", {"data": [good, datum], "loss_fn": "cross_entropy"})
    assert needle in str(info.value)
    assert engine.train_model.model.embed_tokens.weight.grad is None     # validation happens before compute


def test_unknown_loss_and_handle_are_user_errors(engine):
    with pytest.raises(UserError, match="loss_fn='dpo'"):
        fwd(engine, "m0", {"data": [_datum([1, 2], [2, 3])], "loss_fn": "dpo"})
    with pytest.raises(UserError, match="not loaded"):
        fwd(engine, "nope", {"data": [_datum([1, 2], [2, 3])], "loss_fn": "cross_entropy"})
    with pytest.raises(UserError, match="lora_config.rank=4 does not match .* lora_rank=0"):
        create(engine, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 4}}, "m9")
    with pytest.raises(UserError, match="grad_accumulation_normalization"):
        step(engine, "m0", {"learning_rate": 1e-3}, "per_token")


def test_normalized_step_equals_torch_adamw_in_process(tmp_path):
    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")
    ref = load_model(DEFAULT_MODEL)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    batches = [[([1, 2, 3, 4], [2, 3, 4, 5], [0.0, 1.0, 1.0, 1.0]), ([7, 8, 9], [8, 9, 10], [1.0, 1.0, 0.0])],
               [([5, 6], [6, 7], [1.0, 1.0])]]
    for batch in batches:
        fwdbwd(eng, "m", {"loss_fn": "cross_entropy",
                                   "data": [_datum(t, y, weights=w) for t, y, w in batch]})
    step(eng, "m", {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1,
                         "grad_clip_norm": 0.5}, "num_loss_tokens")
    tokens = 0
    for batch in batches:
        for t, y, w in batch:
            logp = torch.log_softmax(ref(input_ids=torch.tensor([t])).logits[0], -1)
            (-(torch.tensor(w) * logp[torch.arange(len(y)), torch.tensor(y)]).sum()).backward()
            tokens += sum(1 for v in w if v)
    for param in ref.parameters():
        param.grad /= tokens
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt.step()
    for (name, a), b in zip(eng.train_model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert eng.step == 1 and eng.pending_loss_tokens == 0


def test_lora_model_trains_adapters_and_tied_unembedding(tmp_path):
    eng = _engine(tmp_path, lora_rank=4)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 4, "alpha": 16, "train_attn": True,
                                                                  "train_mlp": False, "train_unembed": True}}, "m")
    names = [n for n, p in eng.train_model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in names) and not any("mlp" in n for n in names)
    assert any("modules_to_save" in n for n in names)
    with pytest.raises(UserError, match="train_mlp"):
        create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 4, "alpha": 16, "train_attn": True,
                                                                      "train_mlp": True, "train_unembed": True}}, "m2")
    out = fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    before = [p.detach().clone() for p in eng._trainable()]
    step(eng, "m", {"learning_rate": 1e-2}, None)
    assert out["metrics"]["num_loss_tokens:sum"] == 3.0
    assert any(not torch.equal(a, b) for a, b in zip(before, eng._trainable()))


# ---- non-finite values (issue 13.2) ------------------------------------------------------------------
def _weights_snapshot(eng):
    return [p.detach().clone() for p in eng._trainable()]


def test_non_finite_loss_is_a_user_error_naming_the_datum_and_nothing_is_applied(tmp_path):
    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")
    fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    grads_before = [p.grad.clone() for p in eng._trainable()]
    # 3e38 is a finite float32, but weights * logprob overflows to -inf.
    huge = _datum([5, 6, 7], [6, 7, 8], weights=[3e38, 3e38, 3e38])
    with pytest.raises(UserError, match=r"data\[1\]\.loss_fn_inputs.*loss_fn_inputs\.weights") as info:
        fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4]), huge]})
    assert "not finite" in str(info.value)
    # The same shape of request batches both datums into one micro-batch (equal lengths), so nothing of
    # it was back-propagated: the earlier accumulation is intact.
    for a, b in zip(grads_before, eng._trainable()):
        assert torch.equal(a, b.grad)
    with pytest.raises(UserError, match=r"data\[0\]"):
        fwd(eng, "m", {"loss_fn": "cross_entropy", "data": [huge]})
    assert eng.pending_sequences == 1


def test_non_finite_grad_norm_refuses_the_step_and_keeps_the_weights(tmp_path):
    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")
    fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    next(iter(eng._trainable())).grad[0, 0] = float("nan")     # what an overflowing backward leaves
    before = _weights_snapshot(eng)
    with pytest.raises(UserError, match="optim_step refused: the gradient norm is nan"):
        step(eng, "m", {"learning_rate": 1e-2})
    assert all(torch.equal(a, b) for a, b in zip(before, eng._trainable()))
    assert eng.step == 0 and all(p.grad is None for p in eng._trainable())
    fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    out = step(eng, "m", {"learning_rate": 1e-2})                # training continues normally
    assert eng.step == 1 and out["metrics"]["grad_norm:mean"] > 0


def test_sampler_export_refuses_non_finite_weights(tmp_path):
    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")
    with torch.no_grad():
        eng.train_model.model.norm.weight[0] = float("inf")
    with pytest.raises(UserError, match="model weight model.norm.weight holds NaN or infinite"):
        eng.save_sampler("m", p.parse_save_sampler({"path": "bad"}))
    assert not (eng.sampler_dir / "bad").exists()


# ---- loss inputs, names, re-saves (issue 14) -----------------------------------------------------------
def test_unused_loss_inputs_are_ignored_and_used_ones_validated(engine):
    masked = _datum([1, 2, 3], [2, 3, 4], loss_mask=[1.0, 1.0, 0.0])
    plain = fwd(engine, "m0", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    out = fwd(engine, "m0", {"loss_fn": "cross_entropy", "data": [masked]})
    assert out["loss_fn_outputs"][0]["elementwise_loss"] == plain["loss_fn_outputs"][0]["elementwise_loss"]
    # Unused keys are not even parsed; a key the loss uses still is.
    bogus = _datum([1, 2, 3], [2, 3, 4])
    bogus["loss_fn_inputs"]["loss_mask"] = "not a tensor"
    fwd(engine, "m0", {"loss_fn": "cross_entropy", "data": [bogus]})
    with pytest.raises(UserError, match=r"data\[0\].loss_fn_inputs.advantages has shape"):
        fwd(engine, "m0", {"loss_fn": "importance_sampling",
                           "data": [_datum([1, 2, 3], [2, 3, 4], logprobs=[-1.0] * 3, advantages=[1.0])]})


def test_names_sampler_underscores_allowed_train_states_dns_labels():
    assert p.parse_sampler_name("step_00003") == "step_00003"
    assert p.parse_sampler_name("step_00003-0123abcd4567") == "step_00003-0123abcd4567"
    for bad in ("", ".hidden", "..", "a/b", "a\n", "x" * 201):
        with pytest.raises(UserError, match="path"):
            p.parse_sampler_name(bad)
    assert p.parse_state_name("step-10") == "step-10"
    for bad in ("step_10", "Step-10", "a\n", "-a"):
        with pytest.raises(UserError, match="path"):
            p.parse_state_name(bad)


def test_resave_replaces_train_state_and_sampler_snapshot(tmp_path):
    from workbench.checkpoints import read_manifest

    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")
    eng.save_state("m", "step-10")
    eng.save_sampler("m", p.parse_save_sampler({"path": "snap_1"}))
    first = (eng.sampler_dir / "snap_1" / "model.safetensors").stat().st_mtime_ns
    # Same weights under the same name: a no-op (the cookbook re-saves its final snapshot).
    eng.save_sampler("m", p.parse_save_sampler({"path": "snap_1", "checkpoint_type": "base"}))
    assert (eng.sampler_dir / "snap_1" / "model.safetensors").stat().st_mtime_ns == first
    fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    step(eng, "m", {"learning_rate": 1e-2})
    eng.save_state("m", "step-10")                                   # replaced, not refused
    assert read_manifest(eng.checkpoints_dir / "step-10")["step"] == 1
    eng.save_sampler("m", p.parse_save_sampler({"path": "snap_1", "checkpoint_type": "base"}))
    assert read_manifest(eng.sampler_dir / "snap_1")["step"] == 1
    assert sorted(d.name for d in eng.sampler_dir.iterdir()) == ["snap_1"]      # no staging leftovers
    assert sorted(d.name for d in eng.checkpoints_dir.iterdir()) == ["step-10"]


def test_resave_refused_while_a_delta_or_deployment_depends_on_it(tmp_path):
    import json

    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")

    def train():
        fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
        step(eng, "m", {"learning_rate": 1e-2})
    eng.save_sampler("m", p.parse_save_sampler({"path": "s0", "checkpoint_type": "base"}))
    train()
    eng.save_sampler("m", p.parse_save_sampler({"path": "s1", "checkpoint_type": "delta"}))
    train()
    with pytest.raises(UserError, match="delta snapshot 's1' is encoded against it"):
        eng.save_sampler("m", p.parse_save_sampler({"path": "s0"}))
    # A deployment's recorded chain (what it replays on restart) holds s1.
    dep = tmp_path / "deployments" / "dep-a"
    dep.mkdir(parents=True)
    (dep / "state.json").write_text(json.dumps({
        "version": 1, "identity": "s1", "kind": "delta",
        "chain": [{"identity": "s0", "kind": "base", "dir": str(eng.sampler_dir / "s0")},
                  {"identity": "s1", "kind": "delta", "dir": str(eng.sampler_dir / "s1")}]}))
    with pytest.raises(UserError, match="deployment 'dep-a' holds it"):
        eng.save_sampler("m", p.parse_save_sampler({"path": "s1"}))
    assert (eng.sampler_dir / "s1").is_dir()


def test_resave_of_a_delta_as_base_writes_a_full_copy_a_deployment_still_restores(tmp_path):
    """Full-parameter RL in the cookbook re-saves its final sampler (a delta) as `checkpoint_type="base"` so it
    can be promoted: the same weights become a base, even while a deployment's chain holds the delta."""
    import json
    import time

    from workbench import checkpoints as ck
    from workbench.backend.deployment.weights import WeightManager

    eng = _engine(tmp_path)
    create(eng, {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}}, "m")
    eng.save_sampler("m", p.parse_save_sampler({"path": "s0", "checkpoint_type": "base"}))
    fwdbwd(eng, "m", {"loss_fn": "cross_entropy", "data": [_datum([1, 2, 3], [2, 3, 4])]})
    step(eng, "m", {"learning_rate": 1e-2})
    eng.save_sampler("m", p.parse_save_sampler({"path": "s1", "checkpoint_type": "delta"}))
    s0, s1 = eng.sampler_dir / "s0", eng.sampler_dir / "s1"
    assert ck.snapshot_kind(s1) == "delta"
    trained = ck.reconstruct([s0, s1])
    dep = tmp_path / "deployments" / "dep-a"
    dep.mkdir(parents=True)
    (dep / "state.json").write_text(json.dumps({
        "version": 1, "identity": "s1", "kind": "delta",
        "chain": [{"identity": "s0", "kind": "base", "dir": str(s0)},
                  {"identity": "s1", "kind": "delta", "dir": str(s1)}]}))
    eng.save_sampler("m", p.parse_save_sampler({"path": "s1", "checkpoint_type": "base"}))
    assert ck.snapshot_kind(s1) == "base"                            # promotable now
    full = ck.load_base_weights(s1)
    assert all(torch.equal(full[k], trained[k]) for k in trained)
    assert all(torch.equal(v, trained[k]) for k, v in ck.reconstruct([s0, s1]).items())
    # The deployment's restart replays its recorded chain onto the rewritten snapshot: same weights.
    wm = WeightManager(dep, {"deployment_id": "dep-a", "account": "acct", "base_model": DEFAULT_MODEL,
                             "home": str(tmp_path)})
    wm.start()
    deadline = time.time() + 120
    while not wm.ready:
        assert wm.startup_error is None and time.time() < deadline, wm.startup_error
        time.sleep(0.05)
    try:
        assert wm.current_identity == "s1", wm.loading_state
        assert all(torch.equal(wm.current_bf16[k], trained[k]) for k in trained)
    finally:
        wm.stop()


def test_overwrite_flag_means_what_every_save_does():
    assert p.parse_save_state({"path": "step-1", "overwrite": True}) == "step-1"
    assert p.parse_save_sampler({"path": "s_1", "overwrite": False}).name == "s_1"
    with pytest.raises(UserError, match="ttl_seconds"):
        p.parse_save_state({"path": "step-1", "ttl_seconds": 5})
