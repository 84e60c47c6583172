"""Bounded fuzz of a deployment replica's inference and hot-load surface (hypothesis): no 5xx, every
4xx carries a JSON error with a message, and the replica still answers afterwards.

In-process (starlette TestClient) against the real built-in replica on the embedded tiny model, so the
real validation, engine and hot-load code run; bodies mix well-formed and hostile values (huge and
non-finite numbers, wrong types, lone surrogates, deep nesting, unknown fields).
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from workbench import models
from workbench.backend.deployment.builtin import BuiltinReplica
from workbench.backend.deployment.server import create_app

TINY = models.DEFAULT_MODEL
MODEL = "accounts/x/deployments/fuzz"
KEY = {"X-Api-Key": "k", "content-type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz")
    replica = BuiltinReplica(home / "dep", {"deployment_id": "fuzz", "account": "x", "base_model": TINY,
                                            "home": str(home)})
    (home / "dep").mkdir()
    replica.start()
    deadline = time.time() + 600
    while not replica.ready:
        assert replica.startup_error is None and time.time() < deadline, replica.startup_error
        time.sleep(0.05)
    with TestClient(create_app(replica, api_key="k")) as c:
        yield c
    replica.stop()


weird = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([10 ** 30, -1, 0, 1, 2 ** 31]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                  st.sampled_from(["\udcff", "hi \ud800", "truncate", "error"]),
                  st.lists(st.integers(-3, 600), max_size=6), st.just({"a": [1]}))
small_int = st.one_of(st.integers(0, 4), weird)
fields = {
    "model": st.one_of(st.just(MODEL), weird),
    "prompt": st.one_of(st.lists(st.integers(0, 511), min_size=1, max_size=12), st.text(min_size=1, max_size=40),
                        weird),
    "max_tokens": small_int, "n": small_int, "temperature": weird, "top_p": weird, "top_k": weird,
    "seed": weird, "stop": st.one_of(weird, st.lists(st.text(max_size=3), max_size=3)), "logprobs": weird,
    "top_logprobs": small_int, "echo": weird, "echo_last": small_int, "stream": st.booleans(),
    "raw_output": weird, "context_length_exceeded_behavior": weird, "ignore_eos": weird,
    "perf_metrics_in_response": weird, "bogus_field": weird,
}
bodies = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": fields["prompt"]},
                               optional={k: v for k, v in fields.items() if k not in ("model", "prompt")})


def check(r):
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies)
def test_completions_fuzz_never_5xx(client, body):
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 4:
        body["n"] = 4                      # keep each example quick; n's range is checked below
    raw = json.dumps(body, allow_nan=True)  # NaN/Infinity literals: Python's json accepts them on input
    check(client.post("/inference/v1/completions", content=raw, headers=KEY))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.one_of(st.binary(max_size=64), st.just(b"[" * 20000), st.just(b'{"prompt": "\\udcff"}'),
                     st.just(b"\xff\xfe\xfd")),
       path=st.sampled_from(["/inference/v1/completions", "/v1/completions", "/hot_load/v1/models/hot_load"]))
def test_raw_bodies_never_5xx(client, raw, path):
    check(client.post(path, content=raw, headers=KEY))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.fixed_dictionaries({}, optional={"identity": weird, "reset_prompt_cache": weird,
                                                "incremental_snapshot_metadata": st.one_of(weird, st.fixed_dictionaries(
                                                    {"previous_snapshot_identity": weird}))}),
       source=st.one_of(st.none(), st.sampled_from(["/", "/etc", "gs://b/p", "file:///tmp", "relative/x"])),
       drain=st.one_of(st.none(), st.sampled_from(["true", "no"])))
def test_hotload_fuzz_never_5xx(client, body, source, drain):
    headers = dict(KEY)
    if source is not None:
        headers["x-fireworks-hot-load-source-url"] = source
    if drain is not None:
        headers["x-workbench-hotload-drain"] = drain
    check(client.post("/hot_load/v1/models/hot_load", content=json.dumps(body, allow_nan=True), headers=headers))


def test_still_serving_after_fuzz(client):
    assert client.get("/healthz", headers=KEY).json()["ready"] is True
    r = client.post("/inference/v1/completions", headers=KEY,
                    content=json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3}))
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
