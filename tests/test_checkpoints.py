"""workbench.checkpoints on real files: DCP train states, sampler snapshots, atomicity, detection, listing.

Uses the real tiny model (qwen3-tiny, ~1M parameters) and a real AdamW trajectory; every file is
written into tmp_path. Codec-level delta tests are in test_delta_codec.py.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest
import torch

from workbench import checkpoints as ck
from workbench import models
from workbench.checkpoints import sampler, staging, train_state

# Single-process DCP warns on every call by design (see train_state.py, which filters it outside pytest).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: intra-op threads only add contention (and make DCP copies 10x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_model():
    return models.load_model(models.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def model_dir():
    return models.local_path(models.DEFAULT_MODEL)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def train_step(model, optimizer, seed: int) -> None:
    x = batch(seed)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_model(base):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))


# -------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["a", "step-1", "0", "x" * 63, "step-0001-1a2b3c4d"])
def test_valid_names_pass_through(name):
    assert ck.validate_checkpoint_name(name) == name


@pytest.mark.parametrize("name", ["Step-1", "step_1", "-step", "step-", "x" * 64, "a/b", "step 1", "step-1\n", "é"])
def test_invalid_names_are_rejected_with_field_and_value(name):
    with pytest.raises(ck.CheckpointNameError) as e:
        ck.validate_checkpoint_name(name, field="output_model_id")
    message = str(e.value)
    assert message.startswith("output_model_id ")
    assert "lowercase letters, digits and hyphens" in message and repr(name) in message
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", [None, ""])
def test_missing_name_is_required(name):
    with pytest.raises(ck.CheckpointNameError, match="^path is required$"):
        ck.validate_checkpoint_name(name)


# -------------------------------------------------------------------------------------------- manifest

def test_manifest_round_trip_and_unreadable_manifests(tmp_path):
    meta = {"name": "step-1", "kind": "train_state", "created_time": 12.5, "expire_time": None, "step": 1}
    ck.write_manifest(tmp_path, meta)
    assert ck.read_manifest(tmp_path) == meta
    assert [p.name for p in tmp_path.iterdir()] == [ck.MANIFEST_FILE]  # no temp file left behind
    (tmp_path / ck.MANIFEST_FILE).write_text('{"name": "step-1", "kind"')  # torn write
    assert ck.read_manifest(tmp_path) is None
    (tmp_path / ck.MANIFEST_FILE).write_text("[1, 2]")
    assert ck.read_manifest(tmp_path) is None
    assert ck.read_manifest(tmp_path / "absent") is None


# -------------------------------------------------------------------------------------------- train state

def test_train_state_round_trip_with_optimizer_continues_the_trajectory(tmp_path, model, base_model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, 1)
    train_step(model, optimizer, 2)
    dest = tmp_path / "checkpoints" / "step-2"
    ck.save_train_state(dest, model, optimizer, {"step": 2, "base_model": models.DEFAULT_MODEL, "lora_rank": 0})
    train_step(model, optimizer, 3)
    expected = params(model)

    resumed = copy.deepcopy(base_model)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    meta = ck.load_train_state(dest, resumed, resumed_optimizer)
    assert meta["step"] == 2 and meta["kind"] == "train_state" and meta["optimizer"] == "saved"
    train_step(resumed, resumed_optimizer, 3)
    assert same_bits(params(resumed), expected)


def test_weights_only_load_restores_weights_but_not_the_optimizer(tmp_path, model, base_model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, 1)
    train_step(model, optimizer, 2)
    saved = params(model)
    dest = tmp_path / "step-2"
    ck.save_train_state(dest, model, optimizer, {"step": 2})
    train_step(model, optimizer, 3)
    continued = params(model)

    fresh = copy.deepcopy(base_model)
    ck.load_train_state(dest, fresh, None)
    assert same_bits(params(fresh), saved)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    train_step(fresh, fresh_optimizer, 3)
    # A fresh Adam's first step moves every weight by ~lr: not where the restored moments lead.
    assert not torch.equal(params(fresh)["model.layers.0.mlp.up_proj.weight"],
                           continued["model.layers.0.mlp.up_proj.weight"])


def test_checkpoint_without_optimizer_state_refuses_an_optimizer_load(tmp_path, model):
    ck.save_train_state(tmp_path / "w", model, None, {})
    with pytest.raises(ValueError, match="without optimizer state"):
        ck.load_train_state(tmp_path / "w", model, torch.optim.AdamW(model.parameters()))


def test_saving_before_the_first_step_leaves_the_optimizer_untouched(tmp_path, model, base_model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck.save_train_state(tmp_path / "step-0", model, optimizer, {"step": 0})
    assert not optimizer.state  # DCP would otherwise initialise it with a zero-lr step
    train_step(model, optimizer, 1)
    reference = copy.deepcopy(base_model)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    train_step(reference, reference_optimizer, 1)
    assert same_bits(params(model), params(reference))
    # And the checkpoint resumes into an optimizer that has state: that state is reset.
    meta = ck.load_train_state(tmp_path / "step-0", reference, reference_optimizer)
    assert meta["optimizer"] == "empty" and not reference_optimizer.state


def test_save_refuses_to_overwrite(tmp_path, model):
    dest = tmp_path / "step-1"
    ck.save_train_state(dest, model, None, {"step": 1})
    before = ck.read_manifest(dest)
    with pytest.raises(FileExistsError):
        ck.save_train_state(dest, model, None, {"step": 99})
    assert ck.read_manifest(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_crash_inside_save_leaves_no_checkpoint(tmp_path, model, monkeypatch):
    job = tmp_path / "job"

    def crash(state, storage_writer, **kwargs):
        (Path(str(storage_writer.path)) / "__0_0.distcp").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_state.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save_train_state(job / "checkpoints" / "step-1", model, None, {"step": 1})
    assert list((job / "checkpoints").iterdir()) == []  # neither dest nor a staging directory
    assert ck.list_checkpoints(job) == []


def test_crash_while_writing_a_sampler_snapshot_leaves_no_snapshot(tmp_path, model, model_dir, monkeypatch):
    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("killed")

    monkeypatch.setattr(sampler, "save_file", crash)
    with pytest.raises(OSError, match="killed"):
        ck.save_sampler_base(tmp_path / "sampler" / "s-1", ck.bf16_state(model), model_dir, {})
    assert list((tmp_path / "sampler").iterdir()) == []


def test_hard_crash_leftover_is_not_listed_and_is_cleaned(tmp_path, model, monkeypatch):
    job = tmp_path / "job"
    ck.save_train_state(job / "checkpoints" / "step-1", model, None, {"step": 1})
    # A process killed mid-save never runs its cleanup: keep the staging dir as such a crash would.
    monkeypatch.setattr(staging.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(staging, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        ck.save_train_state(job / "checkpoints" / "step-2", model, None, {"step": 2})
    monkeypatch.undo()
    leftovers = [p.name for p in (job / "checkpoints").iterdir() if p.name.startswith(".tmp-step-2-")]
    assert len(leftovers) == 1
    assert [row["id"] for row in ck.list_checkpoints(job)] == ["step-1"]
    ck.cleanup_partial(job, min_age_seconds=3600)  # too young: a save may still be running
    assert (job / "checkpoints" / leftovers[0]).exists()
    ck.cleanup_partial(job)
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["step-1"]


def test_lora_train_state_holds_only_the_adapter_and_round_trips(tmp_path, base_model):
    peft_model = lora_model(base_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    train_step(peft_model, optimizer, 1)
    dest = tmp_path / "checkpoints" / "lora-1"
    ck.save_train_state(dest, peft_model, optimizer, {"step": 1, "lora_rank": 4})
    keys = train_state.dcp_keys(dest)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(train_state.is_lora_key(k) for k in model_keys)
    assert len(model_keys) == 2 * len(LORA_TARGETS) * base_model.config.num_hidden_layers
    train_step(peft_model, optimizer, 2)
    expected = {k: v for k, v in params(peft_model).items() if "lora_" in k}

    resumed = lora_model(base_model)
    resumed_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
    ck.load_train_state(dest, resumed, resumed_optimizer)
    train_step(resumed, resumed_optimizer, 2)
    assert same_bits({k: v for k, v in params(resumed).items() if "lora_" in k}, expected)
    with pytest.raises(ValueError, match="LoRA"):
        ck.load_train_state(dest, copy.deepcopy(base_model), None)


# -------------------------------------------------------------------------------------------- sampler snapshots

def test_base_snapshot_is_a_hugging_face_directory(tmp_path, model, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, 1)
    weights = ck.bf16_state(model)
    assert "lm_head.weight" not in weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    dest = tmp_path / "sampler" / "step-1-1a2b3c4d"
    ck.save_sampler_base(dest, weights, model_dir, {"base_model": models.DEFAULT_MODEL})
    assert ck.snapshot_kind(dest) == "base"
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"

    loaded = AutoModelForCausalLM.from_pretrained(str(dest))
    assert loaded.dtype == torch.bfloat16
    state = loaded.state_dict()
    assert same_bits({k: state[k] for k in weights}, weights)
    assert torch.equal(state["lm_head.weight"], weights["model.embed_tokens.weight"])  # re-tied
    assert same_bits(ck.load_base_weights(dest), weights)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert ids == models.load_tokenizer(models.DEFAULT_MODEL).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)


def test_base_plus_two_deltas_reconstruct_bit_for_bit(tmp_path, model, model_dir):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer, 1)
    w0 = ck.bf16_state(model)
    train_step(model, optimizer, 2)
    w1 = ck.bf16_state(model)
    train_step(model, optimizer, 3)
    w2 = ck.bf16_state(model)
    assert not same_bits(w1, w0) and not same_bits(w2, w1)

    root = tmp_path / "sampler"
    ck.save_sampler_base(root / "s-0", w0, model_dir, {})
    stats1 = ck.save_sampler_delta(root / "s-1", w1, w0, "s-0", {})
    stats2 = ck.save_sampler_delta(root / "s-2", w2, w1, "s-1", {})
    for stats in (stats1, stats2):
        assert stats["raw_bytes"] == sum(t.numel() * 2 for t in w0.values())
        assert 0 < stats["delta_bytes"] < stats["raw_bytes"] / 2 and stats["changed_elements"] > 0
    assert [ck.snapshot_kind(root / n) for n in ("s-0", "s-1", "s-2")] == ["base", "delta", "delta"]
    assert ck.read_manifest(root / "s-2")["base_identity"] == "s-1"

    assert same_bits(ck.reconstruct([root / "s-0", root / "s-1", root / "s-2"]), w2)
    step1 = ck.apply_delta(root / "s-1", ck.load_base_weights(root / "s-0"), "s-0")
    assert same_bits(step1, w1)
    assert same_bits(ck.apply_delta(root / "s-2", step1, "s-1"), w2)


@pytest.mark.parametrize("delta_format", ck.DELTA_FORMATS)
def test_bad_deltas_raise_and_leave_the_current_weights_intact(tmp_path, model, model_dir, delta_format):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer, 1)
    w0 = ck.bf16_state(model)
    train_step(model, optimizer, 2)
    w1 = ck.bf16_state(model)
    root = tmp_path / "sampler"
    stats = ck.save_sampler_delta(root / "s-1", w1, w0, "s-0", {}, delta_format=delta_format)
    delta_file = root / "s-1" / stats["file"]
    current = {k: v.clone() for k, v in w0.items()}

    with pytest.raises(ck.DeltaError, match="'s-0'.*'s-9'"):
        ck.apply_delta(root / "s-1", current, "s-9")
    blob = delta_file.read_bytes()
    corrupted = bytearray(blob)
    corrupted[len(blob) // 2] ^= 0x5A
    delta_file.write_bytes(bytes(corrupted))
    with pytest.raises(ck.DeltaError):
        ck.apply_delta(root / "s-1", current, "s-0")
    delta_file.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(ck.DeltaError, match="truncated"):
        ck.apply_delta(root / "s-1", current, "s-0")
    delta_file.unlink()
    with pytest.raises(ck.DeltaError, match="missing"):
        ck.apply_delta(root / "s-1", current, "s-0")
    # Right name, wrong bytes: the per-tensor checksum notices.
    delta_file.write_bytes(blob)
    other = {k: v.clone() for k, v in w0.items()}
    other["model.norm.weight"][0] += 1
    with pytest.raises(ck.DeltaError, match="checksum"):
        ck.apply_delta(root / "s-1", other, "s-0")
    assert same_bits(current, w0)
    assert same_bits(ck.apply_delta(root / "s-1", current, "s-0"), w1)


# -------------------------------------------------------------------------------------------- detection, listing

def test_checkpoint_types_are_detected_from_files(tmp_path, model, base_model, model_dir):
    job = tmp_path / "job"
    ck.save_train_state(job / "checkpoints" / "full", model, None, {})
    peft_model = lora_model(base_model)
    ck.save_train_state(job / "checkpoints" / "lora", peft_model, None, {"lora_rank": 4})
    weights = ck.bf16_state(model)
    ck.save_sampler_base(job / "sampler" / "base", weights, model_dir, {})
    ck.save_sampler_lora(job / "sampler" / "adapter", peft_model, model_dir, {"base_model": models.DEFAULT_MODEL})
    changed = {k: v.clone() for k, v in weights.items()}
    changed["model.norm.weight"] += 1
    ck.save_sampler_delta(job / "sampler" / "delta", changed, weights, "base", {})

    expected = {
        "checkpoints/full": (ck.TRAINING, False, True),
        "checkpoints/lora": (ck.TRAINING_LORA, False, True),
        "sampler/base": (ck.INFERENCE_BASE, True, False),
        "sampler/adapter": (ck.INFERENCE_LORA, True, False),
        "sampler/delta": (ck.INFERENCE_ARC_V2, False, False),
    }
    for rel, (ctype, promotable, resumable) in expected.items():
        detected = ck.detect_checkpoint_type(job / rel)
        assert (detected, ck.is_promotable(detected), ck.is_resumable(detected)) == (ctype, promotable, resumable), rel
    assert {row["checkpointType"] for row in ck.list_checkpoints(job)} == set(ck.CHECKPOINT_TYPES)

    # A manifest's claims do not change what the files are.
    meta = ck.read_manifest(job / "checkpoints" / "full")
    ck.write_manifest(job / "checkpoints" / "full", {**meta, "kind": "sampler", "snapshot_kind": "base"})
    assert ck.detect_checkpoint_type(job / "checkpoints" / "full") == ck.TRAINING
    with pytest.raises(ValueError, match="no checkpoint files"):
        ck.detect_checkpoint_type(tmp_path)


def test_lora_sampler_snapshot_is_a_peft_adapter(tmp_path, base_model, model_dir):
    from peft import PeftModel

    peft_model = lora_model(base_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    train_step(peft_model, optimizer, 1)
    dest = tmp_path / "adapter-1"
    ck.save_sampler_lora(dest, peft_model, model_dir, {"base_model": models.DEFAULT_MODEL, "lora_rank": 4})
    assert ck.snapshot_kind(dest) == "lora"
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    assert ck.read_manifest(dest)["base_model"] == models.DEFAULT_MODEL
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(dest))
    trained = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    reloaded = loaded.state_dict()
    key = next(iter(trained))
    assert torch.equal(reloaded[key].to(torch.bfloat16), trained[key].to(torch.bfloat16))
    assert trained[key].abs().sum() > 0  # lora_B starts at zero: the step really changed it


def test_list_checkpoints_oldest_first_by_created_time(tmp_path, model, model_dir):
    job = tmp_path / "job"
    now = time.time()
    # Names and creation order disagree on purpose, and microseconds matter.
    ck.save_train_state(job / "checkpoints" / "a-late", model, None, {"created_time": now + 10.5})
    ck.save_train_state(job / "checkpoints" / "b-early", model, None, {"created_time": now + 0.00001})  # 10 us: float64 resolution at 1.8e9 s is ~0.24 us
    ck.save_sampler_base(job / "sampler" / "c-middle", ck.bf16_state(model), model_dir,
                         {"created_time": now + 1, "expire_time": now + 3600})
    ck.save_train_state(job / "checkpoints" / "d-first", model, None, {"created_time": now})
    # A whole second must still print six fractional digits, or string order breaks.
    ck.save_train_state(job / "checkpoints" / "e-whole-second", model, None, {"created_time": float(int(now) - 5)})
    (job / "checkpoints" / "uncommitted").mkdir()  # no manifest: not a checkpoint
    rows = ck.list_checkpoints(job)
    assert [row["id"] for row in rows] == ["e-whole-second", "d-first", "b-early", "c-middle", "a-late"]
    assert rows[0]["createTime"].endswith(".000000Z")
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
    assert all(stamp.match(row["createTime"]) and row["updateTime"] == row["createTime"] for row in rows)
    assert sorted(row["createTime"] for row in rows) == [row["createTime"] for row in rows]
    assert rows[1]["createTime"] != rows[2]["createTime"]
    middle = rows[3]
    assert middle["path"] == str(job / "sampler" / "c-middle") and middle["expire_time"] == pytest.approx(now + 3600)
    assert middle["manifest"]["kind"] == "sampler" and middle["promotable"] and not middle["resumable"]
    assert rows[1]["expire_time"] is None and rows[1]["created_time"] == now
