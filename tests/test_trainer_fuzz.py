"""Bounded fuzz of the trainer's HTTP surface (hypothesis; ~1 min): random and mutated request bodies
against the real server and local torch backend in-process. Never a 5xx, never a `server` future error;
every 4xx and every `user` error names the field it is about; the trainer still answers afterwards.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from workbench.backend.trainer.local_torch import LocalTorchTrainer
from workbench.backend.trainer.protocol import JobConfig
from workbench.backend.trainer.server import create_app
from workbench.models import DEFAULT_MODEL, load_model, local_path

KEY = "wb-fuzz"
H = {"x-api-key": KEY}
# What an error message may name: request fields, or the body itself.
FIELDS = ("data[", "forward_input", "forward_backward_input", "adam_params", "path", "lora_config",
          "base_model", "model_id", "loss_fn", "grad_accumulation_normalization", "checkpoint_type",
          "export_precision", "adapter_path", "seq_id", "request body", "request_id", "ttl_seconds",
          "overwrite", "weights_access_token", "projection_head_dim", "optim_step refused")

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)


def _datum():
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 17, 33]}]},
            "loss_fn_inputs": {"target_tokens": {"data": [17, 33, 2], "dtype": "int64", "shape": [3]},
                               "weights": {"data": [1.0, 1.0, 0.0], "dtype": "float32", "shape": [3]},
                               "logprobs": {"data": [-1.0, -1.0, -1.0], "dtype": "float32"},
                               "advantages": {"data": [0.5, -0.5, 1.0], "dtype": "float32"}}}


VALID = {
    "forward": lambda m: {"model_id": m, "forward_input": {"loss_fn": "cross_entropy", "data": [_datum()]}},
    "forward_backward": lambda m: {"model_id": m, "forward_backward_input": {
        "loss_fn": "ppo", "loss_fn_config": {"clip_low_threshold": 0.8}, "data": [_datum(), _datum()]}},
    "optim_step": lambda m: {"model_id": m, "adam_params": {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95,
                                                            "eps": 1e-8, "grad_clip_norm": 1.0},
                             "grad_accumulation_normalization": "num_loss_tokens"},
    "save_weights_for_sampler": lambda m: {"model_id": m, "path": "fuzz_snap", "checkpoint_type": "base"},
    "load_weights": lambda m: {"model_id": m, "path": "cross_job://other-job/step-1", "optimizer": True},
    "create_model": lambda m: {"base_model": DEFAULT_MODEL, "lora_config": {"rank": 0}},
}


def _paths(value, prefix=()):
    """Every path to a leaf or container inside a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replace(value[path[0]], path[1:], new)
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    job = JobConfig("fuzz-job", "t", DEFAULT_MODEL, 0, 1e-4, 32, home)
    backend = LocalTorchTrainer(home / "jobs" / "fuzz-job", job, load_model(DEFAULT_MODEL), local_path(DEFAULT_MODEL))
    with TestClient(create_app(backend, KEY, long_poll_s=5.0, gap_timeout_s=0.05)) as c:
        r = c.post("/api/v1/create_model", json=VALID["create_model"](None), headers=H).json()
        assert _future(c, r["request_id"]) == {"type": "create_model", "model_id": r["model_id"]}
        c.model_id = r["model_id"]
        yield c


def _future(c: TestClient, rid: str) -> dict:
    for _ in range(100):
        out = c.post("/api/v1/retrieve_future", json={"request_id": rid}, headers=H).json()
        if out.get("type") != "try_again":
            return out
    raise AssertionError("future never completed")


OUTCOMES = {"http_4xx": 0, "user": 0, "ok": 0}


def _check(c: TestClient, op: str, body) -> None:
    try:
        raw = json.dumps(body, allow_nan=True).encode()
    except (ValueError, TypeError):
        return
    r = c.post(f"/api/v1/{op}", content=raw, headers={**H, "content-type": "application/json"})
    assert r.status_code < 500, (op, body, r.text)
    if r.status_code >= 400:
        message = r.json()["error"]["message"]
        assert any(f in message for f in FIELDS), (op, body, message)
        OUTCOMES["http_4xx"] += 1
        return
    out = _future(c, r.json()["request_id"])
    if "error" in out:
        assert out["category"] == "user", (op, body, out)
        assert any(f in out["error"] for f in FIELDS), (op, body, out)
    OUTCOMES["user" if "error" in out else "ok"] += 1


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(op=st.sampled_from(sorted(VALID)), body=json_value)
def test_random_bodies(client, op, body):
    _check(client, op, body)


@FUZZ
@given(op=st.sampled_from(sorted(VALID)), data=st.data())
def test_mutated_valid_bodies(client, op, data):
    body = VALID[op](client.model_id)
    paths = [p for p in _paths(body) if p and p[0] != "model_id"]
    path = data.draw(st.sampled_from(paths))
    _check(client, op, _replace(body, path, data.draw(json_value)))


def test_still_serving_after_the_fuzz(client):
    _check(client, "forward", VALID["forward"](client.model_id))
    print("fuzz outcomes:", OUTCOMES)
    assert OUTCOMES["user"] > 0 and OUTCOMES["ok"] > 0       # the fuzz reached validation and compute
    assert client.get("/api/v1/healthz", headers=H).json() == {"status": "ok"}
