"""Issue 3, end to end through the official SDK: train state, sampler snapshots, rows, TTL, promotion, LoRA."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import tinker
import torch

from conftest import TINY
from test_sdk_trainer import make_datums

pytestmark = pytest.mark.timeout(600)
ADAM = tinker.AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def start_job(backend, lora_rank=0):
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig

    mgr = backend.trainer_manager()
    shape = "qwen3-tiny-lora-cpu" if lora_rank else "qwen3-tiny-cpu"
    profile = mgr.resolve_training_profile(f"accounts/workbench/trainingShapes/{shape}")
    created = mgr.create(TrainerJobConfig(base_model=TINY, training_shape_ref=profile.training_shape,
                                          lora_rank=lora_rank, learning_rate=1e-3))
    endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=1, timeout_s=300)
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=lora_rank)
    return created.job_id, endpoint, service, client


@pytest.fixture(scope="module")
def full_job(backend):
    job_id, endpoint, service, client = start_job(backend)
    yield job_id, endpoint, service, client
    service.close()


@pytest.fixture(scope="module")
def lora_job(backend):
    job_id, endpoint, service, client = start_job(backend, lora_rank=4)
    yield job_id, endpoint, service, client
    service.close()


def train(client, steps, data):
    losses = []
    for _ in range(steps):
        fb = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(ADAM).result()
        losses.append(fb.metrics["loss:sum"])
    return losses


def rows(backend, job_id):
    from fireworks.training.sdk import FireworksClient

    return FireworksClient(api_key=backend.api_key, base_url=backend.base_url).list_checkpoints(job_id)


def row_of(backend, job_id, checkpoint_id):
    return next(r for r in rows(backend, job_id) if r["name"].split("/")[-1] == checkpoint_id)


def test_save_and_load_state_with_and_without_optimizer(full_job):
    _, _, _, client = full_job
    data = make_datums(n=4, seed=11)
    train(client, 5, data)
    client.save_state("resume-point").result()
    losses_a = train(client, 5, data)
    client.load_state_with_optimizer("resume-point").result()
    losses_b = train(client, 5, data)
    assert losses_a == losses_b  # bit-identical continuation on CPU
    client.load_state("resume-point").result()  # weights only: the optimizer restarts from zero
    losses_c = train(client, 2, data)
    assert losses_c[0] == losses_a[0]  # same weights, same first forward
    assert losses_c[1] != losses_a[1]  # but a fresh Adam state takes a different step
    assert "resume-point" in client.list_checkpoints()


def test_bad_names_and_missing_checkpoints_are_user_errors(full_job):
    _, _, _, client = full_job
    with pytest.raises(Exception) as info:
        client.save_state("Bad_Name").result()
    assert "path" in str(info.value) and "Bad_Name" in str(info.value)
    with pytest.raises(Exception) as info:
        client.load_state("does-not-exist").result()
    assert "does-not-exist" in str(info.value)


def test_cross_job_load(backend, full_job):
    job_id, _, _, client = full_job
    client.save_state("cross-source").result()
    reference = client.forward(make_datums(n=2, seed=5), "cross_entropy").result()
    other_id, _, other_service, other = start_job(backend)
    try:
        before = other.forward(make_datums(n=2, seed=5), "cross_entropy").result()
        assert before.loss_fn_outputs[0]["logprobs"].data != reference.loss_fn_outputs[0]["logprobs"].data
        ref = other.resolve_checkpoint_path("cross-source", source_job_id=job_id)
        assert ref == f"cross_job://{job_id}/cross-source"
        other.load_state_with_optimizer(ref).result()
        after = other.forward(make_datums(n=2, seed=5), "cross_entropy").result()
        assert after.loss_fn_outputs[0]["logprobs"].data == reference.loss_fn_outputs[0]["logprobs"].data
    finally:
        other_service.close()
        backend.trainer_manager().delete(other_id)


def test_base_and_deltas_reconstruct_trainer_weights_bit_for_bit(backend, full_job):
    from workbench.checkpoints import load_train_state, reconstruct
    from workbench.models import load_model

    job_id, _, _, client = full_job
    data = make_datums(n=4, seed=12)
    chain = []
    for i, kind in enumerate(["base", "delta", "delta"]):
        train(client, 2, data)
        saved = client.save_weights_for_sampler_ext(f"chain-{i}", checkpoint_type=kind)
        assert saved.path == saved.snapshot_name and saved.snapshot_name.startswith(f"chain-{i}-")
        chain.append(backend.home / "jobs" / job_id / "sampler" / saved.snapshot_name)
    client.save_state("chain-end").result()
    trainer_model = load_model(TINY)
    load_train_state(backend.home / "jobs" / job_id / "checkpoints" / "chain-end", trainer_model, None)
    rebuilt = reconstruct(chain)
    expected = {k: v.to(torch.bfloat16) for k, v in trainer_model.state_dict().items() if k in rebuilt}
    assert set(expected) == set(rebuilt)
    for k, v in expected.items():
        assert torch.equal(rebuilt[k].view(torch.int16), v.view(torch.int16)), k
    types = [row_of(backend, job_id, p.name)["checkpointType"] for p in chain]
    assert types == ["CHECKPOINT_TYPE_INFERENCE_BASE", "CHECKPOINT_TYPE_INFERENCE_ARC_V2",
                     "CHECKPOINT_TYPE_INFERENCE_ARC_V2"]
    raw = sum(f.stat().st_size for f in chain[0].glob("*.safetensors"))
    delta = sum(f.stat().st_size for f in chain[1].iterdir())
    assert delta < 0.75 * raw  # lr 2e-3 changes most bf16 values; lower rates compress far more


def test_cheat_sheet_full_parameter(backend, full_job):
    job_id, _, _, client = full_job
    client.save_state("sheet-dcp").result()
    base = client.save_weights_for_sampler_ext("sheet-base", checkpoint_type="base").snapshot_name
    delta = client.save_weights_for_sampler_ext("sheet-delta", checkpoint_type="delta").snapshot_name
    assert (row_of(backend, job_id, "sheet-dcp")["checkpointType"], row_of(backend, job_id, "sheet-dcp")["promotable"]) \
        == ("CHECKPOINT_TYPE_TRAINING", False)
    assert (row_of(backend, job_id, base)["checkpointType"], row_of(backend, job_id, base)["promotable"]) \
        == ("CHECKPOINT_TYPE_INFERENCE_BASE", True)
    assert (row_of(backend, job_id, delta)["checkpointType"], row_of(backend, job_id, delta)["promotable"]) \
        == ("CHECKPOINT_TYPE_INFERENCE_ARC_V2", False)


def test_cheat_sheet_lora(backend, lora_job):
    job_id, _, _, client = lora_job
    train(client, 2, make_datums(n=2, seed=13))
    client.save_state("lora-dcp").result()
    base = client.save_weights_for_sampler_ext("lora-base", checkpoint_type="base").snapshot_name
    delta = client.save_weights_for_sampler_ext("lora-delta", checkpoint_type="delta").snapshot_name
    assert (row_of(backend, job_id, "lora-dcp")["checkpointType"], row_of(backend, job_id, "lora-dcp")["promotable"]) \
        == ("CHECKPOINT_TYPE_TRAINING_LORA", False)
    for snap in (base, delta):  # LoRA always stores the full adapter, whatever checkpoint_type said
        assert (row_of(backend, job_id, snap)["checkpointType"], row_of(backend, job_id, snap)["promotable"]) \
            == ("CHECKPOINT_TYPE_INFERENCE_LORA", True)


def test_rows_are_oldest_first_and_paginate(backend, full_job):
    from fireworks.training.sdk import FireworksClient

    job_id, *_ = full_job
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    all_rows = fw.list_checkpoints(job_id)
    paged = fw.list_checkpoints(job_id, page_size=1)
    assert [r["name"] for r in paged] == [r["name"] for r in all_rows]
    times = [r["createTime"] for r in all_rows]
    assert times == sorted(times) and len(times) >= 3
    for r in all_rows:
        assert set(r) >= {"name", "createTime", "updateTime", "checkpointType", "promotable"}


def test_promotion_name_form_loads_and_generates(backend, full_job):
    from fireworks.training.sdk import FireworksClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.checkpoints import load_base_weights

    job_id, _, _, client = full_job
    snap = client.save_weights_for_sampler_ext("to-promote", checkpoint_type="base").snapshot_name
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    row = row_of(backend, job_id, snap)
    model = fw.promote_checkpoint(name=row["name"], output_model_id="promoted-full", base_model=TINY)
    assert model["name"] == "accounts/workbench/models/promoted-full"
    got = backend.get("/v1/accounts/workbench/models/promoted-full").json()
    assert got["state"] == "READY" and got["baseModel"] == TINY and got["sourceCheckpoint"] == row["name"]
    hf = AutoModelForCausalLM.from_pretrained(got["localPath"])
    tok = AutoTokenizer.from_pretrained(got["localPath"])
    expected = load_base_weights(backend.home / "jobs" / job_id / "sampler" / snap)
    for k, v in hf.state_dict().items():
        if k in expected:
            assert torch.equal(v.to(torch.bfloat16), expected[k]), k
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=False)
    out = hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_legacy_promotion_warns(backend, full_job):
    from fireworks.training.sdk import FireworksClient

    job_id, _, _, client = full_job
    snap = client.save_weights_for_sampler_ext("legacy", checkpoint_type="base").snapshot_name
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fw.promote_checkpoint(job_id, snap, "promoted-legacy", TINY)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert model["name"].endswith("/promoted-legacy")


def test_refused_promotions_leave_nothing(backend, full_job):
    from fireworks.training.sdk import FireworksClient

    job_id, _, _, client = full_job
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    base = client.save_weights_for_sampler_ext("refuse-base", checkpoint_type="base").snapshot_name
    delta = client.save_weights_for_sampler_ext("refuse-delta", checkpoint_type="delta").snapshot_name
    with pytest.raises(ValueError):  # the SDK validates the id client-side ...
        fw.promote_checkpoint(name=row_of(backend, job_id, base)["name"], output_model_id="Bad_Id", base_model=TINY)
    # ... and the server checks it too
    r = backend.post(f"/v1/accounts/workbench/checkpoints/{base}:promote",
                     json={"output_model": "accounts/workbench/models/Bad_Id",
                           "trainer_job_id": f"accounts/workbench/rlorTrainerJobs/{job_id}", "base_model": TINY})
    assert r.status_code == 400 and "output_model" in r.json()["error"]["message"]
    r = backend.post(f"/v1/accounts/workbench/checkpoints/{delta}:promote",
                     json={"output_model": "accounts/workbench/models/from-delta",
                           "trainer_job_id": f"accounts/workbench/rlorTrainerJobs/{job_id}", "base_model": TINY})
    assert r.status_code == 412 and "INFERENCE_ARC_V2" in r.json()["error"]["message"]
    with pytest.raises(RuntimeError):
        fw.promote_checkpoint(name=row_of(backend, job_id, delta)["name"], output_model_id="from-delta2",
                              base_model=TINY)
    for model_id in ("Bad_Id", "from-delta", "from-delta2"):
        assert backend.get(f"/v1/accounts/workbench/models/{model_id}").status_code == 404
        assert not (backend.home / "models" / "workbench" / model_id).exists()
    assert not list((backend.home / "models").glob("workbench/.tmp-*"))
    fw.promote_checkpoint(name=row_of(backend, job_id, base)["name"], output_model_id="exists-once", base_model=TINY)
    r = backend.post(f"/v1/accounts/workbench/checkpoints/{base}:promote",
                     json={"output_model": "accounts/workbench/models/exists-once",
                           "trainer_job_id": f"accounts/workbench/rlorTrainerJobs/{job_id}", "base_model": TINY})
    assert r.status_code == 409


def test_lora_promotion_records_base_and_loads(backend, lora_job):
    from fireworks.training.sdk import FireworksClient
    from transformers import AutoModelForCausalLM

    job_id, _, _, client = lora_job
    snap = client.save_weights_for_sampler_ext("lora-promote").snapshot_name
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    model = fw.promote_checkpoint(name=row_of(backend, job_id, snap)["name"], output_model_id="promoted-lora",
                                  base_model=TINY)
    got = backend.get("/v1/accounts/workbench/models/promoted-lora").json()
    assert got["kind"] == "HF_PEFT_ADDON" and got["peftDetails"]["baseModel"] == TINY
    hf = AutoModelForCausalLM.from_pretrained(got["localPath"])
    assert any("lora" in name for name, _ in hf.named_parameters())
    assert model["name"].endswith("/promoted-lora")


def test_promotion_works_while_trainer_stopped(backend):
    from fireworks.training.sdk import FireworksClient

    job_id, _, service, client = start_job(backend)
    snap = client.save_weights_for_sampler_ext("stopped", checkpoint_type="base").snapshot_name
    service.close()
    backend.trainer_manager().delete(job_id)
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    model = fw.promote_checkpoint(name=row_of(backend, job_id, snap)["name"], output_model_id="from-stopped",
                                  base_model=TINY)
    assert model["name"].endswith("/from-stopped")


def test_ttl_checkpoint_disappears(backend, full_job):
    from workbench.sdk import TrainingClient

    job_id, endpoint, _, client = full_job
    ext = TrainingClient(client, endpoint.base_url, backend.api_key)
    # Saved with a TTL far longer than any save takes on a loaded machine, so both are listed however slow the
    # saves are; then shortened to a few seconds with the same PATCH, and expiry is waited for.
    snap = ext.save_weights_for_sampler_ext("short-lived", checkpoint_type="base", ttl_seconds=3600).snapshot_name
    ext.save_state("short-state", ttl_seconds=3600).result()
    ids = [r["name"].split("/")[-1] for r in rows(backend, job_id)]
    assert snap in ids and "short-state" in ids
    ttl = 3
    for checkpoint_id in (snap, "short-state"):
        ext.set_checkpoint_ttl(checkpoint_id, ttl)
    sampler_dir = backend.home / "jobs" / job_id / "sampler" / snap
    state_dir = backend.home / "jobs" / job_id / "checkpoints" / "short-state"
    deadline = time.time() + ttl + 120
    while time.time() < deadline:   # expired rows leave the listing first, the sweeper deletes the files
        ids = [r["name"].split("/")[-1] for r in rows(backend, job_id)]
        if snap not in ids and "short-state" not in ids and not sampler_dir.exists() and not state_dir.exists():
            break
        time.sleep(0.5)
    assert snap not in ids and "short-state" not in ids
    assert not sampler_dir.exists() and not state_dir.exists()
    assert "short-state" not in client.list_checkpoints()


def test_trainer_killed_mid_save_leaves_no_listed_partial(tmp_path):
    """SIGKILL the trainer while a save_state is written but not committed: nothing partial is listed."""
    import subprocess
    import signal as sig

    from conftest import start_backend, stop_backend
    from workbench.checkpoints.staging import FAULT_STALL_ENV

    backend = start_backend(tmp_path / "home", env={FAULT_STALL_ENV: "30"})
    try:
        job_id, endpoint, service, client = start_job(backend)
        future = client.save_state("interrupted")  # the POST returns at once; the save stalls before commit
        ckpt_root = backend.home / "jobs" / job_id / "checkpoints"
        deadline = time.time() + 60
        while time.time() < deadline and not list(ckpt_root.glob(".tmp-interrupted-*/*")):
            time.sleep(0.1)
        assert list(ckpt_root.glob(".tmp-interrupted-*/*")), "the save never started writing"
        pid = int(subprocess.run(["pgrep", "-f", f"workbench.backend.trainer --job-dir {backend.home}/jobs/{job_id}"],
                                 capture_output=True, text=True).stdout.split()[0])
        os.kill(pid, sig.SIGKILL)
        del future
        ids = [r["name"].split("/")[-1] for r in rows(backend, job_id)]
        assert "interrupted" not in ids
        assert not (ckpt_root / "interrupted").exists()
        mgr = backend.trainer_manager()
        deadline = time.time() + 30
        while mgr.get(job_id)["state"] != "JOB_STATE_FAILED" and time.time() < deadline:
            time.sleep(0.2)
        endpoint = mgr.reconnect_and_wait(job_id, timeout_s=300)
        from fireworks.training.sdk import FiretitanServiceClient

        service2 = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
        client2 = service2.create_training_client(base_model=TINY, lora_rank=0)
        assert "interrupted" not in client2.list_checkpoints()
        with pytest.raises(Exception) as info:
            client2.load_state("interrupted").result()
        assert "interrupted" in str(info.value)
        assert not list(ckpt_root.glob(".tmp-*"))  # the restarted trainer cleaned up the leftover
        service2.close()
    finally:
        stop_backend(backend)
