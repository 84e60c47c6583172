"""Issue 12 through the official SDK: a 2-rank gloo trainer (FSDP2) against the 1-rank trainer.

One backend; a 1-rank job (`qwen3-tiny-cpu`) and a 2-rank job (`qwen3-tiny-cpu-2r`) train the same
data: losses and final fp32 weights agree; train states saved at either world size load at the other
bit for bit (weights and AdamW state); a SIGKILLed rank fails the job with its log tail and
`reconnect_and_wait` resumes it from the last sharded state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import tinker
import torch

from conftest import TINY, start_backend, stop_backend
from test_sdk_trainer import make_datums

pytestmark = pytest.mark.timeout(900)
SHAPES = "accounts/workbench/trainingShapes/"
ADAM = tinker.AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                         grad_clip_norm=5.0)
# Per step: (normalization, datums). Odd counts and two lengths, so the ranks get unequal shares and
# the shorter one runs padding passes; every normalization and clipping (norms are ~100 > 5) is used.
PLAN = [("num_loss_tokens", 5), ("none", 3), ("num_sequences", 7), ("num_loss_tokens", 1)]


def start_job(backend, shape: str, lora_rank: int = 0):
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig

    mgr = backend.trainer_manager()
    profile = mgr.resolve_training_profile(SHAPES + shape)
    created = mgr.create(TrainerJobConfig(base_model=TINY, training_shape_ref=profile.training_shape,
                                          lora_rank=lora_rank, learning_rate=1e-3))
    endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=1, timeout_s=300)
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    return created.job_id, service, service.create_training_client(base_model=TINY, lora_rank=lora_rank)


def step_data(step: int) -> list[tinker.Datum]:
    count = PLAN[step % len(PLAN)][1]
    long, short = (count + 1) // 2, count // 2
    return make_datums(n=long, length=24, seed=100 + step) + make_datums(n=short, length=17, seed=200 + step)


def train(client, steps: int, first: int = 0) -> list[float]:
    out = []
    for step in range(first, first + steps):
        fb = client.forward_backward(step_data(step), "cross_entropy").result()
        client.optim_step(ADAM, grad_accumulation_normalization=PLAN[step % len(PLAN)][0]).result()
        out.append(fb.metrics["loss:sum"])
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
    # Exact mode (datum by datum) on both trainers: the 2-rank engine then reduces one datum's gradient
    # per pass and accumulates in request order, so it must match one rank bit for bit.
    b = start_backend(tmp_path_factory.mktemp("wbhome-dist"), env={"WORKBENCH_TRAINER_EXACT_DATUMS": "64"})
    yield b
    stop_backend(b)


def ckpt_dir(backend, job_id, name):
    return backend.home / "jobs" / job_id / "checkpoints" / name


@pytest.fixture(scope="module")
def jobs(backend):
    one = start_job(backend, "qwen3-tiny-cpu")
    two = start_job(backend, "qwen3-tiny-cpu-2r")
    yield {"one": one, "two": two}
    for _, service, _ in (one, two):
        service.close()


def test_two_ranks_train_like_one(backend, jobs):
    (job1, _, c1), (job2, _, c2) = jobs["one"], jobs["two"]
    ranks = subprocess.run(["pgrep", "-f", f"distributed.worker --job-dir {backend.home}/jobs/{job2}"],
                           capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, "the 2-rank shape runs two worker processes"
    losses1, losses2 = train(c1, 10), train(c2, 10)
    assert losses1 == losses2   # (the issue asks for 1e-5 relative; exact mode gives equality)
    c1.save_state("eq-final").result()
    c2.save_state("eq-final").result()
    assert sorted(p.name for p in ckpt_dir(backend, job2, "eq-final").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"], "each rank writes its own shard"
    s1, s2 = dcp_state(ckpt_dir(backend, job1, "eq-final")), dcp_state(ckpt_dir(backend, job2, "eq-final"))
    assert s1.keys() == s2.keys()
    worst = max((s1[k] - s2[k]).abs().max().item() for k in s1 if k.startswith("model."))
    print(f"\n10 steps, 1 vs 2 ranks: max |dw| = {worst:.3g}; losses {losses1[-1]:.6f} vs {losses2[-1]:.6f}")
    assert worst == 0.0   # (the issue asks for 1e-6)
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
    assert train(c1, 2, first=10) == train(c2, 2, first=10)


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


def test_killed_rank_fails_the_job_and_reconnect_resumes(backend, jobs):
    from fireworks.training.sdk import FiretitanServiceClient

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
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
              for p in pids.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
                   for p in pids.values()), "no rank outlives its job"
    service.close()

    endpoint = mgr.reconnect_and_wait(job2, timeout_s=300)
    assert sorted(_worker_pids(backend, job2)) == [0, 1]
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=0)
    client.load_state_with_optimizer("before-kill").result()
    after = client.forward(probe, "cross_entropy").result()
    assert [o["logprobs"].data for o in after.loss_fn_outputs] == [o["logprobs"].data for o in before.loss_fn_outputs]
    jobs["two"] = (job2, service, client)
