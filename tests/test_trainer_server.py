"""The trainer's HTTP server against a small fake `TrainerBackend` (no model, no subprocess; ~1 s).

Proves the seam (server.py needs nothing but the protocol) and the failure rules of the futures queue:
one failed operation fails its own future only, BaseException subclasses included (torch's
`CheckpointException` on a full disk is one); a backend that cannot continue fails every later
future with the reason and asks the process to exit.
"""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient
from torch.distributed.checkpoint.api import CheckpointException

from workbench.backend.trainer import protocol as p
from workbench.backend.trainer.server import create_app

KEY = "k-test"
H = {"x-api-key": KEY}


class FakeBackend:
    """Records calls; `fail_next` makes the next save_state raise the given exception."""

    def __init__(self):
        self.models: set[str] = set()
        self.calls: list[tuple[str, object]] = []
        self.fail_next: BaseException | None = None

    @property
    def limits(self) -> p.ModelLimits:
        return p.ModelLimits(vocab_size=100, max_context_length=32)

    def has_model(self, model_id):
        return model_id in self.models

    def create_model(self, model_id, request):
        self.models.add(model_id)
        return {"type": "create_model", "model_id": model_id}

    def unload_model(self, model_id):
        self.models.discard(model_id)
        return {"type": "unload_model", "model_id": model_id}

    def get_info(self, model_id):
        if model_id not in self.models:
            raise p.UserError(f"model_id {model_id!r} is not loaded")
        return {"type": "get_info", "model_id": model_id}

    def capabilities(self):
        return {"supported_models": []}

    def forward(self, model_id, request):
        self.calls.append(("forward", request))
        return {"loss_fn_outputs": [], "metrics": {"n": float(len(request.data))}}

    forward_backward = forward

    def optim_step(self, model_id, request):
        self.calls.append(("optim_step", request))
        return {"metrics": {"learning_rate:mean": request.learning_rate}}

    def save_state(self, model_id, name):
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.calls.append(("save_state", name))
        return {"type": "save_weights", "path": name}

    def load_state(self, model_id, ref, with_optimizer):
        return {"type": "load_weights", "path": ref.raw}

    def save_sampler(self, model_id, request):
        return {"type": "save_weights_for_sampler", "path": request.name}

    def load_adapter(self, model_id, adapter_path):
        return {"type": "load_adapter"}

    def list_checkpoints(self):
        return []

    def close(self):
        pass


def _result(client: TestClient, rid: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = client.post("/api/v1/retrieve_future", json={"request_id": rid}, headers=H).json()
        if out.get("type") != "try_again":
            return out
    raise AssertionError(f"future {rid} never completed")


def _op(client: TestClient, path: str, body: dict) -> dict:
    r = client.post(f"/api/v1/{path}", json=body, headers=H)
    assert r.status_code == 200, r.text
    return _result(client, r.json()["request_id"])


@pytest.fixture
def served():
    backend = FakeBackend()
    fatal: list[str] = []
    app = create_app(backend, KEY, long_poll_s=2.0, on_fatal=fatal.append)
    with TestClient(app) as client:
        r = client.post("/api/v1/create_model", json={"base_model": "x"}, headers=H).json()
        assert _result(client, r["request_id"]) == {"type": "create_model", "model_id": r["model_id"]}
        model_id = r["model_id"]
        yield client, backend, model_id, fatal


def test_fake_backend_satisfies_the_protocol():
    assert isinstance(FakeBackend(), p.TrainerBackend)


def test_a_checkpoint_exception_fails_its_future_only_and_the_trainer_keeps_serving(served):
    client, backend, model_id, fatal = served
    # CheckpointException subclasses BaseException: it used to kill the worker thread for good.
    assert issubclass(CheckpointException, BaseException) and not issubclass(CheckpointException, Exception)
    backend.fail_next = CheckpointException("save", {0: (OSError(28, "No space left on device"), None)})
    out = _op(client, "save_weights", {"model_id": model_id, "path": "step-1", "seq_id": 1})
    assert out["category"] == "server" and "CheckpointException" in out["error"]
    assert "No space left on device" in out["error"]
    out = _op(client, "save_weights", {"model_id": model_id, "path": "step-1", "seq_id": 2})
    assert out == {"type": "save_weights", "path": "step-1"}
    out = _op(client, "optim_step", {"model_id": model_id, "seq_id": 3, "adam_params": {"learning_rate": 0.5}})
    assert out["metrics"]["learning_rate:mean"] == 0.5
    assert fatal == []


def test_wire_validation_happens_in_protocol_and_is_a_user_error(served):
    client, backend, model_id, _ = served
    out = _op(client, "optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": {"beta1": 1.5}})
    assert out["category"] == "user" and "adam_params.beta1" in out["error"]
    out = _op(client, "forward", {"model_id": model_id, "seq_id": 2, "forward_input": {
        "loss_fn": "cross_entropy", "data": [{"model_input": {"chunks": [{"tokens": [1, 500]}]},
                                               "loss_fn_inputs": {"target_tokens": {"data": [1, 2],
                                                                                    "dtype": "int64"}}}]}})
    assert out["category"] == "user" and "data[0].model_input token 500" in out["error"]
    assert backend.calls == []          # nothing invalid reached the backend


def test_a_backend_that_cannot_continue_fails_later_futures_and_asks_to_exit(served):
    client, backend, model_id, fatal = served
    backend.fail_next = p.TrainerCannotContinue("rank 1 died")
    out = _op(client, "save_weights", {"model_id": model_id, "path": "a", "seq_id": 1})
    assert out["category"] == "server" and "rank 1 died" in out["error"]
    deadline = time.monotonic() + 30
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fatal and "rank 1 died" in fatal[0]
    out = _op(client, "save_weights", {"model_id": model_id, "path": "b", "seq_id": 2})
    assert out["category"] == "server" and "not run" in out["error"] and "rank 1 died" in out["error"]


def test_http_errors_carry_json_bodies_and_plain_routes_answer(served):
    """The app is plain Starlette (no FastAPI): unknown paths, wrong methods, bad bodies and a missing key
    still answer the gRPC-style JSON error the SDK parses, and the parameterless GET routes answer."""
    client, _backend, _model_id, _fatal = served
    r = client.post("/api/v1/no_such_op", json={}, headers=H)
    assert r.status_code == 404 and "no trainer endpoint POST /api/v1/no_such_op" in r.json()["error"]["message"]
    r = client.get("/api/v1/forward_backward", headers=H)
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = client.post("/api/v1/create_model", content=b"{not json", headers=H)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.get("/api/v1/healthz")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert client.get("/api/v1/healthz", headers=H).json() == {"status": "ok"}
    assert client.get("/api/v1/get_server_capabilities", headers=H).json() == {"supported_models": []}
    assert client.get("/api/v1/list_checkpoints", headers=H).json() == {"checkpoints": []}
