"""The control plane's core: its state (`ControlPlane`), lifecycle rules and the helpers every route uses.

    cp = ControlPlane(home, api_key)     # owns the Store, the Supervisor and the sweeper threads
    cp.startup(); cp.start_trainer(job_id); cp.shutdown()

The route modules (jobs.py, deployments.py, checkpoints.py, gateway.py) import only this module and
errors.py (serverless.py also uses the deployment and proxy helpers of deployments.py and gateway.py);
app.py assembles them into the FastAPI app. Nothing here imports a route module, so the
control plane has no import circles.

`ControlPlane` holds the state and the lifecycle rules (starting a trainer, restarting a crashed
deployment replica, pausing jobs across a control-plane restart). Paths come from `HomeLayout`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import Depends, Request

from workbench.checkpoints.layout import DELETING_PREFIX, HomeLayout, JobLayout, job_lock_owner
from workbench.common import ACCOUNT_ID, BodyError, parse_json_object, parse_rfc3339, rfc3339, write_json_atomic

from ..store import Store
from ..supervisor import Supervisor
from ..deployment.engines import deployment_engine, replica_command
from ..trainer.distributed.launch import trainer_topology
from .errors import ApiError, require

log = logging.getLogger("workbench.control_plane")

__all__ = ["ControlPlane", "rfc3339", "read_body_json", "field", "check_account", "settled", "delete_checkpoint_dir",
           "desired_replicas", "serving_when_stopped", "job_id_of", "JOB_STOPPED_STATES"]

TRAINER_START_TIMEOUT_S = 300
DEPLOYMENT_START_TIMEOUT_S = 300
# vLLM imports and starts its engine processes before it loads a byte: minutes on a busy CPU (seen >300 s)
VLLM_DEPLOYMENT_START_TIMEOUT_S = 1200
# A replica that crashes this many times within the window is marked FAILED instead of restarted.
MAX_REPLICA_RESTARTS, RESTART_WINDOW_S = 3, 120

SERVERLESS_ANNOTATION = "workbench/serverless-route"
"""Annotation of the deployments the serverless sampling routes start (serverless.py): which route they serve."""

JOB_STOPPED_STATES = {"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED"}


class ControlPlane:
    def __init__(self, home: Path, api_key: str):
        self.home = home
        self.layout = HomeLayout(home)
        self.api_key = api_key
        self.account = ACCOUNT_ID
        self.store = Store(self.layout.state_db)
        self.supervisor = Supervisor(home, api_key, on_exit=self._on_child_exit)
        self._restarts: dict[str, list[float]] = {}
        self._closed = threading.Event()
        # Threads waiting for a started trainer or replica; shutdown joins them before closing the store.
        self._starters: list[threading.Thread] = []
        self._starters_lock = threading.Lock()
        # job id -> time of the last request through the gateway (SDK heartbeats count: a live client
        # sends one every 10 s, so a job goes idle only once no client holds it).
        self.last_activity: dict[str, float] = {}

    # ---- paths -------------------------------------------------------------------------------
    def job_layout(self, job_id: str) -> JobLayout:
        """The job's paths; 404 for an id that cannot name a job (so it never becomes a path)."""
        try:
            return self.layout.job(job_id)
        except ValueError:
            raise ApiError(404, f"rlorTrainerJob {job_id!r} not found") from None

    def job_dir(self, job_id: str) -> Path:
        return self.job_layout(job_id).root

    def deployment_dir(self, deployment_id: str) -> Path:
        try:
            return self.layout.deployment(deployment_id).root
        except ValueError:
            raise ApiError(404, f"deployment {deployment_id!r} not found") from None

    def job_name(self, job_id: str) -> str:
        return f"accounts/{self.account}/rlorTrainerJobs/{job_id}"

    def deployment_name(self, deployment_id: str) -> str:
        return f"accounts/{self.account}/deployments/{deployment_id}"

    # ---- startup / shutdown ------------------------------------------------------------------
    def startup(self) -> None:
        # Processes do not survive a control-plane restart. Jobs that were running become PAUSED
        # (`reconnect_and_wait` resumes them); deployments that were serving come back on their last good
        # snapshot, and only those (see `serving_when_stopped`).
        for job in self.store.list("jobs"):
            if job["state"] in ("JOB_STATE_RUNNING", "JOB_STATE_CREATING", "JOB_STATE_PENDING"):
                self.set_job_state(job_id_of(job), "JOB_STATE_PAUSED",
                                   "paused: the workbench backend restarted; resume to continue")
        for dep in self.store.list("deployments"):
            deployment_id = dep["name"].split("/")[-1]
            if SERVERLESS_ANNOTATION in (dep.get("annotations") or {}) and desired_replicas(dep) > 0:
                # serverless samplers (serverless.py) come back when a completion needs them, not at start
                self.store.update("deployments", deployment_id, maxReplicaCount=0, updateTime=rfc3339())
                self.set_deployment_state(deployment_id, "READY", "scaled to zero until a serverless sample needs it")
            elif serving_when_stopped(dep):
                self.start_deployment(deployment_id)
        threading.Thread(target=self._sweep_expired_checkpoints, name="ttl-sweeper", daemon=True).start()
        threading.Thread(target=self._pause_idle_trainers, name="idle-sweeper", daemon=True).start()

    def shutdown(self) -> None:
        self._closed.set()
        self.supervisor.stop_all()
        # The starters see their children gone and `_closed` set, and return without touching the state:
        # a start cut short by the shutdown is not a failure.
        deadline = time.monotonic() + 10.0
        with self._starters_lock:
            starters = list(self._starters)
        for thread in starters:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.store.close()

    def _start_waiter(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        with self._starters_lock:
            self._starters = [t for t in self._starters if t.is_alive()] + [thread]

    # ---- trainer jobs ------------------------------------------------------------------------
    def set_job_state(self, job_id: str, state: str, message: str = "") -> dict | None:
        return self.store.update("jobs", job_id, state=state, updateTime=rfc3339(),
                                 status={"code": "OK" if state != "JOB_STATE_FAILED" else "INTERNAL",
                                         "message": message})

    def start_trainer(self, job_id: str) -> None:
        """Spawn the job's trainer process; a background thread flips the state to RUNNING when it serves."""
        job = self.store.get("jobs", job_id)
        layout = self.job_layout(job_id)
        job_dir = layout.root
        job_dir.mkdir(parents=True, exist_ok=True)
        config = job["trainingConfig"]
        write_json_atomic(layout.config_file, {
            "job_id": job_id, "account": self.account, "base_model": config["baseModel"],
            "lora_rank": int(config.get("loraRank") or 0), "learning_rate": config.get("learningRate"),
            "max_context_length": config.get("maxContextLength"), "home": str(self.home),
            "delta_format": (job.get("extraValues") or {}).get("compression_format"),
            "forward_only": bool(job.get("forwardOnly")), **trainer_topology(job)})
        self.set_job_state(job_id, "JOB_STATE_CREATING", "starting trainer process")
        args = ["-m", "workbench.backend.trainer", "--job-dir", str(job_dir)]
        own = {c.pid for c in self.supervisor.children()}
        owner = job_lock_owner(layout)
        # The common case spawns at once; a directory still owned by a process we did not start (a
        # trainer of a crashed control plane, still shutting down) is first waited for or killed, in the
        # background thread: a job directory has one live trainer at a time.
        stale = owner is not None and owner not in own
        child = None if stale else self.supervisor.start("trainer", job_id, args, job_dir)

        def wait() -> None:
            nonlocal child
            try:
                if child is None:
                    evict_stale_owner(layout)
                    child = self.supervisor.start("trainer", job_id, args, job_dir)
                child.wait_ready(TRAINER_START_TIMEOUT_S)
            except Exception as e:  # exited or timed out: the job failed to start
                if self._closed.is_set():
                    return   # the backend is stopping: the next start pauses the job (see `startup`)
                if child is not None and self.supervisor.get("trainer", job_id) is child:
                    self.supervisor.stop("trainer", job_id)
                current = self.store.get("jobs", job_id)
                if current and current["state"] == "JOB_STATE_CREATING":
                    self.set_job_state(job_id, "JOB_STATE_FAILED", f"trainer failed to start: {e}")
                return
            current = self.store.get("jobs", job_id)
            if current and current["state"] == "JOB_STATE_CREATING" and self.supervisor.get("trainer", job_id) is child:
                self.set_job_state(job_id, "JOB_STATE_RUNNING", "")

        self._start_waiter(wait, f"start-trainer-{job_id}")

    def stop_trainer(self, job_id: str) -> None:
        self.supervisor.stop("trainer", job_id)

    # ---- deployments -------------------------------------------------------------------------
    def set_deployment_state(self, deployment_id: str, state: str, message: str = "") -> dict | None:
        return self.store.update("deployments", deployment_id, state=state, updateTime=rfc3339(),
                                 status={"code": "OK" if state != "FAILED" else "INTERNAL", "message": message})

    def start_deployment(self, deployment_id: str) -> None:
        dep = self.store.get("deployments", deployment_id)
        layout = self.layout.deployment(deployment_id)
        run_dir = layout.root
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(layout.config_file, {
            "deployment_id": deployment_id, "account": self.account, "base_model": dep["baseModel"],
            "home": str(self.home)})
        if dep["state"] != "READY":
            self.set_deployment_state(deployment_id, "CREATING", "starting replica")
        try:   # the built-in engine, or vLLM in its own environment (deployment/engines.py)
            engine = deployment_engine(dep)
            python, args, env = replica_command(engine, run_dir)
        except (RuntimeError, ValueError) as e:
            self.set_deployment_state(deployment_id, "FAILED", f"replica failed to start: {e}")
            return
        timeout = VLLM_DEPLOYMENT_START_TIMEOUT_S if engine == "vllm" else DEPLOYMENT_START_TIMEOUT_S
        child = self.supervisor.start("deployment", deployment_id, args, run_dir, python=python, extra_env=env)

        def wait() -> None:
            try:
                port = child.wait_ready(timeout)
                self._wait_replica_ready(child, port, timeout)
            except Exception as e:
                if self._closed.is_set():
                    # The backend is stopping, not the replica failing: the deployment keeps its state, so
                    # the next `serve` starts it again (a FAILED one would stay down).
                    return
                if self.supervisor.get("deployment", deployment_id) is child:
                    self.supervisor.stop("deployment", deployment_id)
                if self.store.get("deployments", deployment_id):
                    self.set_deployment_state(deployment_id, "FAILED", f"replica failed to start: {e}")
                return
            if self.store.get("deployments", deployment_id) and self.supervisor.get("deployment", deployment_id) is child:
                self.set_deployment_state(deployment_id, "READY", "")

        self._start_waiter(wait, f"start-deployment-{deployment_id}")

    def _wait_replica_ready(self, child, port: int, timeout: float) -> None:
        """Return once the replica's /healthz says `ready` (its weights are loaded and it samples); raise
        with its `startup_error` if it reports one, or if it exits or times out first. The port file only
        means "HTTP is up": the model loads in the background after it."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=10.0) as client:
            while time.monotonic() < deadline:
                if child.popen.poll() is not None:
                    raise RuntimeError(f"replica exited with code {child.popen.returncode}")
                try:
                    health = client.get(f"http://127.0.0.1:{port}/healthz", headers={"X-Api-Key": self.api_key}).json()
                except (httpx.HTTPError, ValueError):
                    health = {}
                if health.get("startup_error"):
                    raise RuntimeError(f"replica reported a startup error: {health['startup_error']}")
                if health.get("ready"):
                    return
                # One small request to the loading replica per look; every interval is READY latency.
                if self._closed.wait(0.05):
                    raise RuntimeError("control plane shutting down")
        raise TimeoutError(f"replica not ready after {timeout:.0f}s")

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
                idle = now - max(self.last_activity.get(job_id, 0.0), parse_rfc3339(job["updateTime"]))
                if idle > float(str(timeout).rstrip("s")):
                    self.stop_trainer(job_id)
                    self.set_job_state(job_id, "JOB_STATE_PAUSED",
                                       f"paused after {idle:.0f}s without requests (inactivityTimeout {timeout}); "
                                       "resume the job to continue from its last saved state")

    # ---- checkpoint TTL ----------------------------------------------------------------------
    def _sweep_expired_checkpoints(self) -> None:
        from workbench.checkpoints.manifest import read_manifest

        while not self._closed.wait(1.0):
            now = time.time()
            for job in self.layout.all_jobs():
                for root in job.checkpoint_roots:
                    for ckpt_dir in (root.iterdir() if root.is_dir() else ()):
                        if ckpt_dir.name.startswith("."):
                            continue  # staging or being deleted
                        meta = read_manifest(ckpt_dir)
                        expire = meta.get("expire_time") if meta else None
                        if isinstance(expire, (int, float)) and expire <= now:
                            delete_checkpoint_dir(ckpt_dir)


STALE_OWNER_WAIT_S = 10.0
"""How long a resume waits for the previous owner of a job directory to exit before killing it."""


def evict_stale_owner(layout: JobLayout) -> None:
    """Return once no live process holds the job's lock: wait for the owner to exit, then SIGKILL it if it
    is a workbench trainer of this directory. RuntimeError if the directory stays owned."""
    deadline = time.monotonic() + STALE_OWNER_WAIT_S
    owner = job_lock_owner(layout)
    while owner is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        owner = job_lock_owner(layout)
    if owner is None:
        return
    if owner > 0 and _is_trainer_of(owner, layout.root):
        log.warning("job %s: killing stale trainer pid %d that still owns %s", layout.job_id, owner, layout.root)
        try:
            os.kill(owner, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 60
        while job_lock_owner(layout) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if job_lock_owner(layout) is None:
            return
    raise RuntimeError(f"job directory {layout.root} is still owned by process {owner} "
                       f"(see {layout.lock_file}); stop it and resume again")


def _is_trainer_of(pid: int, job_dir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"workbench.backend.trainer" in argv and str(job_dir).encode() in argv


def delete_checkpoint_dir(path: Path) -> None:
    """Remove a checkpoint so it is never seen half-deleted: rename out of the listing first."""
    graveyard = path.parent / f"{DELETING_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, graveyard)
    except OSError:
        return
    shutil.rmtree(graveyard, ignore_errors=True)


def job_id_of(job: dict) -> str:
    return job["name"].split("/")[-1]


def desired_replicas(dep: dict) -> int:
    return 1 if int(dep.get("maxReplicaCount", 1) or 0) > 0 else 0


def serving_when_stopped(dep: dict) -> bool:
    """Whether a starting backend brings this deployment's replica back: it was serving (READY with a
    replica) or being started or updated for serving (CREATING, UPDATING) when the backend stopped. Not one
    scaled to zero (READY, "scaled to zero", no replica wanted), FAILED, or deleted (it has no row)."""
    return dep.get("state") in ("READY", "CREATING", "UPDATING") and desired_replicas(dep) > 0


def read_body_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it (see `parse_json_object`)."""
    try:
        return parse_json_object(raw)
    except BodyError as e:
        raise ApiError(400, str(e)) from None


_KIND_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def field(body: dict, name: str, kind: str, *, where: str = "", default=None, minimum=None, maximum=None):
    """`body[name]` checked to be a JSON `kind` ("string", "boolean", "integer", "number", "object", "array")
    within [minimum, maximum]; `default` when absent or null. A 400 naming the field otherwise."""
    label = f"{where}.{name}" if where else name
    value = body.get(name)
    if value is None:
        return default
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, _KIND_TYPES[kind])
    article = "an" if kind[0] in "aeiou" else "a"
    require(ok, 400, f"{label} must be {article} {'finite ' if kind == 'number' else ''}{kind} (got {_show(value)})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"between {minimum} and {maximum}" if minimum is not None and maximum is not None
                  else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ApiError(400, f"{label} must be {bounds} (got {_show(value)})")
    return value


SETTLE_WAIT_S = 20.0


def check_account(cp: ControlPlane, account: str) -> None:
    require(account == cp.account, 404, f"account {account!r} not found (the local account is {cp.account!r})")


def plane(request) -> ControlPlane:
    """The control plane serving `request` (route modules reach state only through this)."""
    return request.app.state.cp


def account_plane(request: Request, account: str) -> ControlPlane:
    """FastAPI dependency of every `/v1/accounts/{account}/...` route: the control plane, once `account` is
    the local one (404 naming it otherwise)."""
    cp = plane(request)
    check_account(cp, account)
    return cp


AccountPlane = Annotated[ControlPlane, Depends(account_plane)]
"""A route parameter `cp: AccountPlane` is the control plane with the path's `{account}` checked."""


async def settled(get, transitional_state: str) -> dict:
    """`get()` once the resource leaves `transitional_state`, or after SETTLE_WAIT_S.

    Holding the GET briefly lets the SDK's wait loops (5-15 s poll intervals) see READY/RUNNING on
    their first poll instead of sleeping a whole interval; the client's GET timeout is 30 s.
    """
    resource = get()
    deadline = time.monotonic() + SETTLE_WAIT_S   # real time: on a loaded machine each sleep overshoots
    while resource["state"] == transitional_state and time.monotonic() < deadline:
        # 20 ms: a store read is ~0.1 ms, and the interval is latency on every create -> RUNNING/READY.
        await asyncio.sleep(0.02)
        resource = get()
    return resource
