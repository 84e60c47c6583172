"""Shared fixtures: a real `workbench serve` in a temporary home, driven over real HTTP.

    def test_something(backend):            # one backend per test module
        backend.base_url, backend.api_key, backend.home
        backend.trainer_manager()            # official TrainerJobManager on it

Every test is marked `unit` or `e2e` (registered in pyproject.toml) when collected: `e2e` if it says so,
uses a real backend fixture, or lives in a module of E2E_MODULES (tests that start trainers, replicas,
kernels or browsers themselves); `unit` otherwise. `pytest` runs both; `pytest -m unit` only the fast,
in-process ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in every process of the test run (trainers, replicas and this one): the CI machine
# has 2 cores shared by several processes, where oversubscribed threads are ~20x slower, and exact
# weight comparisons need the same thread count on both sides (reductions differ by thread count).
os.environ.setdefault("WORKBENCH_TRAINER_THREADS", "1")
os.environ.setdefault("WORKBENCH_DEPLOYMENT_THREADS", "1")  # the replica default too; explicit for symmetry
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

E2E_MODULES = {"test_cli", "test_deployment_process", "test_notebook_browser", "test_notebook_restart",
               "test_notebook_widgets", "test_recipes_learning", "test_recipes_sft", "test_sdk_checkpoints",
               "test_sdk_research_loop", "test_sdk_trainer", "test_trainer_process"}
E2E_FIXTURES = {"backend", "recipe_backend"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        e2e = (item.get_closest_marker("e2e") is not None or module in E2E_MODULES
               or bool(E2E_FIXTURES & set(getattr(item, "fixturenames", ()))))
        item.add_marker(pytest.mark.e2e if e2e else pytest.mark.unit)


TINY = "accounts/workbench/models/qwen3-tiny"
TINY_SHAPE = "accounts/workbench/trainingShapes/qwen3-tiny-cpu"


@dataclass
class Backend:
    base_url: str
    api_key: str
    home: Path
    proc: subprocess.Popen

    def headers(self) -> dict:
        return {"X-Api-Key": self.api_key}

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers(), timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base_url + path, headers=self.headers(), timeout=60, **kw)

    def trainer_manager(self):
        from fireworks.training.sdk import TrainerJobManager

        return TrainerJobManager(api_key=self.api_key, base_url=self.base_url)

    def deployment_manager(self):
        from fireworks.training.sdk import DeploymentManager

        return DeploymentManager(api_key=self.api_key, base_url=self.base_url)

    def start_policy_and_deployment(self, deployment_id: str, *, base_model: str = TINY,
                                    training_shape: str = TINY_SHAPE, lora_rank: int = 0,
                                    deployment_shape: str | None = None, **job_kwargs) -> dict:
        """Seed 003's set-up: a trainer job and a deployment hot-loading from it, requested and awaited in
        parallel, then a training client on the trainer. Returns rlor, deploy (the SDK managers), job_id,
        job_name, deployment_id, service and client; the caller closes `service`."""
        from concurrent.futures import ThreadPoolExecutor

        from fireworks.training.sdk import DeploymentConfig, FiretitanServiceClient, TrainerJobConfig

        rlor, deploy = self.trainer_manager(), self.deployment_manager()
        profile = rlor.resolve_training_profile(training_shape)
        created = rlor.create(TrainerJobConfig(base_model=base_model, training_shape_ref=profile.training_shape,
                                               lora_rank=lora_rank, **{"learning_rate": 1e-3, **job_kwargs}))
        shape = {"deployment_shape": deployment_shape} if deployment_shape else {}
        info = deploy.create_or_get(DeploymentConfig(deployment_id=deployment_id, base_model=base_model,
                                                     hot_load_trainer_job=created.job_name,
                                                     min_replica_count=0, max_replica_count=1, **shape))
        with ThreadPoolExecutor(max_workers=2) as pool:
            endpoint_f = pool.submit(rlor.wait_for_ready, created.job_id, poll_interval_s=1, timeout_s=600)
            ready_f = pool.submit(deploy.wait_for_ready, info.deployment_id, poll_interval_s=1)
            endpoint = endpoint_f.result()
            ready_f.result()
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=self.api_key)
        client = service.create_training_client(base_model=base_model, lora_rank=lora_rank)
        return dict(rlor=rlor, deploy=deploy, job_id=created.job_id, job_name=created.job_name,
                    deployment_id=deployment_id, service=service, client=client)

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float = 120.0, what: str = "condition", interval: float = 0.1):
    """The first truthy value of `predicate()`; AssertionError naming `what` after `timeout` s.

    Tests wait on conditions with generous deadlines, never on fixed sleeps: the CI machine may be loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    value = predicate()
    if value:
        return value
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_backend(home: Path, env: dict | None = None, port: int = 0) -> Backend:
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", "--home", str(home), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "WORKBENCH_HOME": str(home), **(env or {})})
    deadline = time.time() + 300   # a loaded CI machine can take minutes to import torch + FastAPI
    while time.time() < deadline:
        info_file = home / "server.json"
        if info_file.exists():
            info = json.loads(info_file.read_text())
            if info.get("pid") == proc.pid:
                return Backend(info["base_url"], (home / "api_key").read_text().strip(), home, proc)
        if proc.poll() is not None:
            raise RuntimeError((home / "serve.log").read_text())
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("workbench serve did not start")


def stop_backend(backend: Backend) -> None:
    if backend.proc.poll() is None:
        backend.proc.send_signal(signal.SIGTERM)
        try:
            backend.proc.wait(30)
        except subprocess.TimeoutExpired:
            backend.proc.kill()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = start_backend(tmp_path_factory.mktemp("wbhome"))
    yield b
    stop_backend(b)


@pytest.fixture(scope="module")
def recipe_backend(tmp_path_factory):
    """A backend the recipes find through FIREWORKS_BASE_URL / FIREWORKS_API_KEY, as a user's would."""
    saved = {k: os.environ.get(k) for k in ("FIREWORKS_BASE_URL", "FIREWORKS_API_KEY")}
    b = start_backend(tmp_path_factory.mktemp("wbhome-recipes"))
    os.environ["FIREWORKS_BASE_URL"], os.environ["FIREWORKS_API_KEY"] = b.base_url, b.api_key
    try:
        yield b
    finally:
        stop_backend(b)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
