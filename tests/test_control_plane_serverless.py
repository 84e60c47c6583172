"""The serverless sampling routes' answers, in-process (no replica processes; see test_control_plane_inputs.py).

Sampling through them end to end, on the SDK under test and on the lowest SDK the pin admits, is in
tests/test_sdk_research_loop.py (`test_serverless_sampling_of_base_model_and_saved_snapshots`).
"""

from __future__ import annotations

from test_control_plane_inputs import A, TINY, assert_error, cp_client, make_job  # noqa: F401 - cp_client is a fixture

from workbench.backend.control_plane import serverless
from workbench.common import serverless_run_id

S = "/training/v1/serverless"


def test_sessions(cp_client):
    r = cp_client.post(f"{S}/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "x"})
    assert r.status_code == 200 and r.json()["session_id"].startswith("ts-")
    session = r.json()["session_id"]
    assert cp_client.post(f"{S}/api/v1/session_heartbeat", json={"session_id": session}).status_code == 200
    assert cp_client.post(f"{S}/api/v1/telemetry", json={"events": []}).json() == {"status": "accepted"}
    assert cp_client.post(f"{S}/api/v1/client/config", json={}).json()["pjwt_auth_enabled"] is False
    assert cp_client.delete(f"{A}/trainingSessions/{session}").status_code == 200
    # serverless training is not served: a clear answer, not a 404 the SDK would misread
    assert_error(cp_client.post(f"{S}/api/v1/create_model", json={}), 501, "trainer job")


def test_runs_are_trainer_jobs(cp_client):
    make_job(cp_client, "j1")
    run = serverless_run_id("j1")
    assert serverless.run_id_of("j1") == run and run.startswith("run-") and len(run) == 36
    for name in (run, "j1"):
        r = cp_client.get(f"{A}/trainingRuns/{name}")
        assert r.status_code == 200 and r.json()["trainerJob"] == "accounts/workbench/rlorTrainerJobs/j1"
        assert r.json()["name"] == f"accounts/workbench/trainingRuns/{run}"
    own = "run-" + "ab" * 16                          # a job whose id has the run form is its own run
    make_job(cp_client, own)
    assert cp_client.get(f"{A}/trainingRuns/{own}").json()["trainerJob"].endswith("/" + own)
    assert_error(cp_client.get(f"{A}/trainingRuns/run-{'0' * 32}"), 404, "training run")


def test_routes_start_one_deployment_each_and_name_bad_input(cp_client, monkeypatch):
    monkeypatch.setattr(serverless, "ROUTE_READY_WAIT_S", 0.2)   # the fake replica never gets a port
    make_job(cp_client, "j1")
    for body, status, name in (({}, 400, "base_model or training_run"),
                               ({"base_model": "accounts/workbench/models/nope"}, 400, "base_model"),
                               ({"base_model": 7}, 400, "base_model"),
                               ({"training_run": "j1"}, 400, "training_run"),
                               ({"training_run": "accounts/workbench/trainingRuns/nope"}, 404, "nope")):
        assert_error(cp_client.post(f"{S}/api/v1/create_sampling_route", json=body), status, name)
    assert cp_client.get(f"{A}/deployments").json()["deployments"] == []    # nothing created by a refusal
    for body in ({"base_model": TINY}, {"base_model": TINY},
                 {"training_run": f"accounts/workbench/trainingRuns/{serverless_run_id('j1')}"}):
        assert_error(cp_client.post(f"{S}/api/v1/create_sampling_route", json=body), 503, "still starting")
    deps = cp_client.get(f"{A}/deployments").json()["deployments"]
    assert sorted(d["annotations"]["workbench/serverless-route"] for d in deps) == [
        f"base_model:{TINY}", f"training_run:{serverless_run_id('j1')}"]
    assert all(d["name"].split("/")[-1].startswith("sl-") for d in deps)
    assert [d["hotLoadTrainerJob"] for d in deps if "training_run" in d["annotations"]["workbench/serverless-route"]] \
        == ["accounts/workbench/rlorTrainerJobs/j1"]


def test_completion_models_are_checked(cp_client):
    make_job(cp_client, "j1")
    run = serverless_run_id("j1")
    for model, status, text in ((None, 400, "model"), ("accounts/workbench/deployments/x", 400, "trainingSamplers"),
                                ("accounts/other/trainingSamplers/checkpoints/other/r/s", 404, "other"),
                                ("accounts/workbench/trainingSamplers/checkpoints/workbench/x", 400, "<snapshot>"),
                                (f"accounts/workbench/trainingSamplers/checkpoints/workbench/{run}/..", 400, ".."),
                                ("accounts/workbench/trainingSessions/ts-1", 400, "serverless training")):
        r = cp_client.post(f"{S}/inference/v1/completions", json={"model": model, "prompt": [1, 2]})
        assert_error(r, status, text)
