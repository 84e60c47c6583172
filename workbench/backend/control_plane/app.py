"""The control plane: one FastAPI app that owns every resource and fronts every process.

    app = create_app(home)            # served by `workbench serve` (workbench/cli.py) with uvicorn

It serves the Fireworks REST surface (`/v1/accounts/...`: trainer jobs, training shapes, checkpoints,
promotion, operations, models, deployments) and is the single entry point clients talk to: the
gateway routes (gateway.py) proxy trainer, hot-load and inference traffic to the processes that the
`Supervisor` starts. State lives in SQLite (`Store`); checkpoint files live under `jobs/<job>/`.

`ControlPlane` holds that state and the lifecycle rules (starting a trainer, restarting a crashed
deployment replica, pausing jobs across a control-plane restart). The route modules (jobs.py,
deployments.py, checkpoints.py, gateway.py) are thin HTTP layers over it.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from ..home import ACCOUNT_ID, ensure_api_key, write_json_atomic
from ..store import Store
from ..supervisor import Supervisor
from .errors import ApiError, api_error_handler, error_response, validation_error_handler

TRAINER_START_TIMEOUT_S = 300
DEPLOYMENT_START_TIMEOUT_S = 300
# A replica that crashes this many times within the window is marked FAILED instead of restarted.
MAX_REPLICA_RESTARTS, RESTART_WINDOW_S = 3, 120

JOB_STOPPED_STATES = {"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED"}


def rfc3339(t: float | None = None) -> str:
    """UTC timestamp with fixed microsecond precision, so string order equals time order."""
    return datetime.fromtimestamp(time.time() if t is None else t, tz=timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


class ControlPlane:
    def __init__(self, home: Path, api_key: str):
        self.home = home
        self.api_key = api_key
        self.account = ACCOUNT_ID
        self.store = Store(home / "state.db")
        self.supervisor = Supervisor(home, api_key, on_exit=self._on_child_exit)
        self._restarts: dict[str, list[float]] = {}
        self._closed = threading.Event()
        # job id -> time of the last request through the gateway (SDK heartbeats count: a live client
        # sends one every 10 s, so a job goes idle only once no client holds it).
        self.last_activity: dict[str, float] = {}

    # ---- paths -------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.home / "jobs" / job_id

    def deployment_dir(self, deployment_id: str) -> Path:
        return self.home / "deployments" / deployment_id

    def job_name(self, job_id: str) -> str:
        return f"accounts/{self.account}/rlorTrainerJobs/{job_id}"

    def deployment_name(self, deployment_id: str) -> str:
        return f"accounts/{self.account}/deployments/{deployment_id}"

    # ---- startup / shutdown ------------------------------------------------------------------
    def startup(self) -> None:
        # Processes do not survive a control-plane restart. Jobs that were running become PAUSED
        # (`reconnect_and_wait` resumes them); deployments come back on their last good snapshot.
        for job in self.store.list("jobs"):
            if job["state"] in ("JOB_STATE_RUNNING", "JOB_STATE_CREATING", "JOB_STATE_PENDING"):
                self.set_job_state(job_id_of(job), "JOB_STATE_PAUSED",
                                   "paused: the workbench backend restarted; resume to continue")
        for dep in self.store.list("deployments"):
            if dep["state"] in ("READY", "CREATING", "UPDATING") and desired_replicas(dep) > 0:
                self.start_deployment(dep["name"].split("/")[-1])
        threading.Thread(target=self._sweep_expired_checkpoints, name="ttl-sweeper", daemon=True).start()
        threading.Thread(target=self._pause_idle_trainers, name="idle-sweeper", daemon=True).start()

    def shutdown(self) -> None:
        self._closed.set()
        self.supervisor.stop_all()
        self.store.close()

    # ---- trainer jobs ------------------------------------------------------------------------
    def set_job_state(self, job_id: str, state: str, message: str = "") -> dict | None:
        return self.store.update("jobs", job_id, state=state, updateTime=rfc3339(),
                                 status={"code": "OK" if state != "JOB_STATE_FAILED" else "INTERNAL",
                                         "message": message})

    def start_trainer(self, job_id: str) -> None:
        """Spawn the job's trainer process; a background thread flips the state to RUNNING when it serves."""
        job = self.store.get("jobs", job_id)
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        config = job["trainingConfig"]
        write_json_atomic(job_dir / "job.json", {
            "job_id": job_id, "account": self.account, "base_model": config["baseModel"],
            "lora_rank": int(config.get("loraRank") or 0), "learning_rate": config.get("learningRate"),
            "max_context_length": config.get("maxContextLength"), "home": str(self.home)})
        self.set_job_state(job_id, "JOB_STATE_CREATING", "starting trainer process")
        child = self.supervisor.start("trainer", job_id, ["-m", "workbench.backend.trainer", "--job-dir", str(job_dir)],
                                      job_dir)

        def wait() -> None:
            try:
                child.wait_ready(TRAINER_START_TIMEOUT_S)
            except Exception as e:  # exited or timed out: the job failed to start
                if self.supervisor.get("trainer", job_id) is child:
                    self.supervisor.stop("trainer", job_id)
                current = self.store.get("jobs", job_id)
                if current and current["state"] == "JOB_STATE_CREATING":
                    self.set_job_state(job_id, "JOB_STATE_FAILED", f"trainer failed to start: {e}")
                return
            current = self.store.get("jobs", job_id)
            if current and current["state"] == "JOB_STATE_CREATING" and self.supervisor.get("trainer", job_id) is child:
                self.set_job_state(job_id, "JOB_STATE_RUNNING", "")

        threading.Thread(target=wait, name=f"start-trainer-{job_id}", daemon=True).start()

    def stop_trainer(self, job_id: str) -> None:
        self.supervisor.stop("trainer", job_id)

    # ---- deployments -------------------------------------------------------------------------
    def set_deployment_state(self, deployment_id: str, state: str, message: str = "") -> dict | None:
        return self.store.update("deployments", deployment_id, state=state, updateTime=rfc3339(),
                                 status={"code": "OK" if state != "FAILED" else "INTERNAL", "message": message})

    def start_deployment(self, deployment_id: str) -> None:
        dep = self.store.get("deployments", deployment_id)
        run_dir = self.deployment_dir(deployment_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "deployment.json", {
            "deployment_id": deployment_id, "account": self.account, "base_model": dep["baseModel"],
            "home": str(self.home)})
        if dep["state"] != "READY":
            self.set_deployment_state(deployment_id, "CREATING", "starting replica")
        child = self.supervisor.start("deployment", deployment_id,
                                      ["-m", "workbench.backend.deployment", "--deployment-dir", str(run_dir)], run_dir)

        def wait() -> None:
            try:
                child.wait_ready(DEPLOYMENT_START_TIMEOUT_S)
            except Exception as e:
                if self.supervisor.get("deployment", deployment_id) is child:
                    self.supervisor.stop("deployment", deployment_id)
                if self.store.get("deployments", deployment_id):
                    self.set_deployment_state(deployment_id, "FAILED", f"replica failed to start: {e}")
                return
            if self.store.get("deployments", deployment_id) and self.supervisor.get("deployment", deployment_id) is child:
                self.set_deployment_state(deployment_id, "READY", "")

        threading.Thread(target=wait, name=f"start-deployment-{deployment_id}", daemon=True).start()

    def reconcile_replicas(self, deployment_id: str) -> None:
        """Start or stop the replica so it matches the deployment's replica counts."""
        dep = self.store.get("deployments", deployment_id)
        running = self.supervisor.get("deployment", deployment_id) is not None
        if desired_replicas(dep) == 0 and running:
            self.supervisor.stop("deployment", deployment_id)
        elif desired_replicas(dep) > 0 and not running and dep["state"] != "FAILED":
            self.start_deployment(deployment_id)

    # ---- crashes -----------------------------------------------------------------------------
    def _on_child_exit(self, kind: str, key: str, code: int, tail: str) -> None:
        if self._closed.is_set():
            return
        if kind == "trainer":
            job = self.store.get("jobs", key)
            if job and job["state"] in ("JOB_STATE_RUNNING", "JOB_STATE_CREATING"):
                self.set_job_state(key, "JOB_STATE_FAILED",
                                   f"trainer process exited unexpectedly (code {code}); resume the job to "
                                   f"restart it from its last saved state.\n{tail}")
        elif kind == "deployment":
            dep = self.store.get("deployments", key)
            if not dep or desired_replicas(dep) == 0:
                return
            now = time.time()
            recent = [t for t in self._restarts.get(key, []) if now - t < RESTART_WINDOW_S] + [now]
            self._restarts[key] = recent
            if len(recent) > MAX_REPLICA_RESTARTS:
                self.set_deployment_state(key, "FAILED", f"replica crashed {len(recent)} times in "
                                          f"{RESTART_WINDOW_S}s (last exit code {code}):\n{tail}")
                return
            # Restart on the last good snapshot (the replica reloads it from its state.json).
            self.start_deployment(key)

    # ---- idle trainers -----------------------------------------------------------------------
    def _pause_idle_trainers(self) -> None:
        """Pause RUNNING jobs idle longer than their `inactivityTimeout` (only when the job set one:
        locally a trainer's memory is cheap and its unsaved weights are not, so the default is never)."""
        while not self._closed.wait(1.0):
            now = time.time()
            for job in self.store.list("jobs"):
                timeout = job.get("inactivityTimeout")
                if job["state"] != "JOB_STATE_RUNNING" or not timeout or job.get("disableInactivityCleanup"):
                    continue
                job_id = job_id_of(job)
                idle = now - max(self.last_activity.get(job_id, 0.0), _epoch(job["updateTime"]))
                if idle > float(str(timeout).rstrip("s")):
                    self.stop_trainer(job_id)
                    self.set_job_state(job_id, "JOB_STATE_PAUSED",
                                       f"paused after {idle:.0f}s without requests (inactivityTimeout {timeout}); "
                                       "resume the job to continue from its last saved state")

    # ---- checkpoint TTL ----------------------------------------------------------------------
    def _sweep_expired_checkpoints(self) -> None:
        from workbench.checkpoints.manifest import read_manifest

        while not self._closed.wait(1.0):
            jobs_root = self.home / "jobs"
            if not jobs_root.exists():
                continue
            now = time.time()
            for ckpt_dir in list(jobs_root.glob("*/checkpoints/*")) + list(jobs_root.glob("*/sampler/*")):
                meta = read_manifest(ckpt_dir)
                if meta and meta.get("expire_time") and meta["expire_time"] <= now:
                    delete_checkpoint_dir(ckpt_dir)


def delete_checkpoint_dir(path: Path) -> None:
    """Remove a checkpoint so it is never seen half-deleted: rename out of the listing first."""
    graveyard = path.parent / f".deleting-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, graveyard)
    except OSError:
        return
    shutil.rmtree(graveyard, ignore_errors=True)


def _epoch(rfc3339_time: str) -> float:
    return datetime.strptime(rfc3339_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def job_id_of(job: dict) -> str:
    return job["name"].split("/")[-1]


def desired_replicas(dep: dict) -> int:
    return 1 if int(dep.get("maxReplicaCount", 1) or 0) > 0 else 0


def create_app(home: Path, api_key: str | None = None) -> FastAPI:
    from . import checkpoints, deployments, gateway, jobs

    api_key = api_key or ensure_api_key(home)
    cp = ControlPlane(home, api_key)
    app = FastAPI(title="workbench control plane", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cp = cp
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.on_event("startup")
    async def _startup() -> None:
        # Long-polls (retrieve_future, SSE) pass through the proxy: no read timeout here.
        app.state.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                           limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        cp.startup()

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        await app.state.http.aclose()
        cp.shutdown()

    app.add_middleware(AuthAndPrefixMiddleware, api_key=api_key, key_file=home / "api_key")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    for module in (jobs, deployments, checkpoints, gateway):
        app.include_router(module.router)
    return app


class AuthAndPrefixMiddleware:
    """Pure ASGI middleware (no buffering, so SSE and long-polls stream through untouched).

    1. Every request must carry the key, as `X-Api-Key` or `Authorization: Bearer` (the SDK uses both).
    2. R1.2: a client built on a trainer endpoint reaches control-plane and inference paths under the
       trainer prefix; anything there that is not the Tinker surface (`/api/...`) is served un-prefixed.
    """

    def __init__(self, app, api_key: str, key_file: Path):
        self.app = app
        self.api_key = api_key.encode()
        self.key_file = key_file

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        supplied = headers.get("x-api-key")
        if supplied is None and headers.get("authorization", "").lower().startswith("bearer "):
            supplied = headers["authorization"][7:].strip()
        if supplied is None or not hmac.compare_digest(supplied.encode(), self.api_key):
            response = error_response(401, "missing or wrong API key: send it as X-Api-Key or Authorization: "
                                           f"Bearer (a local backend keeps it in {self.key_file})")
            return await response(scope, receive, send)
        from .gateway import strip_trainer_prefix

        rewritten = strip_trainer_prefix(scope["path"])
        if rewritten is not None:
            scope = dict(scope, path=rewritten, raw_path=rewritten.encode())
        return await self.app(scope, receive, send)


def read_body_json(raw: bytes) -> dict:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body
