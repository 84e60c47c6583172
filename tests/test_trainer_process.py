"""The trainer process end to end: spawned like the control plane does, driven by the official SDK.

`FiretitanServiceClient(base_url="http://127.0.0.1:<port>")` talks to the process directly: its paths
are already `/api/v1/*`, which is what the SDK appends to a trainer gateway URL.

Server weights are read back through `save_state` (a DCP train state loaded into a local model with
`workbench.checkpoints.load_train_state`), which is how gradients and optimizer steps are compared
with in-process torch on an identical model:
* gradients: after `load_state` (fresh AdamW) one step with lr = eps = E and no weight decay moves each
  weight by d = -E*g/(|g|+E) (the bias-corrected first Adam step), so g = -E*d/(E-|d|) exactly;
* optimizer: a few steps with normalization and clipping replicated with torch.optim.AdamW.
Both processes run torch with ONE intra-op thread: CPU kernels reduce in a thread-count-dependent
order, and Adam's normalization turns those 1e-7 gradient differences into weight differences far
above 1e-6, so the thread counts must match; one thread also avoids oversubscribing a shared machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from fireworks.training.sdk import AdamParams, Datum, FiretitanServiceClient, ModelInput
from fireworks.training.sdk._core._exceptions import RequestFailedError
from workbench.checkpoints import read_manifest, snapshot_kind
from workbench.models import DEFAULT_MODEL, load_model

KEY = "wb-test-key-0123"
JOB_ID = "trainer-test-job"


class Trainer:
    def __init__(self, home: Path, job_id: str, lora_rank: int):
        self.home, self.job_id = home, job_id
        self.job_dir = home / "jobs" / job_id
        self.job_dir.mkdir(parents=True)
        (self.job_dir / "job.json").write_text(json.dumps({
            "job_id": job_id, "account": "test-account", "base_model": DEFAULT_MODEL, "lora_rank": lora_rank,
            "learning_rate": 1e-4, "max_context_length": 256, "home": str(home)}))
        port_file = self.job_dir / "port"
        self.log = open(self.job_dir / "trainer.log", "wb")
        env = {**os.environ, "WORKBENCH_API_KEY": KEY, "WORKBENCH_HOME": str(home), "WORKBENCH_TRAINER_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.backend.trainer", "--job-dir", str(self.job_dir),
             "--port-file", str(port_file)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300   # generous: model load on a machine at load ~20 takes minutes
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"trainer did not start:\n{(self.job_dir / 'trainer.log').read_text()}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def service(self) -> FiretitanServiceClient:
        return FiretitanServiceClient(base_url=self.url, api_key=KEY)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)      # same as the trainer (WORKBENCH_TRAINER_THREADS=1): see module docstring
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    t = Trainer(tmp_path_factory.mktemp("wbhome"), JOB_ID, lora_rank=0)
    yield t
    assert t.stop() == 0, "trainer did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def client(trainer):
    service = trainer.service()
    tc = service.create_training_client(base_model=DEFAULT_MODEL, lora_rank=0)
    yield service, tc
    service.close()


def datum(tokens: list[int], weights: list[float] | None = None) -> Datum:
    inputs = {"target_tokens": tokens[1:]}
    if weights is not None:
        inputs["weights"] = weights
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


SFT = [datum([1, 17, 33, 45, 60, 2], [0.0, 1.0, 1.0, 1.0, 1.0]), datum([1, 90, 91, 92, 2]),
       datum([1, 17, 33, 45, 61, 2], [0.0, 0.0, 1.0, 1.0, 1.0])]


def server_weights(trainer: Trainer, tc, name: str) -> dict[str, torch.Tensor]:
    """The trainer's current weights, via save_state + load_train_state into a local model."""
    from workbench.checkpoints import load_train_state

    tc.save_state(name).result()
    local = load_model(DEFAULT_MODEL)
    load_train_state(trainer.job_dir / "checkpoints" / name, local, None)
    return {k: v.detach().clone() for k, v in local.state_dict().items()}


def local_model(weights: dict[str, torch.Tensor]):
    model = load_model(DEFAULT_MODEL)
    model.load_state_dict(weights)
    return model


def datum_weights(d: Datum) -> torch.Tensor:
    w = d.loss_fn_inputs.get("weights")
    return torch.tensor(w.tolist()) if w is not None else torch.ones(len(d.loss_fn_inputs["target_tokens"].tolist()))


def local_logprobs(model, d: Datum) -> torch.Tensor:
    ids = torch.tensor([d.model_input.to_ints()])
    targets = torch.tensor(d.loss_fn_inputs["target_tokens"].tolist())
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return logp[torch.arange(len(targets)), targets]


# ---- tests -------------------------------------------------------------------------------------------
def test_requests_without_the_key_are_rejected(trainer):
    r = httpx.get(f"{trainer.url}/api/v1/healthz")
    assert r.status_code == 401
    assert r.json()["error"]["status"] == "UNAUTHENTICATED" and r.json()["error"]["code"] == 16
    wrong = httpx.post(f"{trainer.url}/api/v1/create_session", json={}, headers={"x-api-key": "wrong"})
    assert wrong.status_code == 401
    ok = httpx.get(f"{trainer.url}/api/v1/healthz", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json() == {"status": "ok"}


def test_create_training_client_and_duplicate(trainer, client):
    service, tc = client
    assert tc.model_id.startswith("model-") and not tc.model_id.startswith("run-")
    with pytest.raises(ValueError, match="already exists"):
        service.create_training_client(base_model=DEFAULT_MODEL, lora_rank=0)
    other = trainer.service()
    try:
        with pytest.raises(RequestFailedError, match="lora_rank"):
            other.create_training_client(base_model=DEFAULT_MODEL, lora_rank=8)
    finally:
        other.close()


def test_sft_steps_lower_the_loss(client):
    _, tc = client
    losses = []
    for _ in range(6):
        out = tc.forward_backward(SFT, "cross_entropy").result()
        losses.append(out.metrics["loss:sum"])
        assert out.metrics["num_loss_tokens:sum"] == 4 + 4 + 3
        assert out.metrics["num_sequences:sum"] == 3
        assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[5], [4], [5]]
        tc.optim_step(AdamParams(learning_rate=3e-3), grad_accumulation_normalization="num_loss_tokens").result()
    assert losses[-1] < 0.8 * losses[0], losses
    fwd = tc.forward(SFT, "cross_entropy").result()
    assert fwd.metrics["loss:sum"] < losses[-1]


def test_malformed_datum_is_a_user_error_and_does_not_poison(client):
    _, tc = client
    bad = Datum(model_input=ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3]})
    with pytest.raises(RequestFailedError) as info:
        tc.forward_backward([SFT[0], bad], "cross_entropy").result()
    assert "data[1].loss_fn_inputs.target_tokens" in str(info.value)
    assert info.value.category.value == "user"
    tc.forward(SFT, "cross_entropy").result()      # the client's sequence goes on


def test_custom_loss_gradients_match_autograd(trainer, client):
    _, tc = client
    w0 = server_weights(trainer, tc, "grad-base")
    tc.load_state("grad-base").result()            # same weights, fresh optimizer: next step is a first step
    data = [datum([1, 17, 33, 45, 60, 2]), datum([1, 90, 91, 92, 93, 2]), datum([5, 6, 7])]

    def custom(batch, logprobs_list):
        # Non-linear in the logprobs so the chain rule through weights = -dC/dlp is really exercised.
        return sum((lp.exp() * (i + 1) - lp ** 2 / 7).sum() for i, lp in enumerate(logprobs_list)), {}

    tc.forward_backward_custom(data, custom).result()
    big = 1000.0
    tc.optim_step(AdamParams(learning_rate=big, beta1=0.9, beta2=0.95, eps=big, weight_decay=0.0,
                             grad_clip_norm=0.0)).result()
    w1 = server_weights(trainer, tc, "grad-after")

    ref = local_model(w0)
    loss, _ = custom(data, [local_logprobs(ref, d) for d in data])
    loss.backward()
    for name, p in ref.named_parameters():
        d = w1[name] - w0[name]
        g_server = -big * d / (big - d.abs())
        torch.testing.assert_close(g_server, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_optim_step_matches_torch_adamw(trainer, client):
    _, tc = client
    w0 = server_weights(trainer, tc, "adam-base")
    tc.load_state("adam-base").result()            # fresh optimizer on the server, as in the replica
    params = AdamParams(learning_rate=2e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.5)
    plan = [([SFT[0], SFT[1]], [SFT[2]], "num_loss_tokens"), ([SFT[1]], [], "num_sequences"), ([SFT[2]], [], None)]
    for first, second, norm in plan:
        tc.forward_backward(first, "cross_entropy").result()
        if second:
            tc.forward_backward(second, "cross_entropy").result()      # gradients accumulate
        tc.optim_step(params, grad_accumulation_normalization=norm).result()
    w_server = server_weights(trainer, tc, "adam-after")

    ref = local_model(w0)
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    params_ref = list(ref.parameters())
    for first, second, norm in plan:
        batch = first + second
        for request in (first, second):
            # The trainer's arithmetic: one datum per micro-batch here; a request of several sums its
            # micro-batches' gradients in fp64 and adds the fp32-rounded sum to .grad (local_torch.GradSum).
            sums = None
            for d in request:
                grads = torch.autograd.grad(-(datum_weights(d) * local_logprobs(ref, d)).sum(), params_ref)
                sums = [g.double() for g in grads] if sums is None else [s + g.double() for s, g in zip(sums, grads)]
            for p, s in zip(params_ref, sums or []):
                g = s.float()
                p.grad = g if p.grad is None else p.grad.add_(g)
        tokens = sum(int((datum_weights(d) != 0).sum()) for d in batch)
        divisor = {"num_loss_tokens": tokens, "num_sequences": len(batch)}.get(norm)
        if divisor:
            for p in ref.parameters():
                p.grad /= divisor
        # The trainer's clipping norm is summed in fp64 and rounded to fp32 (so N ranks agree to the bit).
        total_norm = torch.stack([(p.grad.double() ** 2).sum() for p in params_ref]).sum().sqrt().float()
        torch.nn.utils.clip_grads_with_norm_(params_ref, 0.5, total_norm)
        opt.step()
        opt.zero_grad()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(w_server[name], p.detach(), atol=1e-6, rtol=0, msg=name)


def test_checkpoint_round_trip_and_errors(trainer, client):
    _, tc = client
    before = tc.forward(SFT, "cross_entropy").result().metrics["loss:sum"]
    tc.save_state("ckpt-a").result()
    tc.forward_backward(SFT, "cross_entropy").result()
    tc.optim_step(AdamParams(learning_rate=1e-2)).result()
    assert tc.forward(SFT, "cross_entropy").result().metrics["loss:sum"] != pytest.approx(before, abs=1e-6)
    tc.load_state_with_optimizer(tc.resolve_checkpoint_path("ckpt-a", source_job_id=JOB_ID)).result()
    assert tc.forward(SFT, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before, abs=1e-6)
    names = tc.list_checkpoints()
    assert names[-1] == "ckpt-a" and {"grad-base", "adam-after"} <= set(names)
    tc.save_state("ckpt-a").result()                # an existing name is replaced (the SDK re-saves step-N)
    assert tc.list_checkpoints().count("ckpt-a") == 1
    assert read_manifest(trainer.job_dir / "checkpoints" / "ckpt-a")["step"] >= 1
    with pytest.raises(RequestFailedError, match="path"):
        tc.save_state("Bad_Name").result()          # not loadable later, refused now
    with pytest.raises(RequestFailedError, match="no-such-ckpt"):
        tc.load_state("no-such-ckpt").result()
    # Another job's checkpoint, by cross_job:// reference (resolved under <home>/jobs/<job>/checkpoints).
    other = trainer.home / "jobs" / "other-job" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copytree(trainer.job_dir / "checkpoints" / "grad-base", other / "imported")
    tc.load_state(tc.resolve_checkpoint_path("imported", source_job_id="other-job")).result()
    assert tc.forward(SFT, "cross_entropy").result().metrics["loss:sum"] != pytest.approx(before, abs=1e-6)
    with pytest.raises(RequestFailedError, match="cross_job://other-job/missing"):
        tc.load_state("cross_job://other-job/missing").result()


def test_sampler_snapshots_base_then_delta(trainer, client):
    _, tc = client
    first = tc.save_weights_for_sampler_ext("snap-1", checkpoint_type="base")
    tc.forward_backward(SFT, "cross_entropy").result()
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    second = tc.save_weights_for_sampler_ext("snap-2")                 # SDK default after a base: delta
    for saved in (first, second):
        assert saved.path == saved.snapshot_name and saved.path.startswith("snap-")
        assert (trainer.job_dir / "sampler" / saved.path).is_dir()
    assert snapshot_kind(trainer.job_dir / "sampler" / first.path) == "base"
    assert snapshot_kind(trainer.job_dir / "sampler" / second.path) == "delta"
    assert read_manifest(trainer.job_dir / "sampler" / second.path)["base_identity"] == first.path
    assert "snap-1" not in tc.list_checkpoints()                       # sampler snapshots are not DCP states


def test_wire_level_ordering_dedup_long_poll_and_404(trainer):
    with httpx.Client(base_url=trainer.url, headers={"x-api-key": KEY}, timeout=30) as http:
        missing = http.post("/api/v1/retrieve_future", json={"request_id": "req-nope"})
        assert missing.status_code == 404 and "req-nope" in missing.json()["error"]["message"]
        assert http.post("/api/v1/telemetry", json={"events": []}).json() == {"status": "accepted"}
        bad = http.post("/api/v1/forward", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["message"]

        session = http.post("/api/v1/create_session", json={"tags": [], "type": "create_session"}).json()["session_id"]
        created = http.post("/api/v1/create_model", json={
            "session_id": session, "model_seq_id": 0, "base_model": DEFAULT_MODEL,
            "lora_config": {"rank": 0, "train_unembed": True, "train_mlp": True, "train_attn": True}}).json()
        result = http.post("/api/v1/retrieve_future", json={"request_id": created["request_id"]}).json()
        model_id = result["model_id"]
        assert model_id == created["model_id"]

        # seq_id 1 is "lost": seq_id 2 waits for the gap timeout (~3 s), then runs; its retry is deduplicated.
        body = {"model_id": model_id, "seq_id": 2, "type": "optim_step", "adam_params": {"learning_rate": 0.0}}
        first = http.post("/api/v1/optim_step", json=body).json()
        again = http.post("/api/v1/optim_step", json=body).json()
        assert first["request_id"] == again["request_id"]
        start = time.monotonic()
        result = http.post("/api/v1/retrieve_future", json={"request_id": first["request_id"],
                                                            "allow_metadata_only": True}).json()
        waited = time.monotonic() - start
        assert "metrics" in result and 1.0 < waited < 15, (result, waited)   # held, not an instant try_again


def test_lora_trainer_adapter_snapshot(tmp_path_factory):
    t = Trainer(tmp_path_factory.mktemp("wblora"), "lora-job", lora_rank=4)
    try:
        service = t.service()
        tc = service.create_training_client(base_model=DEFAULT_MODEL, lora_rank=4)
        first = tc.forward_backward(SFT, "cross_entropy").result().metrics["loss:sum"]
        for _ in range(3):
            tc.optim_step(AdamParams(learning_rate=2e-2)).result()
            last = tc.forward_backward(SFT, "cross_entropy").result().metrics["loss:sum"]
        assert last < first
        saved = tc.save_weights_for_sampler_ext("lora-snap", checkpoint_type="delta")   # LoRA: always the adapter
        assert snapshot_kind(t.job_dir / "sampler" / saved.path) == "lora"
        tc.save_state("lora-step-3").result()
        tc.optim_step(AdamParams(learning_rate=2e-2)).result()
        tc.load_state_with_optimizer("lora-step-3").result()
        assert tc.forward_backward(SFT, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(last, abs=1e-5)
        assert tc.list_checkpoints() == ["lora-step-3"]
        service.close()
    finally:
        assert t.stop() == 0


def test_seed_003_sampler_names_with_underscores_and_resaves(trainer, client):
    """Seed 003 saves `step_{step:05d}`; the SDK re-saves a name (warning "overwriting")."""
    _, tc = client
    saved = tc.save_weights_for_sampler_ext("step_00003", checkpoint_type="base")
    assert saved.snapshot_name.startswith("step_00003") and (trainer.job_dir / "sampler" / saved.path).is_dir()
    step_before = read_manifest(trainer.job_dir / "sampler" / saved.path)["step"]
    tc.forward_backward(SFT, "cross_entropy").result()
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    again = tc.save_weights_for_sampler_ext("step_00003", checkpoint_type="base")    # replaced: nothing depends on it
    assert again.path == saved.path
    assert read_manifest(trainer.job_dir / "sampler" / saved.path)["step"] == step_before + 1
    with pytest.raises(RequestFailedError, match="path"):
        tc.save_state("step_00003").result()          # train states stay DNS labels (the SDK loads them so)
