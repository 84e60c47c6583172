"""The control plane's answers to bad input, driven in-process (no trainer or replica processes).

The app is the real one; only the two calls that would spawn processes are replaced by a fake that sets
the state a started process would reach, so hundreds of requests run in seconds. What is checked: no
5xx for anything a client can send, every 4xx is the JSON error shape naming the field, nothing is
written when a request is refused, a full disk is 507, the service answers afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from workbench.backend.control_plane.app import create_app
from workbench.checkpoints.layout import HomeLayout

TINY = "accounts/workbench/models/qwen3-tiny"
A = "/v1/accounts/workbench"
KEY = "wb-test-key"


@pytest.fixture()
def cp_client(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    from workbench.backend.home import resolve_home

    home = resolve_home(tmp_path / "home")
    app = create_app(home, KEY)
    cp = app.state.cp
    # The fake process side: a started trainer/replica is RUNNING/READY at once.
    monkeypatch.setattr(cp, "start_trainer", lambda job_id: cp.set_job_state(job_id, "JOB_STATE_RUNNING"))
    monkeypatch.setattr(cp, "start_deployment", lambda dep_id: cp.set_deployment_state(dep_id, "READY"))
    monkeypatch.setattr(cp, "reconcile_replicas", lambda dep_id: None)
    with TestClient(app, headers={"X-Api-Key": KEY}, raise_server_exceptions=False) as client:
        client.cp = cp
        client.home = home
        yield client


def assert_error(r, status: int, *names: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    message = body["error"]["message"]
    assert body["error"]["status"] and isinstance(body["error"]["code"], int)
    for name in names:
        assert name in message, (name, message)
    return message


def make_job(client, job_id="j1", **config):
    r = client.post(f"{A}/rlorTrainerJobs?rlorTrainerJobId={job_id}",
                    json={"trainingConfig": {"baseModel": TINY, **config}})
    assert r.status_code == 200, r.text
    return r.json()


def make_sampler_checkpoint(home, job_id="j1", name="snap-1", **manifest):
    d = HomeLayout(home).job(job_id).sampler(name)
    d.mkdir(parents=True)
    # a real (tiny) base: detection skips a base whose safetensors header is unreadable or lacks config.json
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2, dtype=torch.bfloat16)}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    meta = {"name": name, "kind": "sampler", "created_time": time.time(), "expire_time": None, **manifest}
    (d / "workbench_checkpoint.json").write_text(json.dumps(meta))
    return d


MALFORMED = {
    "array": (b"[1, 2]", "JSON object"),
    "string": (b'"x"', "JSON object"),
    "invalid utf-8": (b'{"displayName": "\xff\xfe"}', "UTF-8"),
    "not json": (b"{nope", "not valid JSON"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
    "deep object": (b'{"a":' * 40 + b"1" + b"}" * 40, "nests deeper"),
    "infinity": (b'{"ttl": Infinity}', "Infinity"),
    "nan": (b'{"trainingConfig": {"learningRate": NaN}}', "NaN"),
}
BODY_ROUTES = [("POST", f"{A}/rlorTrainerJobs?rlorTrainerJobId=m1"), ("POST", f"{A}/deployments?deploymentId=d1"),
               ("PATCH", f"{A}/deployments/d0"), ("PATCH", f"{A}/rlorTrainerJobs/j1/checkpoints/snap-1"),
               ("POST", f"{A}/checkpoints/snap-1:promote"), ("POST", "/inference/v1/completions")]


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bodies_are_400_naming_the_problem(cp_client, case):
    make_job(cp_client)
    make_sampler_checkpoint(cp_client.home)
    assert cp_client.post(f"{A}/deployments?deploymentId=d0", json={"baseModel": TINY}).status_code == 200
    raw, words = MALFORMED[case]
    for method, path in BODY_ROUTES:
        r = cp_client.request(method, path, content=raw, headers={"Content-Type": "application/json"})
        assert_error(r, 400, words)
    assert cp_client.get(f"{A}/rlorTrainerJobs/j1").status_code == 200  # the service still answers


@pytest.mark.parametrize("body, names", [
    ({"trainingConfig": "x"}, ["trainingConfig", "object"]),
    ({"trainingConfig": {"baseModel": TINY, "loraRank": True}}, ["trainingConfig.loraRank", "integer"]),
    ({"trainingConfig": {"baseModel": TINY, "loraRank": 10**30}}, ["trainingConfig.loraRank"]),
    ({"trainingConfig": {"baseModel": TINY, "loraRank": -1}}, ["trainingConfig.loraRank"]),
    ({"trainingConfig": {"baseModel": TINY, "learningRate": "fast"}}, ["trainingConfig.learningRate"]),
    ({"trainingConfig": {"baseModel": TINY, "maxContextLength": 1.5}}, ["trainingConfig.maxContextLength"]),
    ({"trainingConfig": {"baseModel": 7}}, ["trainingConfig.baseModel"]),
    ({"trainingConfig": {"baseModel": TINY}, "serviceMode": "yes"}, ["serviceMode", "boolean"]),
    ({"trainingConfig": {"baseModel": TINY}, "displayName": ["x"]}, ["displayName"]),
    ({"trainingConfig": {"baseModel": TINY}, "forwardOnly": 1}, ["forwardOnly"]),
    ({"trainingConfig": {"baseModel": TINY}, "inactivityTimeout": 1e308}, ["inactivityTimeout"]),
    ({"trainingConfig": {"baseModel": "accounts/workbench/models/../../../../tmp/x"}}, ["trainingConfig.baseModel"]),
])
def test_job_fields_are_typed(cp_client, body, names):
    r = cp_client.post(f"{A}/rlorTrainerJobs?rlorTrainerJobId=t1", json=body)
    assert_error(r, 400, *names)
    assert cp_client.cp.store.get("jobs", "t1") is None  # nothing stored


@pytest.mark.parametrize("body, names", [
    ({"baseModel": TINY, "maxReplicaCount": 1e30}, ["maxReplicaCount", "integer"]),
    ({"baseModel": TINY, "maxReplicaCount": 10**30}, ["maxReplicaCount"]),
    ({"baseModel": TINY, "minReplicaCount": -1}, ["minReplicaCount"]),
    ({"baseModel": TINY, "minReplicaCount": 2, "maxReplicaCount": 1}, ["minReplicaCount", "maxReplicaCount"]),
    ({"baseModel": TINY, "enableHotLoad": "yes"}, ["enableHotLoad", "boolean"]),
    ({"baseModel": TINY, "annotations": "x"}, ["annotations"]),
    ({"baseModel": TINY, "hotLoadTrainerJob": 5}, ["hotLoadTrainerJob"]),
    ({"baseModel": None}, ["baseModel"]),
    ({"baseModel": "accounts/workbench/models/.."}, ["baseModel"]),
])
def test_deployment_fields_are_typed(cp_client, body, names):
    r = cp_client.post(f"{A}/deployments?deploymentId=d1", json=body)
    assert_error(r, 400, *names)
    assert cp_client.cp.store.get("deployments", "d1") is None


def test_deployment_update_types_are_checked(cp_client):
    assert cp_client.post(f"{A}/deployments?deploymentId=d1", json={"baseModel": TINY}).status_code == 200
    assert_error(cp_client.patch(f"{A}/deployments/d1", json={"maxReplicaCount": "2"}), 400, "maxReplicaCount")
    assert_error(cp_client.patch(f"{A}/deployments/d1?updateMask=max_replica_count",
                                 json={"maxReplicaCount": True}), 400, "maxReplicaCount")
    r = cp_client.patch(f"{A}/deployments/d1?updateMask=display_name", json={})
    assert r.status_code == 200 and r.json()["displayName"] == ""
    assert cp_client.get(f"{A}/deployments/d1").json()["maxReplicaCount"] == 1


@pytest.mark.parametrize("bad", ["abc\n", "abc%0A", "ABC", "a_b", "-ab", "x" * 64])
def test_ids_are_full_matched(cp_client, bad):
    r = cp_client.post(f"{A}/rlorTrainerJobs", params={"rlorTrainerJobId": bad}, json={"trainingConfig": {"baseModel": TINY}})
    assert_error(r, 400, "rlorTrainerJobId")
    r = cp_client.post(f"{A}/deployments", params={"deploymentId": bad}, json={"baseModel": TINY})
    assert_error(r, 400, "deploymentId")
    assert not (cp_client.home / "jobs").exists() or not any((cp_client.home / "jobs").iterdir())
    # A path id that cannot be a job is simply not found, never a path.
    in_path = quote(bad, safe="")
    assert cp_client.get(f"{A}/rlorTrainerJobs/{in_path}/checkpoints").status_code == 404
    assert cp_client.patch(f"{A}/rlorTrainerJobs/{in_path}/checkpoints/x", json={"ttl": 5}).status_code == 404


def test_embedded_model_name_with_dotdot_creates_nothing(cp_client, tmp_path):
    for name in ["accounts/workbench/models/../escape", "accounts/workbench/models/..", "accounts/x/models/../y"]:
        r = cp_client.post(f"{A}/rlorTrainerJobs?rlorTrainerJobId=e1", json={"trainingConfig": {"baseModel": name}})
        assert_error(r, 400, "trainingConfig.baseModel")
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.name.startswith(("..", "escape")) for p in cache.rglob("*"))


def test_ttl_is_validated_before_anything_is_written(cp_client):
    make_job(cp_client)
    d = make_sampler_checkpoint(cp_client.home)
    before = (d / "workbench_checkpoint.json").read_text()
    for ttl in [1e308, "1e308", -5, 0, True, "forever", [], {"s": 1}, 10**400 if False else 2e9]:
        assert_error(cp_client.patch(f"{A}/rlorTrainerJobs/j1/checkpoints/snap-1", json={"ttl": ttl}), 400, "ttl")
    assert_error(cp_client.patch(f"{A}/rlorTrainerJobs/j1/checkpoints/snap-1",
                                 content=b'{"ttl": Infinity}', headers={"Content-Type": "application/json"}), 400)
    assert (d / "workbench_checkpoint.json").read_text() == before
    r = cp_client.patch(f"{A}/rlorTrainerJobs/j1/checkpoints/snap-1", json={"ttl": "3600s"})
    assert r.status_code == 200 and r.json()["expireTime"].endswith("Z")


def test_listing_skips_a_bad_manifest_and_keeps_the_rest(cp_client, caplog):
    make_job(cp_client)
    make_sampler_checkpoint(cp_client.home, name="good-1")
    make_sampler_checkpoint(cp_client.home, name="huge-ttl", expire_time=1e308)
    make_sampler_checkpoint(cp_client.home, name="text-ttl", expire_time="soon")
    make_sampler_checkpoint(cp_client.home, name="huge-created", created_time=1e300)
    r = cp_client.get(f"{A}/rlorTrainerJobs/j1/checkpoints")
    assert r.status_code == 200, r.text
    names = sorted(c["name"].split("/")[-1] for c in r.json()["checkpoints"])
    assert "good-1" in names and "text-ttl" in names and "huge-created" in names
    assert "huge-ttl" not in names  # its expiry cannot be written as a time: skipped, and said so
    assert any("huge-ttl" in rec.getMessage() for rec in caplog.records)


def test_full_database_is_507_and_the_service_recovers(cp_client):
    db = cp_client.cp.store._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        r = cp_client.post(f"{A}/rlorTrainerJobs?rlorTrainerJobId=full-1",
                           json={"trainingConfig": {"baseModel": TINY}, "displayName": "x" * 200_000})
        assert_error(r, 507, "full")
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")
    assert cp_client.get(f"{A}/rlorTrainerJobs").status_code == 200
    make_job(cp_client, "after-full")


def test_full_disk_on_a_file_write_is_507(cp_client, monkeypatch):
    make_job(cp_client)
    make_sampler_checkpoint(cp_client.home)
    import workbench.checkpoints.manifest as manifest

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest, "write_manifest", no_space)
    assert_error(cp_client.patch(f"{A}/rlorTrainerJobs/j1/checkpoints/snap-1", json={"ttl": 60}), 507, "disk is full")
    assert cp_client.get(f"{A}/rlorTrainerJobs/j1/checkpoints").status_code == 200


def test_forward_only_reference_on_a_lora_shape(cp_client):
    lora = f"{A}/rlorTrainerJobs?rlorTrainerJobId=ref-1&trainingShape=accounts/workbench/trainingShapes/qwen3-tiny-lora-cpu"
    r = cp_client.post(lora, json={"trainingConfig": {"loraRank": 0}, "forwardOnly": True})
    assert r.status_code == 200, r.text
    assert r.json()["forwardOnly"] is True and r.json()["trainingConfig"]["baseModel"] == TINY
    job_json = json.loads(HomeLayout(cp_client.home).job("ref-1").config_file.read_text()) \
        if HomeLayout(cp_client.home).job("ref-1").config_file.exists() else None
    assert job_json is None or job_json["forward_only"] is True
    assert_error(cp_client.post(lora.replace("ref-1", "ref-2"), json={"trainingConfig": {"loraRank": 0}}),
                 400, "loraRank", "forwardOnly")
    ref = f"{A}/rlorTrainerJobs?rlorTrainerJobId=ref-3&trainingShape=accounts/workbench/trainingShapes/qwen3-tiny-ref-cpu"
    assert_error(cp_client.post(ref, json={"trainingConfig": {}}), 400, "forwardOnly")
    assert cp_client.post(ref, json={"trainingConfig": {}, "forwardOnly": True}).status_code == 200
    shapes = [s["name"].split("/")[-1] for s in cp_client.get(f"{A}/trainingShapes").json()["trainingShapes"]]
    assert {"qwen3-tiny-ref-cpu", "qwen3-small-ref-cpu", "qwen3-tiny-lora-cpu"} <= set(shapes)
    mode = cp_client.get(f"{A}/trainingShapes/qwen3-tiny-ref-cpu/versions").json()
    assert mode["trainingShapeVersions"][0]["snapshot"]["trainerMode"] == "FORWARD_ONLY"


def test_deleted_job_id_answers_404_and_can_be_created_again(cp_client):
    make_job(cp_client, "again")
    assert cp_client.delete(f"{A}/rlorTrainerJobs/again").status_code == 200
    assert_error(cp_client.get(f"{A}/rlorTrainerJobs/again"), 404, "again")
    assert "again" not in json.dumps(cp_client.get(f"{A}/rlorTrainerJobs").json())
    assert cp_client.cp.store.get("jobs", "again")["state"] == "JOB_STATE_DELETED"  # kept for promotion
    assert cp_client.get(f"{A}/rlorTrainerJobs/again/checkpoints").status_code == 200
    job = make_job(cp_client, "again")
    assert job["state"] in ("JOB_STATE_CREATING", "JOB_STATE_RUNNING")
    assert cp_client.get(f"{A}/rlorTrainerJobs/again").json()["state"] == "JOB_STATE_RUNNING"
    assert_error(cp_client.post(f"{A}/rlorTrainerJobs?rlorTrainerJobId=again",
                                json={"trainingConfig": {"baseModel": TINY}}), 409, "again")


def test_home_and_state_files_are_owner_only(cp_client):
    assert stat.S_IMODE(os.stat(cp_client.home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cp_client.home / "state.db").st_mode) == 0o600
