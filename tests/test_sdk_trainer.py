"""Issue 2, end to end: a real `workbench serve` driven only through the official SDK (seeds 003, 004).

Trainer job lifecycle, training steps through the gateway, exactness of the server's gradients and
optimizer against in-process PyTorch on an identical model, reconnecting after the trainer process
was killed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import tinker
import torch

from conftest import TINY, TINY_SHAPE

pytestmark = pytest.mark.timeout(600)


def make_datums(n: int = 8, length: int = 24, seed: int = 0) -> list[tinker.Datum]:
    g = torch.Generator().manual_seed(seed)
    datums = []
    for i in range(n):
        tokens = torch.randint(10, 500, (length + 1,), generator=g).tolist()
        weights = [0.0] * 4 + [1.0] * (length - 4)
        datums.append(tinker.Datum(
            model_input=tinker.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[length]),
                            "weights": tinker.TensorData(data=weights, dtype="float32", shape=[length])}))
    return datums


def local_logprobs(model, datums) -> list[torch.Tensor]:
    """Per-datum target logprobs from ONE batched forward of equal-length datums (what the trainer runs)."""
    tokens = torch.tensor([d.model_input.to_ints() for d in datums])
    targets = torch.tensor([d.loss_fn_inputs["target_tokens"].data for d in datums])
    logits = model(input_ids=tokens).logits.float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return list(lp)


@pytest.fixture(scope="module")
def trainer(backend):
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobConfig

    mgr = backend.trainer_manager()
    profile = mgr.resolve_training_profile(TINY_SHAPE)
    created = mgr.create(TrainerJobConfig(base_model=TINY, training_shape_ref=profile.training_shape,
                                          lora_rank=0, learning_rate=1e-3))
    endpoint = mgr.wait_for_ready(created.job_id, poll_interval_s=1, timeout_s=300)
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=0)
    yield mgr, created, endpoint, service, client
    service.close()


def test_create_is_idempotent_by_id_and_409s(backend, trainer):
    mgr, created, *_ = trainer
    r = backend.post(f"/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId={created.job_id}",
                     json={"trainingConfig": {"baseModel": TINY}})
    assert r.status_code == 409
    job = backend.get(f"/v1/accounts/workbench/rlorTrainerJobs/{created.job_id}").json()
    assert job["state"] == "JOB_STATE_RUNNING"
    assert job["trainingConfig"]["maxContextLength"] == 2048


def test_trainer_logs_its_startup_timeline(backend, trainer):
    """The trainer logs its start-up phases (wall time, CPU seconds) once it serves: bench/cold_start.py's
    phase table reads this line and the supervisor's millisecond spawn header."""
    import json
    import re
    from datetime import datetime

    _, created, *_ = trainer
    text = (backend.home / "logs" / f"trainer-{created.job_id}.log").read_text()
    spawned = re.search(r"^===== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) starting trainer", text, re.M)
    assert spawned, text[:500]
    phases = json.loads(re.search(r"startup (\[.*\])$", text, re.M).group(1))
    names = [name for name, _, _ in phases]
    assert names[-7:] == ["interpreter up", "job lock held", "imports done", "model loaded", "backend built",
                          "app created", "port written"], names
    walls, cpus = [wall for _, wall, _ in phases], [cpu for _, _, cpu in phases]
    assert walls == sorted(walls) and cpus == sorted(cpus) and cpus[-1] > 0
    spawn_time = datetime.strptime(spawned.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    assert spawn_time - 1 <= walls[0] <= walls[-1] < spawn_time + 600


def test_duplicate_training_client_raises(trainer):
    *_, service, _ = trainer
    with pytest.raises(ValueError):
        service.create_training_client(base_model=TINY, lora_rank=0)


def test_sft_steps_drive_loss_down(trainer):
    *_, client = trainer
    data = make_datums(n=4, seed=1)
    adam = tinker.AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    losses = []
    for _ in range(30):
        fb = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
        losses.append(fb.metrics["loss:sum"])
        assert all(":" in k for k in fb.metrics if k != "response_tokens")  # the SDK adds response_tokens
    assert losses[-1] < 0.5 * losses[0], losses
    out = client.forward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == 4
    assert len(out.loss_fn_outputs[0]["logprobs"].data) == 24


def _server_weights(backend, job_id: str, client, name: str) -> dict[str, torch.Tensor]:
    """Read the trainer's exact fp32 weights back through its DCP train state."""
    from workbench.checkpoints import load_train_state
    from workbench.models import load_model

    client.save_state(name).result()
    model = load_model(TINY)
    load_train_state(backend.home / "jobs" / job_id / "checkpoints" / name, model, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_custom_loss_gradients_and_adamw_match_in_process(backend, trainer):
    from workbench.models import load_model

    _, created, _, _, client = trainer
    start = _server_weights(backend, created.job_id, client, "exact-start")
    client.load_state("exact-start").result()  # weights only: a fresh optimizer, like the local one
    local = load_model(TINY)
    local.load_state_dict(start)
    data = make_datums(n=3, seed=2)

    def custom_loss(data, logprobs_list):  # a non-trivial function of the logprobs
        loss = sum(((lp - 0.1 * i) ** 2).mean() for i, lp in enumerate(logprobs_list))
        return loss, {"custom": float(loss.detach())}

    params = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
    opt = torch.optim.AdamW(local.parameters(), lr=params["learning_rate"], betas=(params["beta1"], params["beta2"]),
                            eps=params["eps"], weight_decay=params["weight_decay"])
    for _ in range(2):
        result = client.forward_backward_custom(data, custom_loss).result()
        client.optim_step(tinker.AdamParams(**params)).result()
        opt.zero_grad()
        loss, _ = custom_loss(data, local_logprobs(local, data))
        loss.backward()
        opt.step()
        assert abs(result.metrics["custom"] - float(loss)) < 1e-4
    after = _server_weights(backend, created.job_id, client, "exact-after")
    worst = max((after[k] - v).abs().max().item() for k, v in local.state_dict().items())
    assert worst < 1e-5, worst


def test_gradients_match_in_process_autograd(backend, trainer):
    """With beta1=beta2=0 and a huge eps, one AdamW step moves each weight by lr*g/eps: the raw gradient."""
    from workbench.models import load_model

    _, created, _, _, client = trainer
    start = _server_weights(backend, created.job_id, client, "grad-start")
    client.load_state("grad-start").result()
    local = load_model(TINY)
    local.load_state_dict(start)
    data = make_datums(n=2, seed=3)

    def custom_loss(data, logprobs_list):
        loss = -sum(lp.sum() for lp in logprobs_list) / 7.0
        return loss, {}

    client.forward_backward_custom(data, custom_loss).result()
    eps = 1e6
    client.optim_step(tinker.AdamParams(learning_rate=eps, beta1=0.0, beta2=0.0, eps=eps, weight_decay=0.0)).result()
    loss, _ = custom_loss(data, local_logprobs(local, data))
    loss.backward()
    after = _server_weights(backend, created.job_id, client, "grad-after")
    worst = 0.0
    for name, p in local.named_parameters():
        server_grad = -(after[name] - start[name])  # update = lr * g / (|g| + eps) ~= g
        worst = max(worst, (server_grad - p.grad).abs().max().item())
    assert worst < 1e-5, worst


def test_malformed_datum_is_a_user_error_naming_the_field(trainer):
    *_, client = trainer
    bad = tinker.Datum(model_input=tinker.ModelInput.from_ints([1, 2, 3]),
                       loss_fn_inputs={"target_tokens": tinker.TensorData(data=[2, 3], dtype="int64", shape=[2])})
    with pytest.raises(Exception) as info:
        client.forward_backward([bad], "cross_entropy").result()
    assert "target_tokens" in str(info.value)
    # the sequence is not poisoned: the next op works
    client.forward(make_datums(n=1), "cross_entropy").result()


def test_reconnect_after_trainer_killed(backend, trainer):
    from fireworks.training.sdk import FiretitanServiceClient

    mgr, created, *_ = trainer
    trainer_pid = _trainer_pid(backend, created.job_id)
    os.kill(trainer_pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        if mgr.get(created.job_id)["state"] == "JOB_STATE_FAILED":
            break
        time.sleep(0.2)
    assert mgr.get(created.job_id)["state"] == "JOB_STATE_FAILED"
    endpoint = mgr.reconnect_and_wait(created.job_id, timeout_s=300)
    assert mgr.get(created.job_id)["state"] == "JOB_STATE_RUNNING"
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=0)
    fb = client.forward_backward(make_datums(n=2), "cross_entropy").result()
    assert fb.metrics["loss:sum"] > 0
    service.close()


def _trainer_pid(backend, job_id: str) -> int:
    import subprocess

    out = subprocess.run(["pgrep", "-f", f"workbench.backend.trainer --job-dir {backend.home}/jobs/{job_id}"],
                         capture_output=True, text=True).stdout.split()
    assert out, "trainer process not found"
    return int(out[0])
