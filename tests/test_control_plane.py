"""Control-plane REST behaviour over real HTTP: auth, shapes, job and deployment validation."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest

from conftest import TINY, TINY_SHAPE, pid_alive


def test_server_files_and_key_mode(backend):
    assert (backend.home / "server.json").exists()
    mode = stat.S_IMODE(os.stat(backend.home / "api_key").st_mode)
    assert mode == 0o600
    assert backend.base_url.startswith("http://127.0.0.1:")
    # The home and every file holding state or keys are the owner's only.
    assert stat.S_IMODE(os.stat(backend.home).st_mode) == 0o700
    for name in ("server.json", "state.db"):
        assert stat.S_IMODE(os.stat(backend.home / name).st_mode) == 0o600, name


@pytest.mark.parametrize("headers", [{}, {"X-Api-Key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_every_surface_requires_the_key(backend, headers):
    for method, path in [("GET", "/v1/accounts"), ("POST", "/v1/accounts/workbench/rlorTrainerJobs"),
                         ("GET", "/training/v1/rlorTrainerJobs/workbench/x/api/v1/healthz"),
                         ("GET", "/hot_load/v1/models/hot_load"), ("POST", "/inference/v1/completions")]:
        r = httpx.request(method, backend.base_url + path, headers=headers, timeout=10)
        assert r.status_code == 401, (method, path, r.text)
        assert "API key" in r.json()["error"]["message"]


def test_bearer_key_is_accepted(backend):
    r = httpx.get(backend.base_url + "/v1/accounts", headers={"Authorization": f"Bearer {backend.api_key}"})
    assert r.status_code == 200
    assert r.json()["accounts"] == [{"name": "accounts/workbench", "displayName": "workbench (local)"}]


def test_training_profile_resolves_through_sdk(backend):
    profile = backend.trainer_manager().resolve_training_profile(TINY_SHAPE)
    assert profile.training_shape == TINY_SHAPE
    assert profile.max_supported_context_length == 2048
    with pytest.raises(RuntimeError):
        backend.trainer_manager().resolve_training_profile("accounts/workbench/trainingShapes/missing")


def test_job_validation_names_the_field(backend):
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=Bad_Id",
                     json={"trainingConfig": {"baseModel": TINY}})
    assert r.status_code == 400 and "rlorTrainerJobId" in r.json()["error"]["message"]
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=nomodel",
                     json={"trainingConfig": {"baseModel": "accounts/fireworks/models/qwen3-8b"}})
    assert r.status_code == 400 and "trainingConfig.baseModel" in r.json()["error"]["message"]
    assert "never downloads" in r.json()["error"]["message"]
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=badrank",
                     json={"trainingConfig": {"baseModel": TINY, "loraRank": -1}})
    assert r.status_code == 400 and "loraRank" in r.json()["error"]["message"]
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=x", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert backend.get("/v1/accounts/workbench/rlorTrainerJobs/nomodel").status_code == 404


def test_deployment_validation_names_the_field(backend):
    r = backend.post("/v1/accounts/workbench/deployments", json={"baseModel": TINY})
    assert r.status_code == 400 and "deploymentId" in r.json()["error"]["message"]
    r = backend.post("/v1/accounts/workbench/deployments?deploymentId=d1", json={})
    assert r.status_code == 400 and "baseModel" in r.json()["error"]["message"]
    r = backend.post("/v1/accounts/workbench/deployments?deploymentId=d1",
                     json={"baseModel": TINY, "hotLoadTrainerJob": "accounts/workbench/rlorTrainerJobs/none"})
    assert r.status_code == 400 and "hotLoadTrainerJob" in r.json()["error"]["message"]
    r = backend.post("/v1/accounts/workbench/deployments?deploymentId=d1",
                     json={"baseModel": TINY, "maxReplicaCount": -2})
    assert r.status_code == 400 and "maxReplicaCount" in r.json()["error"]["message"]


def test_gateway_unknown_job_and_deployment(backend):
    r = backend.get("/training/v1/rlorTrainerJobs/workbench/nope/api/v1/healthz")
    assert r.status_code == 404
    r = backend.post("/inference/v1/completions", json={"model": "accounts/workbench/deployments/nope", "prompt": [1]})
    assert r.status_code == 404
    r = backend.post("/inference/v1/completions", json={"model": "qwen", "prompt": [1]})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = httpx.get(backend.base_url + "/hot_load/v1/models/hot_load", headers=backend.headers())
    assert r.status_code == 400 and "fireworks-deployment" in r.json()["error"]["message"]


def test_trainer_gateway_fast_path_checks_key_account_job_and_method(backend):
    """Trainer calls are answered by the pure-ASGI TrainerGateway, before FastAPI routing: the same checks hold."""
    job_path = "/training/v1/rlorTrainerJobs/workbench/nope/api/v1"
    for method, rest in [("GET", "healthz"), ("POST", "retrieve_future"), ("POST", "forward")]:
        for headers in ({}, {"X-Api-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, f"{backend.base_url}{job_path}/{rest}", headers=headers, json={}, timeout=60)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (method, rest, r.text)
        r = httpx.request(method, f"{backend.base_url}{job_path}/{rest}", headers=backend.headers(), json={},
                          timeout=60)
        assert r.status_code == 404 and "workbench/nope" in r.json()["error"]["message"], (method, rest, r.text)
    r = backend.post("/training/v1/rlorTrainerJobs/other/nope/api/v1/forward", json={})
    assert r.status_code == 404 and "other/nope" in r.json()["error"]["message"]
    r = httpx.put(f"{backend.base_url}{job_path}/forward", headers=backend.headers(), timeout=60)
    assert r.status_code == 405 and "PUT" in r.json()["error"]["message"]


def test_trainer_prefixed_control_plane_paths(backend):
    # R1.2: a service client built on a trainer endpoint calls /v1/... under the trainer prefix.
    r = backend.get("/training/v1/rlorTrainerJobs/workbench/anyjob/v1/accounts?pageSize=2")
    assert r.status_code == 200 and r.json()["accounts"][0]["name"] == "accounts/workbench"


def test_idle_trainer_pauses_after_its_inactivity_timeout_and_resumes(backend):
    import time

    from fireworks.training.sdk import TrainerJobConfig

    mgr = backend.trainer_manager()
    created = mgr.create(TrainerJobConfig(base_model=TINY, lora_rank=0, learning_rate=1e-3, inactivity_timeout="3s"))
    mgr.wait_for_ready(created.job_id, timeout_s=600)  # a loaded machine starts trainers slowly
    job = backend.get(f"/v1/accounts/workbench/rlorTrainerJobs/{created.job_id}").json()
    assert job["state"] == "JOB_STATE_RUNNING" and job["inactivityTimeout"] == "3s"
    deadline = time.time() + 300
    while time.time() < deadline and mgr.get(created.job_id)["state"] == "JOB_STATE_RUNNING":
        time.sleep(0.5)
    job = mgr.get(created.job_id)
    assert job["state"] == "JOB_STATE_PAUSED" and "inactivityTimeout" in job["status"]["message"]
    assert backend.get(f"/training/v1/rlorTrainerJobs/workbench/{created.job_id}/api/v1/healthz").status_code == 503
    mgr.reconnect_and_wait(created.job_id, timeout_s=600)
    assert mgr.get(created.job_id)["state"] == "JOB_STATE_RUNNING"
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=bad-idle",
                     json={"trainingConfig": {"baseModel": TINY}, "inactivityTimeout": "soon"})
    assert r.status_code == 400 and "inactivityTimeout" in r.json()["error"]["message"]
    mgr.delete(created.job_id)


def _raw_exchange(sock, base_url: str, key: str, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive request on an open socket; (status, body)."""
    host = base_url.split("//")[1]
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-Api-Key: {key}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n".encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the keep-alive connection"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    length = int({k.lower(): v for k, v in headers.items()}["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        rest += chunk
    return int(head.split(b" ")[1]), rest[:length]


@pytest.mark.e2e
def test_malformed_bodies_keep_the_connection(backend):
    """Each malformed body gets a JSON 4xx naming the problem, and the same keep-alive connection then
    serves a normal request (a text 500 used to drop it)."""
    import socket

    host, port = backend.base_url.split("//")[1].rsplit(":", 1)
    cases = [b'{"trainingConfig":"x"}', b"[1, 2]", b"\xff\xfe", b"[" * 50_000 + b"]" * 50_000,
             b'{"trainingConfig": {"baseModel": "accounts/workbench/models/../../x"}}']
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        for body in cases:
            for path in ("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=ka-1", "/inference/v1/completions"):
                status, answer = _raw_exchange(sock, backend.base_url, backend.api_key, "POST", path, body)
                assert 400 <= status < 500, (path, body[:40], status, answer[:200])
                assert json.loads(answer)["error"]["message"]
            status, answer = _raw_exchange(sock, backend.base_url, backend.api_key, "GET", "/v1/accounts", b"")
            assert status == 200 and b"accounts/workbench" in answer


@pytest.mark.e2e
def test_foreground_serve_uses_its_home_for_models(tmp_path):
    """`workbench serve --home DIR` (foreground, WORKBENCH_HOME pointing elsewhere) reads DIR/models.json."""
    from conftest import start_backend, stop_backend

    from workbench.models import local_path

    home = tmp_path / "given-home"
    home.mkdir()
    (home / "models.json").write_text(json.dumps({"accounts/acme/models/mine": str(local_path(TINY))}))
    b = start_backend(home, env={"WORKBENCH_HOME": str(tmp_path / "elsewhere")})
    try:
        r = b.post("/v1/accounts/workbench/deployments?deploymentId=from-catalog",
                   json={"baseModel": "accounts/acme/models/mine", "maxReplicaCount": 0})
        assert r.status_code == 200, r.text
        assert not (tmp_path / "elsewhere").exists()
    finally:
        stop_backend(b)


# Test-only fault injection, loaded as `sitecustomize` by every process of a backend started with it on
# PYTHONPATH: it patches the trainer's LocalTorchTrainer when a trainer process imports it.
FAULTS = """
import importlib.abc, importlib.util, os, pathlib, sys, time

_SLOW = os.environ.get("WB_FAULT_SLOW_SAVE_MARK")     # a sampler save touches this file, then never finishes
_FATAL = os.environ.get("WB_FAULT_FATAL_FORWARD")      # forward raises TrainerCannotContinue(this text)
_QUEUED = os.environ.get("WB_FAULT_QUEUED_DIR")        # the trainer touches <dir>/<op> as it queues an op


def _patch_backend(module):
    cls = module.LocalTorchTrainer
    if _SLOW:
        def save_sampler(self, model_id, request):
            pathlib.Path(_SLOW).touch()
            time.sleep(3600)
        cls.save_sampler = save_sampler
    if _FATAL:
        from workbench.backend.trainer.protocol import TrainerCannotContinue

        def forward(self, model_id, request):
            raise TrainerCannotContinue(_FATAL)
        cls.forward = forward


def _patch_server(module):
    if _QUEUED:
        submit = module.OrderedWorker.submit

        def recorded(self, job):
            pathlib.Path(_QUEUED, job.record.op).touch()
            return submit(self, job)
        module.OrderedWorker.submit = recorded


PATCHES = {"workbench.backend.trainer.local_torch": _patch_backend, "workbench.backend.trainer.server": _patch_server}


class _Patch(importlib.abc.MetaPathFinder):
    done = set()

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES or name in self.done:
            return None
        self.done.add(name)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)
        spec.loader.exec_module = exec_module
        return spec


if _SLOW or _FATAL or _QUEUED:
    sys.meta_path.insert(0, _Patch())
"""


def _fault_env(tmp_path, **faults) -> dict:
    folder = tmp_path / "faults"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(FAULTS)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **faults}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_trainers_die_with_a_killed_control_plane_and_resume_alone(tmp_path):
    """SIGKILL of `workbench serve` takes its trainer with it (parent-death signal); calls in flight then fail
    (within their timeout, and at once when the backend is back); a restarted backend resumes the job with
    exactly one trainer on the job directory; a trainer that cannot continue (exit 3) fails its job with
    the reason visible through the SDK, and later calls fail at once instead of retrying. (A prompt stop
    of an idle trainer is checked in test_sdk_reattaches_by_the_same_id_after_delete.)"""
    import subprocess
    import threading
    import time

    from conftest import start_backend, stop_backend
    from fireworks.training.sdk import Datum, FiretitanServiceClient, ModelInput, TrainerJobConfig, WeightSyncer

    home, port, mark, queued_ops = tmp_path / "home", _free_port(), tmp_path / "save-started", tmp_path / "queued"
    queued_ops.mkdir()
    b = start_backend(home, env=_fault_env(tmp_path, WB_FAULT_SLOW_SAVE_MARK=str(mark),
                                           WB_FAULT_QUEUED_DIR=str(queued_ops)), port=port)
    mgr = b.trainer_manager()

    created = mgr.create(TrainerJobConfig(base_model=TINY, lora_rank=0, learning_rate=1e-3, requested_job_id="crash-1"))
    endpoint = mgr.wait_for_ready(created.job_id, timeout_s=600)
    trainers = b.children()
    assert trainers
    # A save_and_hotload in flight (the sampler save never finishes here), and a forward queued behind it.
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=b.api_key)
    client = service.create_training_client(base_model=TINY, lora_rank=0)
    data = [Datum(model_input=ModelInput.from_ints([1, 17, 33, 45]), loss_fn_inputs={"target_tokens": [17, 33, 45, 2]})]
    outcome: dict = {}

    def save_and_hotload():
        try:
            WeightSyncer(policy_client=client).save_and_hotload("in-flight")
        except Exception as e:  # noqa: BLE001 - what the caller sees
            outcome["error"] = e
        outcome["done"] = time.monotonic()

    saver = threading.Thread(target=save_and_hotload, daemon=True)
    saver.start()
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert time.monotonic() < deadline and saver.is_alive(), outcome
        time.sleep(0.05)
    queued = client.forward(data, "cross_entropy")
    # The forward reached the trainer, so the save's submission was answered (the SDK submits in order) and
    # the save is waiting on its future when the control plane dies.
    while not (queued_ops / "forward").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b.proc.kill()
    b.proc.wait()
    t0 = time.monotonic()
    while any(pid_alive(pid) for pid in trainers) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    gone_after = time.monotonic() - t0
    assert not any(pid_alive(pid) for pid in trainers), "the trainer outlived its killed control plane"
    assert gone_after < 10, f"trainer took {gone_after:.1f}s to die"
    # With nothing listening, an SDK future fails within the timeout it is given.
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        queued.result(timeout=3)
    assert time.monotonic() - t0 < 20
    fatal = "injected: the accelerator is gone"
    b2 = start_backend(home, env=_fault_env(tmp_path, WB_FAULT_FATAL_FORWARD=fatal), port=port)
    try:
        # The backend is back: the in-flight save learns its request is lost (412) and raises.
        up = time.monotonic()
        saver.join(timeout=300)
        assert not saver.is_alive(), "save_and_hotload still hangs after the backend came back"
        assert "is lost: its trainer stopped" in str(outcome["error"]), outcome
        print(f"in-flight save_and_hotload raised {outcome['done'] - up:.1f}s after the backend was back")
        service.close()
        mgr2 = b2.trainer_manager()
        assert mgr2.get("crash-1")["state"] == "JOB_STATE_PAUSED"
        endpoint = mgr2.reconnect_and_wait("crash-1", timeout_s=600)
        out = subprocess.run(["pgrep", "-f", f"workbench.backend.trainer --job-dir {home}/jobs/crash-1"],
                             capture_output=True, text=True).stdout.split()
        assert len(out) == 1, out
        # A worker that cannot continue: its call raises with the reason, the trainer exits 3, the job is
        # FAILED with the reason in its status, and the next call fails at once.
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=b2.api_key)
        client = service.create_training_client(base_model=TINY, lora_rank=0)
        with pytest.raises(Exception, match=fatal):
            client.forward(data, "cross_entropy").result(timeout=300)
        deadline = time.monotonic() + 120
        while mgr2.get("crash-1")["state"] != "JOB_STATE_FAILED":
            assert time.monotonic() < deadline, mgr2.get("crash-1")
            time.sleep(0.1)
        message = mgr2.get("crash-1")["status"]["message"]
        assert "code 3" in message and fatal in message, message
        t0 = time.monotonic()
        with pytest.raises(Exception, match="412.*JOB_STATE_FAILED"):
            client.forward_backward(data, "cross_entropy").result(timeout=120)
        assert time.monotonic() - t0 < 30
        service.close()
    finally:
        stop_backend(b2)


@pytest.mark.e2e
def test_sdk_reattaches_by_the_same_id_after_delete(backend):
    """The cookbook's resume flow: delete the trainer after phase 1, create the same id in phase 2 (the delete
    of an idle trainer stops it promptly)."""
    import subprocess
    import time

    from fireworks.training.sdk import TrainerJobConfig

    mgr = backend.trainer_manager()
    config = TrainerJobConfig(base_model=TINY, lora_rank=0, learning_rate=1e-3, requested_job_id="phase-job")
    mgr.create(config)
    mgr.wait_for_ready("phase-job", timeout_s=600)
    trainers = subprocess.run(["pgrep", "-f", f"workbench.backend.trainer --job-dir {backend.home}/jobs/phase-job"],
                              capture_output=True, text=True).stdout.split()
    assert len(trainers) == 1, trainers
    t0 = time.monotonic()
    mgr.delete("phase-job")   # an idle trainer stops promptly
    assert not any(pid_alive(int(p)) for p in trainers)
    assert time.monotonic() - t0 < 10
    assert mgr.try_get("phase-job") is None  # what the SDK's managed path checks before creating again
    mgr.create(config)
    endpoint = mgr.wait_for_ready("phase-job", timeout_s=600)
    assert endpoint.job_id == "phase-job" if hasattr(endpoint, "job_id") else endpoint
    assert mgr.get("phase-job")["state"] == "JOB_STATE_RUNNING"
    mgr.delete("phase-job")


def test_weight_syncer_call_timeout_bounds_a_save_that_never_answers():
    """workbench.sdk.WeightSyncer(call_timeout=...) fails a save whose backend stays down (the SDK's own save
    would wait for ever); the fake policy client stands for that backend."""
    import threading
    import time

    from workbench.sdk import WeightSyncer

    release = threading.Event()

    class NeverAnswers:
        def save_weights_for_sampler_ext(self, name, checkpoint_type=None):
            release.wait(60)
            raise RuntimeError("released")

    syncer = WeightSyncer(policy_client=NeverAnswers(), call_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="call_timeout"):
        syncer.save_and_hotload("step-1")
    assert syncer.save_only("step-2") is None
    assert time.monotonic() - t0 < 30
    release.set()
