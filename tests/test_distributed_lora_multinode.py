"""Issue 12: LoRA under FSDP2 on 2 ranks, and a 2-node job (one rank per "node") on localhost.

LoRA: the 2-rank trainer's adapter (train state and sampler snapshot) equals, bit for bit, the one a
single-process `LocalTorchTrainer` computes from the same requests (exact mode on both). Multi-node:
a job with nodeCount=2 starts node 0 under the control plane; the test starts node 1 through the
documented command (`python -m workbench.backend.trainer.distributed.launch --node-rank 1`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY, start_backend, stop_backend
from test_distributed_trainer import ADAM, PLAN, dcp_state, step_data, train

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = start_backend(tmp_path_factory.mktemp("wbhome-dist2"), env={"WORKBENCH_TRAINER_EXACT_DATUMS": "64"})
    yield b
    stop_backend(b)


def _local_lora_reference(tmp_path, steps: int):
    """The same requests through one in-process LocalTorchTrainer (what a 1-rank job runs)."""
    import json

    from workbench import models
    from workbench.backend.trainer import protocol as p
    from workbench.backend.trainer.local_torch import LocalTorchTrainer

    (tmp_path / "job.json").write_text(json.dumps({"job_id": "ref", "base_model": TINY, "lora_rank": 4,
                                                   "home": str(tmp_path)}))
    job = p.JobConfig.load(tmp_path / "job.json")
    trainer = LocalTorchTrainer(tmp_path, job, models.load_model(TINY), models.local_path(TINY), exact_max_datums=64)
    trainer.create_model("m", p.parse_create_model({"base_model": TINY, "lora_config": {"rank": 4}}))
    for step in range(steps):
        data = [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": d.model_input.to_ints()}]},
                 "loss_fn_inputs": {k: {"data": list(v.data), "dtype": v.dtype, "shape": list(v.shape)}
                                    for k, v in d.loss_fn_inputs.items()}} for d in step_data(step)]
        body = {"loss_fn": "cross_entropy", "data": data}
        trainer.forward_backward("m", p.parse_forward_input(body, "forward_backward_input", trainer.limits))
        adam = {"learning_rate": ADAM.learning_rate, "beta1": ADAM.beta1, "beta2": ADAM.beta2, "eps": ADAM.eps,
                "weight_decay": ADAM.weight_decay, "grad_clip_norm": ADAM.grad_clip_norm}
        trainer.optim_step("m", p.parse_adam_step(adam, PLAN[step % len(PLAN)][0]))
    return {n: t.detach().clone() for n, t in trainer.train_model.named_parameters() if t.requires_grad}


def test_lora_two_ranks_match_one(backend, tmp_path):
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig
    from safetensors.torch import load_file

    mgr = backend.trainer_manager()
    profile = mgr.resolve_training_profile("accounts/workbench/trainingShapes/qwen3-tiny-lora-cpu-2r")
    created = mgr.create(TrainerJobConfig(base_model=TINY, training_shape_ref=profile.training_shape, lora_rank=4,
                                          learning_rate=1e-3))
    endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=1, timeout_s=300)
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    try:
        client = service.create_training_client(base_model=TINY, lora_rank=4)
        train(client, 3)
        client.save_state("lora-3").result()
        saved = client.save_weights_for_sampler_ext("lora-snap", checkpoint_type="base")
        merged = client.save_weights_for_sampler_ext("lora-merged", checkpoint_type="merged_base")
    finally:
        service.close()
    reference = _local_lora_reference(tmp_path, 3)
    job_dir = backend.home / "jobs" / created.job_id
    state = dcp_state(job_dir / "checkpoints" / "lora-3")
    model_keys = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert model_keys.keys() == reference.keys() and any("lora_A" in k for k in model_keys)
    for k, v in reference.items():
        assert torch.equal(model_keys[k], v), k
    adapter = load_file(str(job_dir / "sampler" / saved.snapshot_name / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and all(t.dtype == torch.bfloat16 for t in adapter.values())
    assert (job_dir / "sampler" / merged.snapshot_name / "model.safetensors").exists()


def test_two_nodes_of_one_rank_on_localhost(backend):
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig

    mgr = backend.trainer_manager()
    created = mgr.create(TrainerJobConfig(base_model=TINY, lora_rank=0, learning_rate=1e-3, node_count=2))
    job_dir = backend.home / "jobs" / created.job_id
    import json
    import time

    deadline = time.time() + 60
    while not (job_dir / "job.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    topology = json.loads((job_dir / "job.json").read_text())
    assert topology["nodes"] == 2 and topology["ranks_per_node"] == 1 and topology["master_port"] > 0
    node1 = subprocess.Popen([sys.executable, "-m", "workbench.backend.trainer.distributed.launch", "--job-dir",
                              str(job_dir), "--node-rank", "1"], env=dict(os.environ),
                             stdout=subprocess.DEVNULL, stderr=open(job_dir / "node1.log", "wb"))
    try:
        endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=1, timeout_s=300)
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
        client = service.create_training_client(base_model=TINY, lora_rank=0)
        losses = train(client, 2)
        assert losses[1] < losses[0]
        client.save_state("two-nodes").result()
        assert sorted(p.name for p in (job_dir / "checkpoints" / "two-nodes").glob("*.distcp")) == \
            ["__0_0.distcp", "__1_0.distcp"]
        service.close()
        mgr.delete(created.job_id)
        assert node1.wait(120) == 0 or node1.returncode is not None
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait(30)
