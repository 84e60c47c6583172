"""The run's trainer job and deployments: their handles, and how they are created, reconnected and awaited.

    trainer = run.trainer(base_model=..., lora_rank=0)   # Trainer: created, or reconnected from run.json
    deployment = run.deployment("colors-serving")        # Deployment: waits for both, one progress line each
    trainer.client; deployment.current_snapshot(); deployment.sampler()

`Trainer` and `Deployment` wrap the official SDK objects (`TrainerJobManager`, `FiretitanServiceClient`,
`DeploymentManager`, `DeploymentSampler`). `Provisioning` is the `Run`'s collaborator that provisions them
(`run.trainer`, `run.deployment`), waits for readiness in threads (`wait_for`), and answers the lookups the
other collaborators use (`require_trainer`, `get_deployment`). It receives a `RunContext` (common.py) and
nothing else. Reconnecting is the normal path: the trainer job id is written to run.json before the create
request, a stopped job is resumed, a gone one replaced (its history stays in the lineage), a deployment
scaled to zero is scaled back up, and a deployment attached to another run's trainer is re-attached to this
one.
"""

from __future__ import annotations

import secrets
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from workbench.common import default_training_shape
from workbench.records import DeploymentRecord, TrainerRecord

from .common import POLL_S, RunContext, _now_iso, _short_state, _slug
from .progress import ProgressLines, WaitCancelled, wait_all

RESUMABLE_STATES = ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED")
GONE_STATES = ("JOB_STATE_DELETED", "JOB_STATE_DELETING")


def _cancellable(manager, cancel: threading.Event, status: dict, key: str, method: str):
    """Make `manager.<method>` (the SDK's per-poll GET) check `cancel` and report the state it read."""
    original = getattr(manager, method)

    def checked(*args, **kwargs):
        if cancel.is_set():
            raise WaitCancelled()
        data = original(*args, **kwargs)
        state = data.get("state") if isinstance(data, dict) else getattr(data, "state", None)
        if state:
            status[key] = state
        return data

    setattr(manager, method, checked)
    return manager


# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Trainer:
    """The run's trainer job: the official SDK objects plus workbench's extensions.

    `client` is a `workbench.sdk.TrainingClient` around the SDK's `FiretitanTrainingClient` (everything is the
    SDK's own behaviour, plus `ttl_seconds` on saves); `sdk_client` is the unwrapped one; `service` the
    `FiretitanServiceClient`; `manager` the `TrainerJobManager`; `endpoint` the `TrainerServiceEndpoint`.
    """

    owner: "Provisioning" = field(repr=False)
    job_id: str
    job_name: str
    base_model: str
    lora_rank: int
    learning_rate: float
    training_shape: str | None
    created: bool = False
    """True if this call created the job, False if it reconnected to the run's existing one."""
    resumed_from: str | None = None
    """The stopped state the job was resumed from during reconnect, if any."""
    endpoint: Any = field(default=None, repr=False)
    service: Any = field(default=None, repr=False)
    sdk_client: Any = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)
    _pending: Callable | None = field(default=None, repr=False)

    @property
    def manager(self):
        return self.owner.ctx.clients.trainers

    @property
    def client(self):
        """The training client (waits for the trainer first if it is not ready yet)."""
        if self._client is None:
            self.wait()
        return self._client

    @property
    def ready(self) -> bool:
        return self._client is not None

    def wait(self) -> "Trainer":
        if self._client is None:
            self.owner.wait_for([self])
        return self

    def state(self) -> str:
        return self.manager.get(self.job_id).get("state", "?")

    def _label(self) -> str:
        how = "created" if self.created else "reconnected"
        if self.resumed_from:
            how = f"resumed from {_short_state(self.resumed_from)}"
        return how

    def __repr__(self) -> str:
        ready = "ready" if self.ready else "not ready"
        return (f"Trainer({self.job_id}, {self.base_model}, lora_rank={self.lora_rank}, "
                f"{ready}, {self._label()})")


@dataclass(eq=False)
class Deployment:
    """One of the run's deployments: the SDK's `DeploymentManager` and `DeploymentInfo`, plus helpers."""

    owner: "Provisioning" = field(repr=False)
    deployment_id: str
    base_model: str
    created: bool = False
    info: Any = field(default=None, repr=False)
    _pending: Callable | None = field(default=None, repr=False)
    _syncer: Any = field(default=None, repr=False)
    _syncer_client: Any = field(default=None, repr=False)
    _needs_reattach: bool = field(default=False, repr=False)

    @property
    def manager(self):
        return self.owner.ctx.clients.deployments

    @property
    def model(self) -> str:
        """The inference model string: `accounts/<a>/deployments/<id>`."""
        return f"accounts/{self.owner.ctx.clients.account_id}/deployments/{self.deployment_id}"

    @property
    def ready(self) -> bool:
        return self._pending is None and self.info is not None

    def wait(self) -> "Deployment":
        if self._pending is not None:
            self.owner.wait_for([self])
        return self

    def current_snapshot(self) -> str | None:
        """The snapshot identity the deployment reports holding now (None: none loaded, the base model)."""
        status = self.manager.hotload_check_status(deployment_id=self.deployment_id, base_model=self.base_model)
        replicas = status.get("replicas") or []
        return replicas[0].get("current_snapshot_identity") if replicas else None

    def expected_snapshot(self) -> str | None:
        """The snapshot this run last hot-loaded into the deployment (None: never)."""
        last = self.owner.ctx.store.last_hotload(self.deployment_id)
        return last["snapshot"] if last else None

    def hotload_status(self) -> dict:
        """The deployment's hot-load status as the backend reports it (replicas, held snapshot, and, where the
        backend records them, the last load's timings)."""
        return self.manager.hotload_check_status(deployment_id=self.deployment_id, base_model=self.base_model)

    def sampler(self, tokenizer=None, **kwargs):
        """A `DeploymentSampler` on this deployment (the official one; the run's tokenizer by default)."""
        from fireworks.training.sdk import DeploymentSampler

        backend = self.owner.ctx.backend
        return DeploymentSampler(inference_url=backend.base_url, model=self.model, api_key=backend.api_key,
                                 tokenizer=tokenizer if tokenizer is not None else self.owner.ctx.tokenizer(),
                                 **kwargs)

    def __repr__(self) -> str:
        state = self.info.state if self.info is not None else "requested"
        return f"Deployment({self.deployment_id}, {self.base_model}, {state}, {'created' if self.created else 'reconnected'})"


# ---------------------------------------------------------------------------------------------------
class Provisioning:
    """The run's trainer job and deployments: create, reconnect, await (see the module docstring)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.trainer_handle: Trainer | None = None
        """The run's trainer in this kernel (None until `trainer()` is called)."""
        self.deployment_handles: dict[str, Deployment] = {}
        """The run's deployments in this kernel, by id."""

    # ---- trainer ---------------------------------------------------------------------------------
    def trainer(self, base_model: str | None = None, lora_rank: int | None = None,
                learning_rate: float | None = None, training_shape: str | None = None, wait: bool = False,
                **config) -> Trainer:
        """Create this run's trainer job, or reconnect to the one it already has.

        Arguments left out take the recorded job's values (so `run.trainer()` reconnects), else lora_rank=0
        and the SDK's default learning rate. Returns at once after the request; the trainer is awaited by
        `run.deployment(...)` (in parallel with the deployment), by `trainer.wait()`, or on first use of
        `trainer.client`; `wait=True` waits now. Extra keyword arguments go to the SDK's `TrainerJobConfig`.
        """
        ctx = self.ctx
        ctx.check_open()
        rec = ctx.record.trainer
        if base_model is None:
            if not rec:
                raise ValueError("base_model is required the first time, e.g. "
                                 "run.trainer(base_model='accounts/workbench/models/qwen3-tiny')")
            base_model = rec.base_model
        if lora_rank is None:
            lora_rank = rec.lora_rank if rec else 0
        if learning_rate is None:
            from fireworks.training.sdk import TrainerJobConfig

            learning_rate = (rec.learning_rate if rec else None) or TrainerJobConfig.learning_rate
        if self.trainer_handle is not None:
            t = self.trainer_handle
            if (t.base_model, t.lora_rank) != (base_model, lora_rank):
                raise ValueError(self._mismatch_text(t.job_id, t.base_model, t.lora_rank, base_model, lora_rank))
            if wait:
                t.wait()
            return t
        shape = training_shape or default_training_shape(base_model, lora_rank)
        mgr = ctx.clients.trainers
        created = False
        job = None
        if rec:
            if (rec.base_model, rec.lora_rank) != (base_model, lora_rank):
                raise ValueError(self._mismatch_text(rec.job_id, rec.base_model, rec.lora_rank, base_model, lora_rank))
            if rec.learning_rate is not None and rec.learning_rate != learning_rate:
                warnings.warn(f"this run's trainer job {rec.job_id} was created with learning_rate="
                              f"{rec.learning_rate}; the job keeps it (the AdamParams you pass to optim_step "
                              f"set the rate of each step).", stacklevel=3)
            job = mgr.try_get(rec.job_id)
            if job is None and not rec.created:
                pass  # requested but the create never completed (interrupted): create it now, same id
            elif job is None or job.get("state") in GONE_STATES:
                why = "no longer exists on this backend" if job is None else f"is {_short_state(job.get('state'))}"
                print(f"note: this run's trainer job {rec.job_id} {why}; creating a new one "
                      f"(history stays in {ctx.store.path.name}).")
                ctx.record.past_trainers.append(rec)
                rec = None
                job = None
        if not rec:
            job_id = f"{_slug(ctx.name, 40)}-{secrets.token_hex(4)}"
            rec = TrainerRecord(job_id=job_id, job_name=f"accounts/{ctx.clients.account_id}/rlorTrainerJobs/{job_id}",
                                base_model=base_model, lora_rank=lora_rank, learning_rate=learning_rate,
                                training_shape=shape, requested=_now_iso())
            # recorded before the request: a rerun after a crash finds (or re-creates) this very id
            ctx.record.trainer = rec
            ctx.save_record()
        if job is None:
            from fireworks.training.sdk import TrainerJobConfig

            profile_ref = None
            if shape:
                profile = mgr.resolve_training_profile(shape)
                profile_ref = profile.training_shape or profile.training_shape_version
            cfg = TrainerJobConfig(base_model=base_model, lora_rank=lora_rank, learning_rate=learning_rate,
                                   training_shape_ref=profile_ref, display_name=ctx.name,
                                   requested_job_id=rec.job_id, **config)
            out = mgr.create(cfg)
            rec.job_name = out.job_name
            rec.created = _now_iso()
            ctx.save_record()
            created = True
            ctx.store.record_event("trainer_created", {"job_id": rec.job_id})
        if not rec.job_name:
            rec.job_name = f"accounts/{ctx.clients.account_id}/rlorTrainerJobs/{rec.job_id}"
        t = Trainer(owner=self, job_id=rec.job_id, job_name=rec.job_name, base_model=base_model,
                    lora_rank=lora_rank, learning_rate=rec.learning_rate if rec.learning_rate is not None
                    else learning_rate, training_shape=rec.training_shape, created=created)
        t._pending = self._trainer_waiter(t, job)
        self.trainer_handle = t
        ctx.counter.step = ctx.store.last_step(t.job_id) or 0
        ctx.counter.data_consumed = ctx.store.last_data_consumed(t.job_id)
        if not created:
            ctx.store.record_event("trainer_reconnect", {"job_id": t.job_id, "state": (job or {}).get("state")})
        if wait:
            t.wait()
        return t

    @staticmethod
    def _mismatch_text(job_id, old_model, old_rank, model, rank) -> str:
        return (f"this run's trainer job {job_id} trains {old_model} with lora_rank={old_rank}, not {model} with "
                f"lora_rank={rank}. A run has one trainer: open a new run directory for a different model or "
                f"rank (wb.open('runs/<new-name>')), or call run.trainer() with the recorded settings.")

    def _trainer_waiter(self, t: Trainer, job: dict | None) -> Callable:
        def wait(cancel: threading.Event, status: dict, key: str):
            from fireworks.training.sdk import FiretitanServiceClient, TrainerJobManager

            backend = self.ctx.backend
            mgr = _cancellable(TrainerJobManager(api_key=backend.api_key, base_url=backend.base_url),
                               cancel, status, key, "get")
            state = mgr.get(t.job_id).get("state", "")
            if state in RESUMABLE_STATES:
                t.resumed_from = state
                status[key] = f"resuming from {_short_state(state)}"
                endpoint = mgr.reconnect_and_wait(t.job_id, poll_interval_s=POLL_S)
            elif state == "JOB_STATE_RUNNING":
                endpoint = mgr.reconnect_and_wait(t.job_id, poll_interval_s=POLL_S)
            else:  # creating / pending: the SDK's reconnect would sleep 10 s per poll here
                endpoint = mgr.wait_for_ready(t.job_id, job_name=t.job_name, poll_interval_s=POLL_S)
            if cancel.is_set():
                raise WaitCancelled()
            status[key] = "connecting a training client"
            service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
            sdk_client = service.create_training_client(base_model=t.base_model, lora_rank=t.lora_rank)
            from workbench.sdk import TrainingClient

            t.endpoint, t.service, t.sdk_client = endpoint, service, sdk_client
            t._client = TrainingClient(sdk_client, endpoint.base_url, backend.api_key)
            return t

        return wait

    # ---- deployments -----------------------------------------------------------------------------
    def deployment(self, deployment_id: str | None = None, base_model: str | None = None,
                   wait: bool = True, **config) -> Deployment:
        """Create a deployment linked to this run's trainer (for hot-load), or reconnect to it.

        Waits (unless `wait=False`) for it and for the trainer in parallel, one progress line each.
        Extra keyword arguments go to the SDK's `DeploymentConfig` on creation.
        """
        ctx = self.ctx
        ctx.check_open()
        from fireworks.training.sdk import DeploymentConfig

        deployments = ctx.record.deployments
        if deployment_id is None:
            deployment_id = next(iter(deployments), None) or f"{_slug(ctx.name, 50)}-serving"
        if deployment_id in self.deployment_handles:
            d = self.deployment_handles[deployment_id]
            if wait:
                self.wait_for([x for x in (self.trainer_handle, d) if x is not None])
            return d
        trainer = self.trainer_handle
        if trainer is None and ctx.record.trainer:
            trainer = self.trainer()  # the recorded one: reconnect it too
        base = base_model or (trainer.base_model if trainer else None) or (
            deployments[deployment_id].base_model if deployment_id in deployments else None)
        if base is None:
            raise ValueError("base_model is required for a deployment without a trainer (or call run.trainer first)")
        if trainer is not None and base != trainer.base_model:
            raise ValueError(f"deployment base model {base} differs from the trainer's {trainer.base_model}: "
                             "hot-loading the trainer's snapshots needs the same base model")
        mgr = ctx.clients.deployments
        existing = mgr.get(deployment_id)
        created = existing is None or existing.state in ("FAILED", "DELETED", "DELETING")
        cfg = DeploymentConfig(deployment_id=deployment_id, base_model=base,
                               hot_load_trainer_job=trainer.job_name if trainer else None,
                               min_replica_count=0, max_replica_count=1, **config)
        info = mgr.create_or_get(cfg)
        d = Deployment(owner=self, deployment_id=deployment_id, base_model=base, created=created, info=info)
        linked = info.hot_load_trainer_job
        if trainer is not None and linked != trainer.job_name:
            d._needs_reattach = True  # linked to another trainer (another run), or to none
        if existing is not None and not created:
            self._scale_up_if_needed(deployment_id)
        rec = deployments.setdefault(deployment_id, DeploymentRecord())
        rec.base_model, rec.trainer_job = base, trainer.job_name if trainer else None
        rec.created = rec.created or _now_iso()
        ctx.save_record()
        ctx.store.record_event("deployment_created" if created else "deployment_reconnect",
                                {"deployment_id": deployment_id, "trainer_job": linked})
        d._pending = self._deployment_waiter(d)
        self.deployment_handles[deployment_id] = d
        if wait:
            self.wait_for([x for x in (trainer, d) if x is not None])
        return d

    def _scale_up_if_needed(self, deployment_id: str) -> None:
        """A deployment scaled to zero keeps its record but serves nothing: scale it back to one replica."""
        clients = self.ctx.clients
        raw = clients.http("GET", f"/v1/accounts/{clients.account_id}/deployments/{deployment_id}")
        if raw.get("maxReplicaCount", 1) == 0:
            print(f"note: deployment {deployment_id} was scaled to zero; scaling it back to one replica.")
            clients.deployments.update(deployment_id, {"minReplicaCount": 0, "maxReplicaCount": 1},
                                           ["min_replica_count", "max_replica_count"])

    def _deployment_waiter(self, d: Deployment) -> Callable:
        def wait(cancel: threading.Event, status: dict, key: str):
            from fireworks.training.sdk import DeploymentManager

            backend = self.ctx.backend
            mgr = _cancellable(DeploymentManager(api_key=backend.api_key, base_url=backend.base_url),
                               cancel, status, key, "_get_deployment")
            info = mgr.wait_for_ready(d.deployment_id, poll_interval_s=POLL_S)
            if d._needs_reattach and self.trainer_handle is not None:
                status[key] = "re-attaching to this run's trainer"
                info = mgr.reattach_trainer(info, base_model=d.base_model, trainer_job_name=self.trainer_handle.job_name,
                                            timeout_s=300, poll_interval_s=POLL_S)
                d._needs_reattach = False
                d._syncer = None  # a new chain: the next sync is a full base load
            d.info = info
            return d

        return wait

    def wait_for(self, items: list) -> None:
        """Wait for pending trainer/deployment readiness in parallel, one progress line each."""
        pending = [x for x in items if x is not None and x._pending is not None]
        if not pending:
            return
        cancel = threading.Event()
        status: dict[str, str] = {}
        lines = None
        try:
            lines = ProgressLines([self._line_name(x) for x in pending])
            self._wait_lines(pending, lines, cancel, status)
        except KeyboardInterrupt:
            cancel.set()
            if lines is not None:
                lines.interrupt()
            raise
        for x in pending:
            x._pending = None
            if isinstance(x, Trainer) and x.resumed_from:
                ck = self.ctx.store.latest_state(x.job_id)
                hint = (f"run.load_state('{ck['checkpoint_id']}') continues from step {ck['step']}" if ck
                        else "no train state was saved, so training starts over from the base weights")
                print(f"note: trainer job {x.job_id} was {_short_state(x.resumed_from)} and has been resumed; its "
                      f"process restarted, so it holds the weights it restarted with, not necessarily those of "
                      f"step {self.ctx.counter.step} (the run's last logged step): {hint}.")
                self.ctx.store.record_event("trainer_resumed", {"job_id": x.job_id, "from": x.resumed_from})

    def _wait_lines(self, pending: list, lines: ProgressLines, cancel: threading.Event, status: dict) -> None:
        calls = {self._line_name(x): (lambda fn=x._pending, key=self._line_name(x): fn(cancel, status, key))
                 for x in pending}

        def describe(line: str, value) -> str:
            if isinstance(value, Trainer):
                return f"ready ({value._label()})"
            if isinstance(value, Deployment):
                return f"ready ({'created' if value.created else 'reconnected'})"
            return "ready"

        wait_all(calls, lines, status=lambda line: _short_state(status.get(line, "requested")), cancel=cancel,
                 describe=describe)

    @staticmethod
    def _line_name(x) -> str:
        return f"trainer {x.job_id}" if isinstance(x, Trainer) else f"deployment {x.deployment_id}"

    def get_deployment(self, deployment: str | Deployment | None) -> Deployment:
        """The named (or only) deployment, reconnected and ready."""
        handles = self.deployment_handles
        if isinstance(deployment, Deployment):
            return deployment.wait()
        if deployment is None:
            if not handles:
                if self.ctx.record.deployments:
                    return self.deployment(next(iter(self.ctx.record.deployments)))
                raise RuntimeError("this run has no deployment: call run.deployment('<id>') first")
            if len(handles) > 1:
                raise ValueError(f"this run has several deployments ({', '.join(handles)}): pass deployment='<id>'")
            return next(iter(handles.values())).wait()
        if deployment not in handles:
            return self.deployment(deployment)
        return handles[deployment].wait()

    def require_trainer(self) -> Trainer:
        """The run's trainer, reconnected and ready."""
        if self.trainer_handle is None:
            if self.ctx.record.trainer:
                return self.trainer().wait()
            raise RuntimeError("this run has no trainer: call run.trainer(base_model=...) first")
        return self.trainer_handle.wait()
