"""Issue 12 through the official SDK: N-rank gloo trainers (FSDP2) against the 1-rank trainer.

One backend, three jobs started together: 1 rank (`qwen3-tiny-cpu`), 2 ranks (`qwen3-tiny-cpu-2r`) and
a LoRA job on 2 "nodes" of one rank each (`node_count=2`; node 1 started through the documented
launch command). In the default (batched) mode:

* 10 steps of the same data at 1 and 2 ranks give the same losses and final fp32 weights, bit for
  bit (the issue asks for 1e-5 relative and 1e-6), including a refused non-finite request part-way;
* train states saved at either world size load at the other bit for bit (weights and AdamW state);
* the LoRA adapter trained on 2 nodes equals the one an in-process `LocalTorchTrainer` computes;
* a SIGKILLed rank fails the job with its log tail and `reconnect_and_wait` resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tinker
import torch

from conftest import TINY, start_backend, stop_backend
from test_sdk_trainer import make_datums

pytestmark = pytest.mark.timeout(900)
SHAPES = "accounts/workbench/trainingShapes/"
ADAM = tinker.AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                         grad_clip_norm=5.0)
# Per step: (normalization, datums). Odd counts and up to three lengths, so a request is 1 to 3
# micro-batches: 2 ranks then run one pass each, or two passes with one rank padding the second, or
# one rank padding the only pass; every normalization and clipping (norms are ~100 > 5) is used.
PLAN = [("num_loss_tokens", 5), ("none", 3), ("num_sequences", 7), ("num_loss_tokens", 1)]
LORA_RANK = 4


def step_data(step: int) -> list[tinker.Datum]:
    count = PLAN[step % len(PLAN)][1]
    third = count // 4 + (count >= 5)   # datums of a third length (one more micro-batch) in the larger steps
    long, short = (count - third + 1) // 2, (count - third) // 2
    return (make_datums(n=long, length=24, seed=100 + step) + make_datums(n=short, length=17, seed=200 + step)
            + make_datums(n=third, length=9, seed=300 + step))


def train(clients: list, steps: int, first: int = 0) -> list[list[float]]:
    """`steps` steps on every client in lockstep (the trainers compute at the same time); losses per client."""
    out: list[list[float]] = [[] for _ in clients]
    for step in range(first, first + steps):
        fbs = [c.forward_backward(step_data(step), "cross_entropy") for c in clients]
        results = [f.result() for f in fbs]
        steps_ = [c.optim_step(ADAM, grad_accumulation_normalization=PLAN[step % len(PLAN)][0]) for c in clients]
        for s in steps_:
            s.result()
        for losses, fb in zip(out, results):
            losses.append(fb.metrics["loss:sum"])
    return out


def dcp_state(directory) -> dict[str, torch.Tensor]:
    """A train-state directory's full (unsharded) tensors, flattened: 'model.<fqn>', 'optim.state.<fqn>...'."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = directory.parent / f".{directory.name}.pt"
    dcp_to_torch_save(directory, target)
    state = torch.load(target, weights_only=True)
    target.unlink()
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value
    walk("", state)
    return flat


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = start_backend(tmp_path_factory.mktemp("wbhome-dist"))   # default (batched) mode
    yield b
    stop_backend(b)


def ckpt_dir(backend, job_id, name):
    return backend.home / "jobs" / job_id / "checkpoints" / name


def _connect(backend, endpoint, lora_rank: int = 0):
    from fireworks.training.sdk import FiretitanServiceClient

    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    return service, service.create_training_client(base_model=TINY, lora_rank=lora_rank)


@pytest.fixture(scope="module")
def jobs(backend):
    """The three jobs, created at once so their ranks start together; node 1 of the 2-node job by hand."""
    from fireworks.training.sdk import TrainerJobConfig

    mgr = backend.trainer_manager()
    configs = {name: TrainerJobConfig(base_model=TINY, training_shape_ref=mgr.resolve_training_profile(
        SHAPES + shape).training_shape, lora_rank=0, learning_rate=1e-3)
        for name, shape in (("one", "qwen3-tiny-cpu"), ("two", "qwen3-tiny-cpu-2r"))}
    configs["nodes"] = TrainerJobConfig(base_model=TINY, lora_rank=LORA_RANK, learning_rate=1e-3, node_count=2)
    created = {name: mgr.create(config) for name, config in configs.items()}
    job_dir = backend.home / "jobs" / created["nodes"].job_id
    deadline = time.time() + 120
    while not (job_dir / "job.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    topology = json.loads((job_dir / "job.json").read_text())
    assert topology["nodes"] == 2 and topology["ranks_per_node"] == 1 and topology["master_port"] > 0
    # The documented command for every node but node 0 (which the control plane started).
    node1 = subprocess.Popen([sys.executable, "-m", "workbench.backend.trainer.distributed.launch", "--job-dir",
                              str(job_dir), "--node-rank", "1"], env=dict(os.environ),
                             stdout=subprocess.DEVNULL, stderr=open(job_dir / "node1.log", "wb"))
    try:
        with ThreadPoolExecutor(3) as pool:   # a manager per thread: no client shared between threads
            endpoints = dict(zip(created, pool.map(lambda job: backend.trainer_manager().wait_for_ready(
                job.job_id, poll_interval_s=0.5, timeout_s=600), created.values())))
        out = {}
        for name, job in created.items():
            service, client = _connect(backend, endpoints[name], LORA_RANK if name == "nodes" else 0)
            out[name] = (job.job_id, service, client)
        out["node1"] = node1
        yield out
        for name in ("one", "two", "nodes"):
            out[name][1].close()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait(30)


def _overflowing_request(step: int) -> list[tinker.Datum]:
    """step_data(step) plus a datum of a third length whose loss overflows fp32 (finite inputs): it is in
    the second pass on 2 ranks, after the first pass's gradients were accumulated."""
    bad = make_datums(n=1, length=11, seed=999)[0]
    weights = bad.loss_fn_inputs["weights"]
    bad.loss_fn_inputs["weights"] = tinker.TensorData(data=[3e38] * len(weights.data), dtype="float32",
                                                      shape=weights.shape)
    return step_data(step) + [bad]


def test_two_ranks_train_like_one(backend, jobs):
    (job1, _, c1), (job2, _, c2) = jobs["one"], jobs["two"]
    ranks = subprocess.run(["pgrep", "-f", f"distributed.worker --job-dir {backend.home}/jobs/{job2}"],
                           capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, "the 2-rank shape runs two worker processes"
    losses1, losses2 = train([c1, c2], 5)
    # A request refused part-way (non-finite loss in its last micro-batch) applies nothing on either.
    for c in (c1, c2):
        c.forward_backward(step_data(5), "cross_entropy").result()
        with pytest.raises(Exception, match="not finite"):
            c.forward_backward(_overflowing_request(5), "cross_entropy").result()
        c.optim_step(ADAM, grad_accumulation_normalization=PLAN[5 % len(PLAN)][0]).result()
    more1, more2 = train([c1, c2], 4, first=6)
    losses1, losses2 = losses1 + more1, losses2 + more2
    c1.save_state("eq-final").result()
    c2.save_state("eq-final").result()
    assert sorted(p.name for p in ckpt_dir(backend, job2, "eq-final").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"], "each rank writes its own shard"
    s1, s2 = dcp_state(ckpt_dir(backend, job1, "eq-final")), dcp_state(ckpt_dir(backend, job2, "eq-final"))
    assert s1.keys() == s2.keys()
    worst = max((s1[k] - s2[k]).abs().max().item() for k in s1 if k.startswith("model."))
    print(f"\n10 steps, 1 vs 2 ranks: max |dw| = {worst:.3g}; losses {losses1[-1]:.6f} vs {losses2[-1]:.6f}")
    assert losses1 == losses2   # (the issue asks for 1e-5 relative)
    assert worst == 0.0         # (the issue asks for 1e-6)
    # Outputs come back in datum order with the request-wide metrics.
    data = step_data(2)
    f1, f2 = c1.forward(data, "cross_entropy").result(), c2.forward(data, "cross_entropy").result()
    assert f2.metrics["num_sequences:sum"] == len(data) == len(f2.loss_fn_outputs)
    for a, b in zip(f1.loss_fn_outputs, f2.loss_fn_outputs):
        assert a["logprobs"].data == b["logprobs"].data


def test_train_states_reshard_bit_exact(backend, jobs):
    (job1, _, c1), (job2, _, c2) = jobs["one"], jobs["two"]
    saved1 = dcp_state(ckpt_dir(backend, job1, "eq-final"))
    saved2 = dcp_state(ckpt_dir(backend, job2, "eq-final"))
    # saved at 2 -> loaded at 1 (weights + optimizer), saved again: the same tensors, bit for bit
    c1.load_state_with_optimizer(f"cross_job://{job2}/eq-final").result()
    c1.save_state("from-two").result()
    # saved at 1 -> loaded at 2, and saved at 2 -> loaded at 2
    c2.load_state_with_optimizer(f"cross_job://{job1}/eq-final").result()
    c2.save_state("from-one").result()
    c2.load_state_with_optimizer("eq-final").result()
    c2.save_state("from-self").result()
    for name, job, expected in (("from-two", job1, saved2), ("from-one", job2, saved1), ("from-self", job2, saved2)):
        got = dcp_state(ckpt_dir(backend, job, name))
        assert got.keys() == expected.keys(), name
        assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in got), name
        for key in got:
            assert torch.equal(got[key], expected[key]), (name, key)
    # and both continue identically from the same state
    c1.load_state_with_optimizer(f"cross_job://{job2}/eq-final").result()
    after1, after2 = train([c1, c2], 2, first=10)
    assert after1 == after2


def _local_lora_reference(tmp_path, steps: int):
    """The same requests through one in-process LocalTorchTrainer (what a 1-rank job runs)."""
    from workbench import models
    from workbench.backend.trainer import protocol as p
    from workbench.backend.trainer.local_torch import LocalTorchTrainer

    (tmp_path / "job.json").write_text(json.dumps({"job_id": "ref", "base_model": TINY, "lora_rank": LORA_RANK,
                                                   "home": str(tmp_path)}))
    job = p.JobConfig.load(tmp_path / "job.json")
    trainer = LocalTorchTrainer(tmp_path, job, models.load_model(TINY), models.local_path(TINY))
    trainer.create_model("m", p.parse_create_model({"base_model": TINY, "lora_config": {"rank": LORA_RANK}}))
    losses = []
    for step in range(steps):
        data = [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": d.model_input.to_ints()}]},
                 "loss_fn_inputs": {k: {"data": list(v.data), "dtype": v.dtype, "shape": list(v.shape)}
                                    for k, v in d.loss_fn_inputs.items()}} for d in step_data(step)]
        body = {"loss_fn": "cross_entropy", "data": data}
        fb = trainer.forward_backward("m", p.parse_forward_input(body, "forward_backward_input", trainer.limits))
        losses.append(fb["metrics"]["loss:sum"])
        adam = {"learning_rate": ADAM.learning_rate, "beta1": ADAM.beta1, "beta2": ADAM.beta2, "eps": ADAM.eps,
                "weight_decay": ADAM.weight_decay, "grad_clip_norm": ADAM.grad_clip_norm}
        trainer.optim_step("m", p.parse_adam_step(adam, PLAN[step % len(PLAN)][0]))
    return losses, {n: t.detach().clone() for n, t in trainer.train_model.named_parameters() if t.requires_grad}


def test_lora_on_two_nodes_matches_one_rank(backend, jobs, tmp_path):
    from safetensors.torch import load_file

    job_id, service, client = jobs["nodes"]
    (losses,) = train([client], 3)
    client.save_state("lora-3").result()
    saved = client.save_weights_for_sampler_ext("lora-snap", checkpoint_type="base")
    merged = client.save_weights_for_sampler_ext("lora-merged", checkpoint_type="merged_base")
    job_dir = backend.home / "jobs" / job_id
    assert sorted(p.name for p in (job_dir / "checkpoints" / "lora-3").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"], "each node's rank writes its own shard"
    reference_losses, reference = _local_lora_reference(tmp_path, 3)
    assert losses == reference_losses
    state = dcp_state(job_dir / "checkpoints" / "lora-3")
    model_keys = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert model_keys.keys() == reference.keys() and any("lora_A" in k for k in model_keys)
    for k, v in reference.items():
        assert torch.equal(model_keys[k], v), k
    adapter = load_file(str(job_dir / "sampler" / saved.snapshot_name / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and all(t.dtype == torch.bfloat16 for t in adapter.values())
    assert (job_dir / "sampler" / merged.snapshot_name / "model.safetensors").exists()
    # Deleting the job stops node 0; node 1's ranks lose their peer and its launcher exits.
    service.close()
    backend.trainer_manager().delete(job_id)
    jobs["node1"].wait(120)


def _worker_pids(backend, job_id) -> dict[int, int]:
    out = subprocess.run(["pgrep", "-af", f"distributed.worker --job-dir {backend.home}/jobs/{job_id}"],
                         capture_output=True, text=True).stdout.splitlines()
    pids = {}
    for line in out:
        pid = int(line.split()[0])
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = next(int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK="))
        pids[rank] = pid
    return pids


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def test_killed_rank_fails_the_job_and_reconnect_resumes(backend, jobs):
    job2, service, c2 = jobs["two"]
    c2.save_state("before-kill").result()
    probe = step_data(3)
    before = c2.forward(probe, "cross_entropy").result()
    pids = _worker_pids(backend, job2)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    mgr = backend.trainer_manager()
    deadline = time.time() + 120
    while mgr.get(job2)["state"] != "JOB_STATE_FAILED" and time.time() < deadline:
        time.sleep(0.2)
    job = mgr.get(job2)
    assert job["state"] == "JOB_STATE_FAILED"
    assert "trainer rank 1" in job["status"]["message"] and "-9" in job["status"]["message"]
    deadline = time.time() + 60
    while any(_alive(p) for p in pids.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids.values()), "no rank outlives its job"
    service.close()

    endpoint = mgr.reconnect_and_wait(job2, timeout_s=300)
    assert sorted(_worker_pids(backend, job2)) == [0, 1]
    service, client = _connect(backend, endpoint)
    client.load_state_with_optimizer("before-kill").result()
    after = client.forward(probe, "cross_entropy").result()
    assert [o["logprobs"].data for o in after.loss_fn_outputs] == [o["logprobs"].data for o in before.loss_fn_outputs]
    jobs["two"] = (job2, service, client)
