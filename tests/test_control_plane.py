"""Control-plane REST behaviour over real HTTP: auth, shapes, job and deployment validation."""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from conftest import TINY, TINY_SHAPE


def test_server_files_and_key_mode(backend):
    assert (backend.home / "server.json").exists()
    mode = stat.S_IMODE(os.stat(backend.home / "api_key").st_mode)
    assert mode == 0o600
    assert backend.base_url.startswith("http://127.0.0.1:")


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


def test_trainer_prefixed_control_plane_paths(backend):
    # R1.2: a service client built on a trainer endpoint calls /v1/... under the trainer prefix.
    r = backend.get("/training/v1/rlorTrainerJobs/workbench/anyjob/v1/accounts?pageSize=2")
    assert r.status_code == 200 and r.json()["accounts"][0]["name"] == "accounts/workbench"


def test_idle_trainer_pauses_after_its_inactivity_timeout_and_resumes(backend):
    import time

    from fireworks.training.sdk import TrainerJobConfig

    mgr = backend.trainer_manager()
    created = mgr.create(TrainerJobConfig(base_model=TINY, lora_rank=0, learning_rate=1e-3, inactivity_timeout="3s"))
    job = backend.get(f"/v1/accounts/workbench/rlorTrainerJobs/{created.job_id}").json()
    assert job["state"] == "JOB_STATE_RUNNING" and job["inactivityTimeout"] == "3s"
    deadline = time.time() + 30
    while time.time() < deadline and mgr.get(created.job_id)["state"] == "JOB_STATE_RUNNING":
        time.sleep(0.5)
    job = mgr.get(created.job_id)
    assert job["state"] == "JOB_STATE_PAUSED" and "inactivityTimeout" in job["status"]["message"]
    assert backend.get(f"/training/v1/rlorTrainerJobs/workbench/{created.job_id}/api/v1/healthz").status_code == 503
    mgr.reconnect_and_wait(created.job_id, timeout_s=120)
    assert mgr.get(created.job_id)["state"] == "JOB_STATE_RUNNING"
    r = backend.post("/v1/accounts/workbench/rlorTrainerJobs?rlorTrainerJobId=bad-idle",
                     json={"trainingConfig": {"baseModel": TINY}, "inactivityTimeout": "soon"})
    assert r.status_code == 400 and "inactivityTimeout" in r.json()["error"]["message"]
    mgr.delete(created.job_id)
