"""The run's trainer job and deployments: their handles, and how they are created, reconnected and awaited.

    trainer = run.trainer(base_model=..., lora_rank=0)   # Trainer: created, or reconnected from run.json
    deployment = run.deployment("colors-serving")        # Deployment: waits for both, one progress line each
    trainer.client; deployment.current_snapshot(); deployment.sampler()

`Trainer` and `Deployment` wrap the official SDK objects (`TrainerJobManager`, `FiretitanServiceClient`,
`DeploymentManager`, `DeploymentSampler`). `ProvisioningMixin` holds the `Run` methods that provision them
(`run.trainer`, `run.deployment`) and wait for readiness in threads (`_await`), and the lookups the other
parts use (`_require_trainer`, `_get_deployment`). Reconnecting is the normal path: the trainer job id is
written to run.json before the create request, a stopped job is resumed, a gone one replaced (its history
stays in the lineage), a deployment scaled to zero is scaled back up, and a deployment attached to another
run's trainer is re-attached to this one. `Run` (run.py) mixes this in; use it through `Run`.
"""

from __future__ import annotations

import secrets
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .common import POLL_S, _now_iso, _short_state, _slug
from .progress import ProgressLines, WaitCancelled, wait_all

if TYPE_CHECKING:
    from .run import Run

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

    run: "Run" = field(repr=False)
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
        return self.run.trainer_manager

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
            self.run._await([self])
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

    run: "Run" = field(repr=False)
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
        return self.run.deployment_manager

    @property
    def model(self) -> str:
        """The inference model string: `accounts/<a>/deployments/<id>`."""
        return f"accounts/{self.run.account_id}/deployments/{self.deployment_id}"

    @property
    def ready(self) -> bool:
        return self._pending is None and self.info is not None

    def wait(self) -> "Deployment":
        if self._pending is not None:
            self.run._await([self])
        return self

    def current_snapshot(self) -> str | None:
        """The snapshot identity the deployment reports holding now (None: none loaded, the base model)."""
        status = self.manager.hotload_check_status(deployment_id=self.deployment_id, base_model=self.base_model)
        replicas = status.get("replicas") or []
        return replicas[0].get("current_snapshot_identity") if replicas else None

    def expected_snapshot(self) -> str | None:
        """The snapshot this run last hot-loaded into the deployment (None: never)."""
        last = self.run.store.last_hotload(self.deployment_id)
        return last["snapshot"] if last else None

    def sampler(self, tokenizer=None, **kwargs):
        """A `DeploymentSampler` on this deployment (the official one)."""
        from fireworks.training.sdk import DeploymentSampler

        return DeploymentSampler(inference_url=self.run.backend.base_url, model=self.model,
                                 api_key=self.run.backend.api_key,
                                 tokenizer=tokenizer if tokenizer is not None else self.run.tokenizer, **kwargs)

    def __repr__(self) -> str:
        state = self.info.state if self.info is not None else "requested"
        return f"Deployment({self.deployment_id}, {self.base_model}, {state}, {'created' if self.created else 'reconnected'})"


# ---------------------------------------------------------------------------------------------------
class ProvisioningMixin:
    """`Run`'s trainer and deployment methods (see the module docstring)."""

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
        self._check_open()
        rec = self._state.get("trainer")
        if base_model is None:
            if not rec:
                raise ValueError("base_model is required the first time, e.g. "
                                 "run.trainer(base_model='accounts/workbench/models/qwen3-tiny')")
            base_model = rec["base_model"]
        if lora_rank is None:
            lora_rank = rec.get("lora_rank", 0) if rec else 0
        if learning_rate is None:
            from fireworks.training.sdk import TrainerJobConfig

            learning_rate = (rec or {}).get("learning_rate") or TrainerJobConfig.learning_rate
        if self._trainer is not None:
            t = self._trainer
            if (t.base_model, t.lora_rank) != (base_model, lora_rank):
                raise ValueError(self._mismatch_text(t.job_id, t.base_model, t.lora_rank, base_model, lora_rank))
            if wait:
                t.wait()
            return t
        shape = training_shape or self._default_shape(base_model, lora_rank)
        mgr = self.trainer_manager
        created = False
        job = None
        if rec:
            if (rec["base_model"], rec.get("lora_rank", 0)) != (base_model, lora_rank):
                raise ValueError(self._mismatch_text(rec["job_id"], rec["base_model"], rec.get("lora_rank", 0),
                                                     base_model, lora_rank))
            if rec.get("learning_rate") is not None and rec["learning_rate"] != learning_rate:
                warnings.warn(f"this run's trainer job {rec['job_id']} was created with learning_rate="
                              f"{rec['learning_rate']}; the job keeps it (the AdamParams you pass to optim_step "
                              f"set the rate of each step).", stacklevel=2)
            job = mgr.try_get(rec["job_id"])
            if job is None and not rec.get("created"):
                pass  # requested but the create never completed (interrupted): create it now, same id
            elif job is None or job.get("state") in GONE_STATES:
                why = "no longer exists on this backend" if job is None else f"is {_short_state(job.get('state'))}"
                print(f"note: this run's trainer job {rec['job_id']} {why}; creating a new one "
                      f"(history stays in {self.store.path.name}).")
                self._state.setdefault("past_trainers", []).append(rec)
                rec = None
                job = None
        if not rec:
            job_id = f"{_slug(self.name, 40)}-{secrets.token_hex(4)}"
            rec = {"job_id": job_id, "job_name": f"accounts/{self.account_id}/rlorTrainerJobs/{job_id}",
                   "base_model": base_model, "lora_rank": lora_rank, "learning_rate": learning_rate,
                   "training_shape": shape, "requested": _now_iso()}
            # recorded before the request: a rerun after a crash finds (or re-creates) this very id
            self._state["trainer"] = rec
            self._save_state()
        if job is None:
            from fireworks.training.sdk import TrainerJobConfig

            profile_ref = None
            if shape:
                profile = mgr.resolve_training_profile(shape)
                profile_ref = profile.training_shape or profile.training_shape_version
            cfg = TrainerJobConfig(base_model=base_model, lora_rank=lora_rank, learning_rate=learning_rate,
                                   training_shape_ref=profile_ref, display_name=self.name,
                                   requested_job_id=rec["job_id"], **config)
            out = mgr.create(cfg)
            rec["job_name"] = out.job_name
            rec["created"] = _now_iso()
            self._save_state()
            created = True
            self.store.record_event("trainer_created", {"job_id": rec["job_id"]})
        if not rec.get("job_name"):
            rec["job_name"] = f"accounts/{self.account_id}/rlorTrainerJobs/{rec['job_id']}"
        t = Trainer(run=self, job_id=rec["job_id"], job_name=rec["job_name"], base_model=base_model,
                    lora_rank=lora_rank, learning_rate=rec.get("learning_rate", learning_rate),
                    training_shape=rec.get("training_shape"), created=created)
        t._pending = self._trainer_waiter(t, job)
        self._trainer = t
        self.step = self.store.last_step(t.job_id) or 0
        self.data_consumed = self.store.last_data_consumed(t.job_id)
        if not created:
            self.store.record_event("trainer_reconnect", {"job_id": t.job_id, "state": (job or {}).get("state")})
        if wait:
            t.wait()
        return t

    @staticmethod
    def _mismatch_text(job_id, old_model, old_rank, model, rank) -> str:
        return (f"this run's trainer job {job_id} trains {old_model} with lora_rank={old_rank}, not {model} with "
                f"lora_rank={rank}. A run has one trainer: open a new run directory for a different model or "
                f"rank (wb.open('runs/<new-name>')), or call run.trainer() with the recorded settings.")

    @staticmethod
    def _default_shape(base_model: str, lora_rank: int) -> str | None:
        prefix = "accounts/workbench/models/"
        if base_model.startswith(prefix):
            name = base_model[len(prefix):]
            return f"accounts/workbench/trainingShapes/{name}{'-lora' if lora_rank else ''}-cpu"
        return None

    def _trainer_waiter(self, t: Trainer, job: dict | None) -> Callable:
        def wait(cancel: threading.Event, status: dict, key: str):
            from fireworks.training.sdk import FiretitanServiceClient, TrainerJobManager

            mgr = _cancellable(TrainerJobManager(api_key=self.backend.api_key, base_url=self.backend.base_url),
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
            service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=self.backend.api_key)
            sdk_client = service.create_training_client(base_model=t.base_model, lora_rank=t.lora_rank)
            from workbench.sdk import TrainingClient

            t.endpoint, t.service, t.sdk_client = endpoint, service, sdk_client
            t._client = TrainingClient(sdk_client, endpoint.base_url, self.backend.api_key)
            return t

        return wait

    # ---- deployments -----------------------------------------------------------------------------
    def deployment(self, deployment_id: str | None = None, base_model: str | None = None,
                   wait: bool = True, **config) -> Deployment:
        """Create a deployment linked to this run's trainer (for hot-load), or reconnect to it.

        Waits (unless `wait=False`) for it and for the trainer in parallel, one progress line each.
        Extra keyword arguments go to the SDK's `DeploymentConfig` on creation.
        """
        self._check_open()
        from fireworks.training.sdk import DeploymentConfig

        deployments = self._state.setdefault("deployments", {})
        if deployment_id is None:
            deployment_id = next(iter(deployments), None) or f"{_slug(self.name, 50)}-serving"
        if deployment_id in self._deployments:
            d = self._deployments[deployment_id]
            if wait:
                self._await([x for x in (self._trainer, d) if x is not None])
            return d
        trainer = self._trainer
        if trainer is None and self._state.get("trainer"):
            trainer = self.trainer()  # the recorded one: reconnect it too
        base = base_model or (trainer.base_model if trainer else None) or deployments.get(deployment_id, {}).get(
            "base_model")
        if base is None:
            raise ValueError("base_model is required for a deployment without a trainer (or call run.trainer first)")
        if trainer is not None and base != trainer.base_model:
            raise ValueError(f"deployment base model {base} differs from the trainer's {trainer.base_model}: "
                             "hot-loading the trainer's snapshots needs the same base model")
        mgr = self.deployment_manager
        existing = mgr.get(deployment_id)
        created = existing is None or existing.state in ("FAILED", "DELETED", "DELETING")
        cfg = DeploymentConfig(deployment_id=deployment_id, base_model=base,
                               hot_load_trainer_job=trainer.job_name if trainer else None,
                               min_replica_count=0, max_replica_count=1, **config)
        info = mgr.create_or_get(cfg)
        d = Deployment(run=self, deployment_id=deployment_id, base_model=base, created=created, info=info)
        linked = info.hot_load_trainer_job
        if trainer is not None and linked != trainer.job_name:
            d._needs_reattach = True  # linked to another trainer (another run), or to none
        if existing is not None and not created:
            self._scale_up_if_needed(deployment_id)
        rec = deployments.setdefault(deployment_id, {})
        rec.update(base_model=base, trainer_job=trainer.job_name if trainer else None)
        rec.setdefault("created", _now_iso())
        self._save_state()
        self.store.record_event("deployment_created" if created else "deployment_reconnect",
                                {"deployment_id": deployment_id, "trainer_job": linked})
        d._pending = self._deployment_waiter(d)
        self._deployments[deployment_id] = d
        if wait:
            self._await([x for x in (trainer, d) if x is not None])
        return d

    def _scale_up_if_needed(self, deployment_id: str) -> None:
        """A deployment scaled to zero keeps its record but serves nothing: scale it back to one replica."""
        raw = self._http("GET", f"/v1/accounts/{self.account_id}/deployments/{deployment_id}")
        if raw.get("maxReplicaCount", 1) == 0:
            print(f"note: deployment {deployment_id} was scaled to zero; scaling it back to one replica.")
            self.deployment_manager.update(deployment_id, {"minReplicaCount": 0, "maxReplicaCount": 1},
                                           ["min_replica_count", "max_replica_count"])

    def _deployment_waiter(self, d: Deployment) -> Callable:
        def wait(cancel: threading.Event, status: dict, key: str):
            from fireworks.training.sdk import DeploymentManager

            mgr = _cancellable(DeploymentManager(api_key=self.backend.api_key, base_url=self.backend.base_url),
                               cancel, status, key, "_get_deployment")
            info = mgr.wait_for_ready(d.deployment_id, poll_interval_s=POLL_S)
            if d._needs_reattach and self._trainer is not None:
                status[key] = "re-attaching to this run's trainer"
                info = mgr.reattach_trainer(info, base_model=d.base_model, trainer_job_name=self._trainer.job_name,
                                            timeout_s=300, poll_interval_s=POLL_S)
                d._needs_reattach = False
                d._syncer = None  # a new chain: the next sync is a full base load
            d.info = info
            return d

        return wait

    def _await(self, items: list) -> None:
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
                ck = self.store._rows("SELECT checkpoint_id, step FROM checkpoints WHERE job_id=? AND kind='state' "
                                      "ORDER BY created DESC LIMIT 1", (x.job_id,))
                hint = (f"run.load_state('{ck[0]['checkpoint_id']}') continues from step {ck[0]['step']}" if ck
                        else "no train state was saved, so training starts over from the base weights")
                print(f"note: trainer job {x.job_id} was {_short_state(x.resumed_from)} and has been resumed; its "
                      f"process restarted, so it holds the weights it restarted with, not necessarily those of "
                      f"step {self.step} (the run's last logged step): {hint}.")
                self.store.record_event("trainer_resumed", {"job_id": x.job_id, "from": x.resumed_from})

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

    def _get_deployment(self, deployment: str | Deployment | None) -> Deployment:
        if isinstance(deployment, Deployment):
            return deployment.wait()
        if deployment is None:
            if not self._deployments:
                if self._state.get("deployments"):
                    return self.deployment(next(iter(self._state["deployments"])))
                raise RuntimeError("this run has no deployment: call run.deployment('<id>') first")
            if len(self._deployments) > 1:
                raise ValueError(f"this run has several deployments ({', '.join(self._deployments)}): "
                                 "pass deployment='<id>'")
            return next(iter(self._deployments.values())).wait()
        if deployment not in self._deployments:
            return self.deployment(deployment)
        return self._deployments[deployment].wait()

    def _require_trainer(self) -> Trainer:
        if self._trainer is None:
            if self._state.get("trainer"):
                return self.trainer().wait()
            raise RuntimeError("this run has no trainer: call run.trainer(base_model=...) first")
        return self._trainer.wait()
