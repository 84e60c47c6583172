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
from workbench.models import DEFAULT_MODEL, load_model


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
    return LocalTorchTrainer(tmp_path / "jobs" / "job-a", job, load_model(DEFAULT_MODEL), None,
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
    for p in ref.parameters():
        p.grad /= tokens
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
