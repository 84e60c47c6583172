"""A new built-in loss is one registry entry, and the official SDK trains with it (issue 9).

The trainer runs in this process (uvicorn on a thread, real HTTP on loopback) so the entry registered
here is the one it serves; the SDK talks to it exactly as to a spawned trainer.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import uvicorn

from fireworks.training.sdk import AdamParams, Datum, FiretitanServiceClient, ModelInput
from fireworks.training.sdk._core._exceptions import RequestFailedError
from workbench.backend.trainer import losses
from workbench.backend.trainer.local_torch import LocalTorchTrainer
from workbench.backend.trainer.protocol import JobConfig
from workbench.backend.trainer.server import create_app
from workbench.models import DEFAULT_MODEL, load_model, local_path

KEY = "wb-loss-registry"


def _dro(lp, inputs, config):
    # A regularized policy-gradient loss (the shape of DRO): pull logprobs towards the sampler's,
    # weighted by beta, while following the advantages.
    return config["beta"] * (lp - inputs["logprobs"]) ** 2 - inputs["advantages"] * lp


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # The whole of adding a loss: one entry (name, required / optional inputs, config defaults, function).
    losses.register(losses.LossSpec("dro", _dro, required=("target_tokens", "logprobs", "advantages"),
                                    config_defaults={"beta": 0.5}))
    home = tmp_path_factory.mktemp("home")
    job = JobConfig("loss-job", "t", DEFAULT_MODEL, 0, 1e-4, 64, home)
    backend = LocalTorchTrainer(home / "jobs" / "loss-job", job, load_model(DEFAULT_MODEL), local_path(DEFAULT_MODEL))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(backend, KEY, long_poll_s=2.0), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "in-process trainer did not start"
        time.sleep(0.02)
    service = FiretitanServiceClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", api_key=KEY)
    try:
        yield service, backend
    finally:
        service.close()
        server.should_exit = True
        thread.join(timeout=30)
        losses.LOSSES.pop("dro", None)


def test_a_registered_loss_trains_through_the_official_sdk(served):
    service, backend = served
    tc = service.create_training_client(base_model=DEFAULT_MODEL, lora_rank=0)
    tokens, targets = [1, 17, 33, 45], [17, 33, 45, 2]
    sampling = [-1.0, -2.0, -0.5, -3.0]
    advantages = [1.0, -0.5, 2.0, 0.0]
    data = [Datum(model_input=ModelInput.from_ints(tokens),
                  loss_fn_inputs={"target_tokens": targets, "logprobs": sampling, "advantages": advantages})]
    lp = torch.tensor(tc.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist())
    out = tc.forward_backward(data, "dro", loss_fn_config={"beta": 0.25}).result()
    expected = 0.25 * (lp - torch.tensor(sampling)) ** 2 - torch.tensor(advantages) * lp
    got = torch.tensor(out.loss_fn_outputs[0]["elementwise_loss"].tolist())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(float(expected.sum()), abs=1e-4)
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    assert backend.step == 1
    # Its inputs and config are validated from the entry, like any built-in loss.
    with pytest.raises(RequestFailedError, match=r"data\[0\].loss_fn_inputs.advantages is missing"):
        bad = [Datum(model_input=ModelInput.from_ints(tokens),
                     loss_fn_inputs={"target_tokens": targets, "logprobs": sampling})]
        tc.forward_backward(bad, "dro").result()
    with pytest.raises(RequestFailedError, match="loss_fn_config.gamma is not supported by loss_fn='dro'"):
        tc.forward_backward(data, "dro", loss_fn_config={"gamma": 1.0}).result()
