"""The notebook session: one run directory, its trainer job, its deployments, and their lineage.

    import workbench as wb
    run = wb.open("runs/colors-sft")             # starts or attaches to the backend; creates the run dir
    trainer = run.trainer(base_model="accounts/workbench/models/qwen3-tiny", lora_rank=0, learning_rate=1e-3)
    deployment = run.deployment("colors-serving") # requested at once; both awaited in parallel
    client = trainer.client                       # the official FiretitanTrainingClient (wrapped for TTL)

    run.log(step, loss=...)                       # or monitor.log(...) inside `for step in run.monitor().steps(N)`
    snapshot = run.sync("step-00020")             # WeightSyncer: base, then XOR deltas; recorded as a hotload
    result = run.evaluate(prompts, scorer, name="colors")   # samples THROUGH the deployment; checks its snapshot
    run.promote(checkpoint, output_model_id="colors-v1")
    run.checkpoints(); run.evals(); run.lineage("colors"); run.monitor(); run.dashboard()

Design
------
* The run directory holds `run.json` (what this run created: backend, trainer job id, deployment ids, the
  snapshot each deployment should hold) and `lineage.sqlite` (see `lineage.py`). Opening the same
  directory again - after a kernel restart, a crash, the next morning - reconnects to the same trainer job
  and deployments; nothing is created twice. The trainer job id is chosen and written to `run.json`
  *before* the create request (`TrainerJobConfig.requested_job_id`; the control plane answers 409 for an
  existing id and the SDK then gets it), so even a kernel killed mid-create cannot leave a duplicate.
* Everything goes through the official SDK (`TrainerJobManager`, `DeploymentManager`,
  `FiretitanServiceClient`, `WeightSyncer`, `DeploymentSampler`, `FireworksClient`) or plain HTTP on the
  wire contract; the notebook layer never reaches into the backend's processes or files, so pointing
  `wb.open(..., base_url=..., api_key=...)` at a remote compatible service changes nothing else.
* Waiting (trainer and deployment readiness) runs the SDK's own `wait_for_ready` / `reconnect_and_wait`
  in threads with a 0.5 s poll, shown as one progress line each, and can be interrupted: the managers
  handed to those threads check a cancel event on every poll.
* A new kernel means a new `FiretitanTrainingClient` (new session suffix) and a new `WeightSyncer`, whose
  first save is a `base`; the SDK also sees that the deployment already holds a snapshot and makes that
  first hot-load a full one, so the delta chain restarts correctly. A sync that fails or is interrupted
  after its save resets the chain (`reset_delta_chain`), so the next delta never refers to a snapshot the
  deployment does not hold.
* `evaluate` compares the snapshot the deployment reports (`GET /hot_load/v1/models/hot_load`) with the one
  this run last hot-loaded into it, before sampling and again after; a mismatch is explained in plain words
  and nothing is recorded unless you accept it (`on_stale="warn"` records it against what was served).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .lineage import LineageStore, logical_name, prompt_set_hash
from .progress import ProgressLines, WaitCancelled, in_kernel, wait_all

POLL_S = 0.5
RUN_FILE = "run.json"
RUN_FORMAT = 1
RESUMABLE_STATES = ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED")
GONE_STATES = ("JOB_STATE_DELETED", "JOB_STATE_DELETING")
PROMOTABLE_HELP = ("Only full snapshots can become models: `base` sampler snapshots of a full-parameter run "
                   "(CHECKPOINT_TYPE_INFERENCE_BASE) and LoRA adapters (CHECKPOINT_TYPE_INFERENCE_LORA).")

_OPEN_RUNS: dict[Path, "Run"] = {}
_OPEN_LOCK = threading.Lock()


class StaleDeploymentError(RuntimeError):
    """The deployment does not hold the snapshot this run expects; nothing was recorded."""


class PromotionError(ValueError):
    """A promotion that cannot work, with what to do instead."""


def _slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return (s[:max_len].strip("-") or "run")


def suggest_model_id(text: str) -> str:
    """A valid model id (1-63 of a-z, 0-9, -) close to `text`."""
    return _slug(text, 63)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _parse_time(value) -> float | None:
    if not value:
        return None
    try:
        import pandas as pd

        return pd.Timestamp(value).timestamp()
    except Exception:  # noqa: BLE001 - an unparseable time sorts first, it never breaks a table
        return None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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


def _short_state(state: str | None) -> str:
    return (state or "?").replace("JOB_STATE_", "")


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


@dataclass
class EvalResult:
    """What `run.evaluate` recorded (or would have, for a refused stale evaluation)."""

    name: str
    score: float
    snapshot: str | None
    step: int | None
    deployment_id: str
    sample_count: int
    n_prompts: int
    prompt_hash: str
    eval_id: int | None
    samples: list[dict] = field(repr=False, default_factory=list)
    note: str | None = None
    trainer_step: int | None = None

    @property
    def snapshot_label(self) -> str:
        return self.snapshot or "(base model)"

    def samples_frame(self):
        import pandas as pd

        return pd.DataFrame(self.samples)

    def __repr__(self) -> str:
        step = "?" if self.step is None else self.step
        text = (f"{self.name}: {self.score:.3f} over {self.sample_count} samples ({self.n_prompts} prompts) "
                f"from snapshot {self.snapshot_label} (step {step}) on deployment {self.deployment_id}")
        if self.trainer_step is not None and self.step is not None and self.trainer_step > self.step:
            text += f"; the trainer has moved on to step {self.trainer_step} since that snapshot"
        if self.note:
            text += f"\n  note: {self.note}"
        return text

    def _repr_mimebundle_(self, include=None, exclude=None):
        import html as _html

        rows = "".join(f"<tr><td>{_html.escape(str(s.get('prompt_text', s.get('prompt'))))}</td>"
                       f"<td>{_html.escape(str(s.get('completion')))}</td><td>{s.get('score')}</td></tr>"
                       for s in self.samples[:8])
        more = f"<div>… {len(self.samples) - 8} more</div>" if len(self.samples) > 8 else ""
        return {"text/plain": repr(self),
                "text/html": (f"<div><b>{_html.escape(self.name)}</b> = <b>{self.score:.3f}</b> "
                              f"<span style='color:#666'>({self.sample_count} samples, snapshot "
                              f"<code>{_html.escape(self.snapshot_label)}</code>, step {self.step}, deployment "
                              f"<code>{_html.escape(self.deployment_id)}</code>)</span></div>"
                              + (f"<div style='color:#9a6700'>{_html.escape(self.note)}</div>" if self.note else "")
                              + "<table><tr><th>prompt</th><th>completion</th><th>score</th></tr>"
                              + rows + "</table>" + more)}


# ---------------------------------------------------------------------------------------------------
class Run:
    """A run directory and the backend objects it owns. Use `workbench.open(run_dir)` to get one."""

    def __init__(self, run_dir: Path, backend, tokenizer=None):
        self.path = Path(run_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.name = self.path.name
        self.backend = backend
        self.store = LineageStore(self.path)
        self._state = self._read_state()
        self._trainer: Trainer | None = None
        self._deployments: dict[str, Deployment] = {}
        self._tokenizer = tokenizer
        self._listeners: "weakref.WeakSet" = weakref.WeakSet()
        self._managers: dict[str, Any] = {}
        self._closed = False
        self._state["backend"] = {"base_url": backend.base_url,
                                  "home": str(backend.home) if getattr(backend, "home", None) else None}
        self._state.setdefault("created", _now_iso())
        if "recipe" in self._state:
            self._adopt_recipe()
        self._save_state()
        job = self._state.get("trainer", {}).get("job_id")
        self.step: int = (self.store.last_step(job) or 0) if job else 0
        self.data_consumed: int | None = self.store.last_data_consumed(job) if job else None

    # ---- a recipe's log_path ------------------------------------------------------------------------
    def _adopt_recipe(self) -> None:
        """This directory is a recipe's `log_path` (its run.json names the policy trainer): view that run.

        The recipe's trainer becomes the run's trainer (`run.trainer()` reconnects to it), its
        `metrics.jsonl` is imported into the lineage (steps, losses, data consumed) and its
        `dataloader.json` gives each resumable checkpoint its data cursor. Re-opening re-imports."""
        policy = (self._state.get("trainers") or {}).get("policy")
        if not policy:
            return
        rec = self._state.get("trainer")
        if not rec or rec.get("job_id") != policy:
            if rec:
                self._state.setdefault("past_trainers", []).append(rec)
            self._state["trainer"] = {"job_id": policy, "job_name": None, "base_model": self._state.get("base_model"),
                                      "lora_rank": self._state.get("lora_rank", 0), "learning_rate": None,
                                      "training_shape": None, "created": "by the recipe", "owner": "recipe"}
        self.import_recipe_metrics()

    def import_recipe_metrics(self) -> int:
        """(Re-)import a recipe's metrics.jsonl and dataloader.json into the lineage; returns the step count."""
        job = self._state.get("trainer", {}).get("job_id")
        if not job:
            return 0
        n = 0
        metrics_file = self.path / "metrics.jsonl"
        if metrics_file.exists():
            for line in metrics_file.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                step = row.pop("step", None)
                if step is None:
                    continue
                consumed = row.get("data_consumed")
                values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.store.log_step(job, int(step), values, consumed if isinstance(consumed, int) else None)
                n += 1
            self.store.flush()
        loader = self.path / "dataloader.json"
        if loader.exists():
            try:
                cursors = json.loads(loader.read_text())
            except json.JSONDecodeError:
                cursors = {}
            for name, consumed in cursors.items():
                m = re.search(r"step-(\d+)$", name)
                self.store.record_checkpoint(job, name, kind="state", requested_type="state",
                                             step=int(m.group(1)) if m else None, data_consumed=consumed)
        return n

    # ---- state ----------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / RUN_FILE

    def _read_state(self) -> dict:
        if self.state_file.exists():
            state = json.loads(self.state_file.read_text())
            if state.get("format", RUN_FORMAT) > RUN_FORMAT:
                raise RuntimeError(f"{self.state_file} was written by a newer workbench (format {state['format']})")
            return state
        return {"format": RUN_FORMAT, "name": self.path.name, "deployments": {}, "past_trainers": []}

    _OWN_KEYS = ("format", "name", "created", "backend", "trainer", "past_trainers", "deployments")

    def _save_state(self) -> None:
        """Write this layer's keys into run.json, keeping any others (a recipe's, when run_dir is its log_path)."""
        current = {}
        if self.state_file.exists():
            try:
                current = json.loads(self.state_file.read_text())
            except json.JSONDecodeError:
                current = {}
        current.update({k: self._state[k] for k in self._OWN_KEYS if k in self._state})
        _write_json_atomic(self.state_file, current)

    @property
    def info(self) -> dict:
        """A copy of what `run.json` records."""
        return json.loads(json.dumps(self._state))

    # ---- SDK managers (one each per run) ----------------------------------------------------------
    def _manager(self, kind: str):
        if kind not in self._managers:
            from fireworks.training.sdk import DeploymentManager, FireworksClient, TrainerJobManager

            cls = {"trainer": TrainerJobManager, "deployment": DeploymentManager, "fireworks": FireworksClient}[kind]
            self._managers[kind] = cls(api_key=self.backend.api_key, base_url=self.backend.base_url)
        return self._managers[kind]

    @property
    def trainer_manager(self):
        """The official `TrainerJobManager` on this run's backend."""
        return self._manager("trainer")

    @property
    def deployment_manager(self):
        """The official `DeploymentManager` on this run's backend."""
        return self._manager("deployment")

    @property
    def fireworks(self):
        """The official `FireworksClient` (checkpoint rows, promotion) on this run's backend."""
        return self._manager("fireworks")

    @property
    def account_id(self) -> str:
        return self.deployment_manager.account_id

    @property
    def tokenizer(self):
        """The tokenizer of the run's base model (local catalog), for sampling through deployments."""
        if self._tokenizer is None:
            base = self._state.get("trainer", {}).get("base_model") or next(
                (d["base_model"] for d in self._state.get("deployments", {}).values()), None)
            if base is None:
                raise RuntimeError("no base model yet: call run.trainer(...) first, or pass tokenizer= to wb.open")
            from workbench.models import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(base)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"cannot load a tokenizer for {base!r} ({e}); pass tokenizer= to "
                                   "wb.open(...) or to run.evaluate(...)") from e
        return self._tokenizer

    @property
    def job_id(self) -> str | None:
        return self._state.get("trainer", {}).get("job_id")

    @property
    def deployment_ids(self) -> list[str]:
        return list(self._state.get("deployments", {}))

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

    # ---- training steps --------------------------------------------------------------------------
    def log(self, step: int, data_consumed: int | None = None, **metrics) -> None:
        """Record one training step's metrics (cheap: buffered, committed at syncs/evals/loop end)."""
        job = self.job_id
        if job is None:
            raise RuntimeError("call run.trainer(...) before logging steps")
        self.step = int(step)
        if data_consumed is not None:
            self.data_consumed = int(data_consumed)
        self.store.log_step(job, step, metrics, data_consumed)
        self._notify("step", {"step": step, "metrics": metrics})

    def _notify(self, kind: str, data: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener.on_run_event(kind, data)
            except Exception:  # noqa: BLE001 - a display must never break training
                pass

    # ---- weight sync -----------------------------------------------------------------------------
    def syncer(self, deployment: str | Deployment | None = None):
        """The `workbench.sdk.WeightSyncer` (the SDK's, plus save_dcp) from the trainer to the deployment."""
        t = self._require_trainer()
        d = self._get_deployment(deployment)
        if d._syncer is None or d._syncer_client is not t.client:
            from workbench.sdk import WeightSyncer

            d._syncer = WeightSyncer(policy_client=t.client, deploy_mgr=self.deployment_manager,
                                     deployment_id=d.deployment_id, base_model=d.base_model,
                                     first_checkpoint_type="base", lora_rank=t.lora_rank)
            d._syncer_client = t.client
        return d._syncer

    def sync(self, name: str | None = None, checkpoint_type: str | None = None,
             deployment: str | Deployment | None = None) -> str:
        """Save sampler weights and hot-load them into the deployment (`WeightSyncer.save_and_hotload`).

        Returns the snapshot identity. Records the checkpoint (step, data consumed, the control plane's type
        and promotability) and the hot-load, after checking the deployment reports holding that snapshot.
        """
        self._check_open()
        t = self._require_trainer()
        d = self._get_deployment(deployment)
        syncer = self.syncer(d)
        used = d.__dict__.setdefault("_names", {}).setdefault(id(t.sdk_client), set())
        if name is None:
            name, n = f"step-{self.step:05d}", 2
            while name in used:  # synced twice at the same step: keep snapshot names unique in this session
                name, n = f"step-{self.step:05d}-{n}", n + 1
        elif name in used:
            raise ValueError(f"a snapshot named {name!r} was already saved in this session (as {name}-<session>); "
                             "pick another name")
        info = self.deployment_manager.get(d.deployment_id)
        if info is not None and info.hot_load_trainer_job and info.hot_load_trainer_job != t.job_name:
            print(f"note: deployment {d.deployment_id} is attached to {info.hot_load_trainer_job.split('/')[-1]} "
                  f"(another run); re-attaching it to this run's trainer {t.job_id}.")
            d.info = self.deployment_manager.reattach_trainer(info, base_model=d.base_model,
                                                              trainer_job_name=t.job_name, timeout_s=300,
                                                              poll_interval_s=POLL_S)
            syncer.reset_delta_chain()
            self.store.record_event("deployment_reattached", {"deployment_id": d.deployment_id})
        if syncer.base_identity is not None:
            held = d.current_snapshot()
            if held != syncer.base_identity:
                # something else hot-loaded the deployment since our last sync: a delta over our last
                # snapshot would not apply to what it holds, so this sync is a full base load
                syncer.reset_delta_chain()
                self.store.record_event("chain_reset", {"deployment_id": d.deployment_id, "held": held})
        kind = checkpoint_type or ("base" if (t.lora_rank or not syncer.base_saved) else "delta")
        previous = syncer.base_identity
        self.store.flush()
        t0 = time.time()
        try:
            snapshot = syncer.save_and_hotload(name, checkpoint_type=checkpoint_type)
        except BaseException as e:
            # The save may have happened without the hot-load: the trainer's next delta would then not apply
            # to what the deployment holds. Restart the chain with a full base next time.
            syncer.reset_delta_chain()
            self.store.record_event("sync_failed", {"name": name, "error": str(e)[:500]})
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt(f"sync of {name!r} interrupted; the next sync will be a full base load")
            raise RuntimeError(f"sync of {name!r} to deployment {d.deployment_id} failed: {e}\n"
                               "The deployment keeps serving its previous snapshot; the next sync will be a "
                               "full base load.") from e
        used.add(name)
        if not snapshot:
            raise RuntimeError(f"sync of {name!r} returned no snapshot")
        duration = time.time() - t0
        held = d.current_snapshot()
        if held != snapshot:
            syncer.reset_delta_chain()
            raise StaleDeploymentError(f"the hot-load of {snapshot} reported success, but deployment "
                                       f"{d.deployment_id} now reports holding {held or 'no snapshot'}. "
                                       "Nothing was recorded; the next sync will be a full base load.")
        self.store.record_checkpoint(t.job_id, snapshot, kind="sampler", requested_type=kind,
                                     step=self.step, data_consumed=self.data_consumed)
        self.store.record_hotload(snapshot, d.deployment_id, checkpoint_type=kind,
                                  previous_snapshot=previous if kind == "delta" else None,
                                  duration_s=duration, verified=True)
        self._refresh_rows(t.job_id, only={snapshot})
        rec = self._state["deployments"].setdefault(d.deployment_id, {})
        rec.update(snapshot=snapshot, snapshot_step=self.step, synced=_now_iso())
        self._save_state()
        self._notify("sync", {"snapshot": snapshot, "deployment": d.deployment_id, "step": self.step,
                              "type": kind})
        return snapshot

    def save_state(self, name: str | None = None, ttl_seconds: int | None = None) -> str:
        """Save resumable train state (DCP: weights + optimizer) and record it with its step and data consumed."""
        t = self._require_trainer()
        name = name or f"state-{self.step:05d}"
        self.store.flush()
        t.client.save_state(name, ttl_seconds=ttl_seconds).result()
        self.store.record_checkpoint(t.job_id, name, kind="state", requested_type="state", step=self.step,
                                     data_consumed=self.data_consumed)
        self._refresh_rows(t.job_id, only={name})
        self._notify("state", {"name": name, "step": self.step})
        return name

    def load_state(self, name: str | None = None, with_optimizer: bool = True, source_job_id: str | None = None) -> str:
        """Restore train state saved by `save_state` (default: the newest) and the run's step counter."""
        t = self._require_trainer()
        if name is None:
            states = [r for r in self.checkpoint_rows() if r["kind"] == "state"]
            if not states:
                raise RuntimeError("this run has no saved train state (run.save_state(name) saves one)")
            name = states[-1]["checkpoint_id"]
        path = t.client.resolve_checkpoint_path(name, source_job_id=source_job_id) if source_job_id else name
        (t.client.load_state_with_optimizer(path) if with_optimizer else t.client.load_state(path)).result()
        ck = self.store.checkpoint(name, source_job_id or t.job_id)
        if ck and ck.get("step") is not None and source_job_id is None:
            self.step = int(ck["step"])
            self.data_consumed = ck.get("data_consumed")
            dropped = self.store.truncate_after(t.job_id, self.step)  # those steps were rolled back
            if dropped:
                self.store.record_event("steps_rolled_back", {"after": self.step, "count": dropped})
        # the weights changed under the deployment's chain: the next sync must be a full base
        for d in self._deployments.values():
            if d._syncer is not None:
                d._syncer.reset_delta_chain()
        self.store.record_event("state_loaded", {"name": name, "step": self.step, "source_job_id": source_job_id})
        return name

    # ---- checkpoint rows (the control plane is the source of truth) ---------------------------------
    def _rows(self, job_id: str) -> list[dict]:
        try:
            return self.fireworks.list_checkpoints(job_id)
        except Exception as e:  # noqa: BLE001 - a deleted job's rows are simply gone
            if "404" in str(e):
                return []
            raise

    def _refresh_rows(self, job_id: str, only: set[str] | None = None) -> list[dict]:
        rows = self._rows(job_id)
        for r in rows:
            cid = r["name"].split("/")[-1]
            if only is not None and cid not in only:
                continue
            kind = "state" if r.get("checkpointType", "").startswith("CHECKPOINT_TYPE_TRAINING") else "sampler"
            self.store.record_checkpoint(job_id, cid, kind=kind, name=r["name"],
                                         checkpoint_type=r.get("checkpointType"), promotable=r.get("promotable"),
                                         step=r.get("step"), created=_parse_time(r.get("createTime")),
                                         size_bytes=r.get("sizeBytes"))
        return rows

    def _bucket_sizes(self) -> dict[str, int]:
        """Sampler snapshot sizes in bytes, read from the hot-load bucket a deployment of this run points at
        (`hotLoadBucketUrl` on the wire) when that is a local `file://` directory; {} otherwise."""
        sizes: dict[str, int] = {}
        for dep_id in self.deployment_ids:
            try:
                url = self._http("GET", f"/v1/accounts/{self.account_id}/deployments/{dep_id}").get("hotLoadBucketUrl")
            except Exception:  # noqa: BLE001 - sizes are a nicety
                continue
            if not url or not url.startswith("file://"):
                continue
            root = Path(url[len("file://"):])
            if not root.is_dir():
                continue
            for snap in root.iterdir():
                if snap.is_dir() and not snap.name.startswith("."):
                    sizes[snap.name] = sum(f.stat().st_size for f in snap.rglob("*") if f.is_file())
        return sizes

    def checkpoint_rows(self, all_jobs: bool = True) -> list[dict]:
        """The control plane's checkpoint rows of this run's trainer job(s), oldest first, joined with the
        lineage: step, data consumed, the snapshot's last eval score, where it was hot-loaded."""
        jobs = [p["job_id"] for p in self._state.get("past_trainers", [])] if all_jobs else []
        if self.job_id:
            jobs.append(self.job_id)
        out = []
        sizes = self._bucket_sizes()
        promoted: dict[str, list[str]] = {}
        try:  # models promoted from these rows (by this run, a recipe, or anyone): their sourceCheckpoint
            for m in self._http("GET", f"/v1/accounts/{self.account_id}/models?pageSize=200").get("models", []):
                if m.get("sourceCheckpoint"):
                    promoted.setdefault(m["sourceCheckpoint"], []).append(m["name"].split("/")[-1])
        except Exception:  # noqa: BLE001 - a service without model listing: the column stays empty
            pass
        for job in jobs:
            for r in self._refresh_rows(job):
                cid = r["name"].split("/")[-1]
                ck = self.store.checkpoint(cid, job) or {}
                scores = self.store.scores_for(cid)
                hl = self.store._rows("SELECT deployment_id, time FROM hotloads WHERE snapshot=? ORDER BY id DESC "
                                      "LIMIT 1", (cid,))
                ctype = r.get("checkpointType", "")
                out.append({
                    "checkpoint_id": cid, "name": r["name"], "job_id": job,
                    "logical_name": logical_name(cid),
                    "kind": "state" if ctype.startswith("CHECKPOINT_TYPE_TRAINING") else "sampler",
                    "checkpoint_type": ctype, "type": _short_type(ctype), "promotable": bool(r.get("promotable")),
                    "step": r.get("step", ck.get("step")), "data_consumed": ck.get("data_consumed"),
                    "created": r.get("createTime"), "created_ts": _parse_time(r.get("createTime")),
                    "eval_score": None if scores.empty else float(scores["score"].iloc[-1]),
                    "eval_name": None if scores.empty else scores["name"].iloc[-1],
                    "hotloaded_to": hl[0]["deployment_id"] if hl else None,
                    "size_bytes": r.get("sizeBytes") or sizes.get(cid) or ck.get("size_bytes"),
                    "promoted_to": ", ".join(promoted.get(r["name"], [])) or None,
                })
        out.sort(key=lambda r: (r["created_ts"] is None, r["created_ts"] or 0))
        return out

    def checkpoints_frame(self):
        """`checkpoint_rows()` as a pandas DataFrame."""
        import pandas as pd

        cols = ["checkpoint_id", "type", "promotable", "step", "created", "eval_score", "eval_name", "data_consumed",
                "hotloaded_to", "promoted_to", "kind", "checkpoint_type", "logical_name", "name", "job_id", "size_bytes"]
        rows = self.checkpoint_rows()
        return pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(columns=cols)

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, prompts: Iterable, scorer: Callable, name: str = "eval", *, n: int = 1,
                 max_tokens: int = 32, temperature: float = 0.0, deployment: str | Deployment | None = None,
                 on_stale: str = "raise", tokenizer=None, concurrency: int = 16) -> EvalResult:
        """Sample `prompts` through the deployment, score them, and record the score with the snapshot.

        prompts: strings (a user message), message lists, or dicts with "messages" (or "prompt") and any
            reference fields. scorer(text, item) -> float (or bool); text is the completion without the
            end-of-turn token, item the prompt entry as given.
        on_stale: what to do when the deployment does not hold the snapshot this run last loaded into it:
            "raise" (default: explain, record nothing), "warn" (warn, record against what it serves), "accept".
        """
        self._check_open()
        if on_stale not in ("raise", "warn", "accept"):
            raise ValueError("on_stale must be 'raise', 'warn' or 'accept'")
        d = self._get_deployment(deployment)
        items = list(prompts)
        if not items:
            raise ValueError("prompts is empty")
        messages = [_messages_of(x) for x in items]
        expected = d.expected_snapshot()
        held = d.current_snapshot()
        note = None
        if held != expected:
            text = self._stale_text(d, expected, held)
            if on_stale == "raise":
                raise StaleDeploymentError(text + " Nothing was recorded.")
            note = text
            if on_stale == "warn":
                warnings.warn(text, stacklevel=2)
        tok = tokenizer if tokenizer is not None else self.tokenizer
        params = {"n": n, "max_tokens": max_tokens, "temperature": temperature}
        phash = prompt_set_hash([_jsonable(x) for x in items], params)
        sampler = d.sampler(tokenizer=tok)
        completions = _run_async(lambda: _sample_all(sampler, messages, n, max_tokens, temperature, concurrency))
        after = d.current_snapshot()
        if after != held:
            raise StaleDeploymentError(
                f"deployment {d.deployment_id} changed snapshot while the evaluation ran ({held or 'base model'} "
                f"-> {after or 'base model'}); the samples mix two models, so nothing was recorded. Run it again.")
        eos = getattr(tok, "eos_token", None)
        samples, total = [], 0.0
        for item, msgs, outs in zip(items, messages, completions):
            for c in outs:
                text = _clean(c.text, eos)
                s = float(_call_scorer(scorer, text, item))
                total += s
                samples.append({"prompt": msgs, "prompt_text": msgs[-1].get("content") if msgs else "",
                                "completion": text, "score": s, "finish_reason": getattr(c, "finish_reason", None)})
        count = len(samples)
        score = total / count if count else float("nan")
        ck = self.store.checkpoint(held) if held else None
        step = 0 if held is None else (ck["step"] if ck and ck.get("step") is not None else None)
        eval_id = self.store.record_evaluation(name, snapshot=held, deployment_id=d.deployment_id, score=score,
                                               prompt_hash=phash, n_prompts=len(items), sample_count=count,
                                               job_id=(ck or {}).get("job_id") or self.job_id, step=step,
                                               params=params, samples=samples)
        result = EvalResult(name=name, score=score, snapshot=held, step=step, deployment_id=d.deployment_id,
                            sample_count=count, n_prompts=len(items), prompt_hash=phash, eval_id=eval_id,
                            samples=samples, note=note, trainer_step=self.step)
        self._notify("eval", {"name": name, "score": score, "snapshot": held, "step": step})
        return result

    def _stale_text(self, d: Deployment, expected: str | None, held: str | None) -> str:
        def where(snap):
            ck = self.store.checkpoint(snap) if snap else None
            return f" (step {ck['step']})" if ck and ck.get("step") is not None else ""

        if expected is None:
            return (f"Deployment '{d.deployment_id}' is serving snapshot {held}, which this run never loaded into it "
                    "(another run or an earlier session did). This run has not synced weights to it yet: call "
                    "run.sync() first, or pass on_stale='warn' to score what it serves.")
        if held is None:
            return (f"Deployment '{d.deployment_id}' reports no loaded snapshot - it serves the base model (it was "
                    f"restarted or recreated?) - but this run last loaded {expected}{where(expected)} into it. "
                    "Call run.sync() to load the current weights again.")
        return (f"Deployment '{d.deployment_id}' is serving {held}{where(held)}, not {expected}{where(expected)} "
                "which this run loaded into it last: something else hot-loaded it since. Call run.sync() to load "
                "this run's current weights, or pass on_stale='warn' to score what it serves.")

    # ---- promotion ---------------------------------------------------------------------------------
    def promote(self, checkpoint=None, output_model_id: str | None = None, base_model: str | None = None) -> dict:
        """Promote a promotable checkpoint to a model `accounts/<a>/models/<output_model_id>`.

        checkpoint: a row (from `checkpoint_rows()`), its full name or id, its name without the session
        suffix (the newest such row), or None for the newest promotable row.
        """
        self._check_open()
        from fireworks.training.sdk.fireworks_client import validate_output_model_id

        if not output_model_id:
            raise PromotionError("output_model_id is required, e.g. run.promote(checkpoint, output_model_id="
                                 f"'{suggest_model_id(self.name + '-v1')}')")
        errors = validate_output_model_id(output_model_id)
        if errors:
            raise PromotionError(f"{output_model_id!r} is not a valid model id: " + " ".join(errors)
                                 + f" Try output_model_id={suggest_model_id(output_model_id)!r}.")
        rows = [r for r in self.checkpoint_rows()]
        row = self._find_row(rows, checkpoint)
        if not row["promotable"]:
            raise PromotionError(self._not_promotable_text(row, rows))
        base = base_model or (self._trainer.base_model if self._trainer else self._state.get("trainer", {}).get(
            "base_model"))
        try:
            model = self.fireworks.promote_checkpoint(name=row["name"], output_model_id=output_model_id,
                                                      base_model=base)
        except Exception as e:  # noqa: BLE001
            text = str(e)
            if "409" in text or "already exists" in text.lower():
                raise PromotionError(f"a model named {output_model_id!r} already exists. Pick another "
                                     f"output_model_id, e.g. {suggest_model_id(output_model_id + '-2')!r}.") from e
            raise
        model = model.get("model", model) if isinstance(model, dict) else model
        self.store.record_promotion(row["checkpoint_id"], row["job_id"], model.get("name", output_model_id), base)
        self._notify("promote", {"checkpoint": row["checkpoint_id"], "model": model.get("name")})
        return model

    def _find_row(self, rows: list[dict], checkpoint) -> dict:
        if not rows:
            raise PromotionError("this run's trainer has no checkpoints yet: run.sync(...) saves one")
        if checkpoint is None:
            prom = [r for r in rows if r["promotable"]]
            if not prom:
                raise PromotionError("this run has no promotable checkpoint. " + PROMOTABLE_HELP + " Save one of the "
                                     "current weights with run.sync('final', checkpoint_type='base').")
            return prom[-1]
        if isinstance(checkpoint, dict):
            checkpoint = checkpoint.get("name") or checkpoint.get("checkpoint_id")
        if hasattr(checkpoint, "snapshot"):  # an EvalResult
            checkpoint = checkpoint.snapshot
        key = str(checkpoint)
        for r in rows:
            if key in (r["name"], r["checkpoint_id"]):
                return r
        matches = [r for r in rows if r["logical_name"] == key]
        if matches:
            return matches[-1]
        known = ", ".join(r["checkpoint_id"] for r in rows[-6:])
        raise PromotionError(f"no checkpoint {key!r} on this run's trainer. Recent ones: {known}. "
                             "See run.checkpoints() for the full table.")

    def _not_promotable_text(self, row: dict, rows: list[dict]) -> str:
        why = {"CHECKPOINT_TYPE_INFERENCE_ARC_V2": "a delta (an XOR difference from the previous snapshot, only "
                                                   "meaningful to a deployment that holds that snapshot)",
               "CHECKPOINT_TYPE_TRAINING": "resumable train state (DCP: weights and optimizer for resuming)",
               "CHECKPOINT_TYPE_TRAINING_LORA": "resumable LoRA train state (DCP)"}.get(
            row["checkpoint_type"], f"of type {row['checkpoint_type']}")
        text = f"{row['checkpoint_id']} is {why}, so it cannot become a model. {PROMOTABLE_HELP}"
        prom = [r for r in rows if r["promotable"]]
        if prom:
            step = row.get("step")
            before = [r for r in prom if step is None or (r.get("step") is not None and r["step"] <= step)]
            best = (before or prom)[-1]
            text += (f" The nearest promotable one is {best['checkpoint_id']} (step {best.get('step')}): "
                     f"run.promote('{best['checkpoint_id']}', output_model_id=...).")
        text += (" To promote the trainer's current weights, save a full snapshot first: "
                 "run.sync('final', checkpoint_type='base'), then promote that.")
        return text

    # ---- views ------------------------------------------------------------------------------------
    def monitor(self, total: int | None = None, metric: str = "loss", **kwargs):
        """A live training monitor (progress, loss curve, last eval, deployment identity)."""
        from .widgets import TrainingMonitor

        return TrainingMonitor(self, total=total, metric=metric, **kwargs)

    def checkpoints(self):
        """The checkpoint table (control-plane rows + lineage) with a promote action."""
        from .widgets import CheckpointTable

        return CheckpointTable(self)

    def evals(self, name: str | None = None):
        """Eval scores against step, labelled by snapshot."""
        from .widgets import EvalChart

        return EvalChart(self, name=name)

    def lineage(self, name: str | None = None):
        """step -> checkpoint -> snapshot -> deployment -> eval, and which checkpoint scored best."""
        from .widgets import LineageView

        return LineageView(self, name=name)

    def dashboard(self, name: str | None = None):
        from .widgets import Dashboard

        return Dashboard(self, name=name)

    # ---- housekeeping -----------------------------------------------------------------------------
    def _http(self, method: str, path: str, **kw) -> dict:
        import httpx

        r = httpx.request(method, self.backend.base_url + path, headers={"X-Api-Key": self.backend.api_key},
                          timeout=30, **kw)
        r.raise_for_status()
        return r.json() if r.content else {}

    def status(self) -> dict:
        """Live state of the run's trainer job and deployments (one GET each)."""
        out: dict[str, Any] = {"base_url": self.backend.base_url, "step": self.step, "trainer": None,
                               "deployments": {}}
        if self.job_id:
            try:
                job = self.trainer_manager.try_get(self.job_id)
                out["trainer"] = {"job_id": self.job_id, "state": job.get("state") if job else "missing"}
            except Exception as e:  # noqa: BLE001 - a status display never raises
                out["trainer"] = {"job_id": self.job_id, "state": f"unreachable ({type(e).__name__})"}
        for dep_id in self.deployment_ids:
            try:
                info = self.deployment_manager.get(dep_id)
                state = info.state if info else "missing"
                held = None
                if info and state == "READY":
                    d = self._deployments.get(dep_id) or Deployment(run=self, deployment_id=dep_id,
                                                                    base_model=info.base_model or "")
                    try:
                        held = d.current_snapshot()
                    except Exception:  # noqa: BLE001
                        held = "?"
            except Exception as e:  # noqa: BLE001
                state, held = f"unreachable ({type(e).__name__})", None
            last = self.store.last_hotload(dep_id)
            out["deployments"][dep_id] = {"state": state, "holds": held,
                                          "expected": last["snapshot"] if last else None}
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this run was closed; wb.open(run_dir) opens it again")

    def close(self, stop_backend: bool = False) -> None:
        """Close the run's clients (the trainer job and deployments keep running). `stop_backend=True` also
        stops the local backend (and every trainer and deployment process it runs)."""
        self.store.flush()
        if self._trainer is not None and self._trainer.service is not None:
            try:
                self._trainer.service.close()
            except Exception:  # noqa: BLE001
                pass
        self._closed = True
        with _OPEN_LOCK:
            if _OPEN_RUNS.get(self.path.resolve()) is self:
                del _OPEN_RUNS[self.path.resolve()]
        if stop_backend:
            stop_local_backend(self.backend)
        self.store.close()

    def __repr__(self) -> str:
        return _run_text(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": _run_text(self), "text/html": _run_html(self)}


# ---------------------------------------------------------------------------------------------------
def _short_type(ctype: str | None) -> str:
    return {"CHECKPOINT_TYPE_INFERENCE_BASE": "base", "CHECKPOINT_TYPE_INFERENCE_ARC_V2": "delta",
            "CHECKPOINT_TYPE_INFERENCE_LORA": "lora", "CHECKPOINT_TYPE_TRAINING": "train state",
            "CHECKPOINT_TYPE_TRAINING_LORA": "train state (lora)"}.get(ctype or "", (ctype or "?").replace(
                "CHECKPOINT_TYPE_", "").lower())


def _run_summary(run: Run) -> dict:
    st = run.status() if not run._closed else {"trainer": None, "deployments": {}, "base_url": run.backend.base_url}
    ev = run.store.evaluations()
    n_ck = len(run.store.checkpoints())
    last_eval = None if ev.empty else ev.iloc[-1].to_dict()
    return {"status": st, "n_checkpoints": n_ck, "last_eval": last_eval}


def _run_text(run: Run) -> str:
    s = _run_summary(run)
    st = s["status"]
    lines = [f"Run {run.name!r} at {run.path}", f"  backend     {st['base_url']}"]
    tr = st.get("trainer")
    lines.append(f"  trainer     {tr['job_id']} {_short_state(tr['state'])}" if tr else "  trainer     (none yet)")
    for dep, info in st["deployments"].items():
        holds = info["holds"] or "base model"
        flag = "" if info["holds"] == info["expected"] else f"  (STALE: this run expects {info['expected']})"
        lines.append(f"  deployment  {dep} {info['state']} holds {holds}{flag}")
    if not st["deployments"]:
        lines.append("  deployment  (none yet)")
    lines.append(f"  last step   {run.step}")
    lines.append(f"  checkpoints {s['n_checkpoints']} recorded")
    if s["last_eval"]:
        e = s["last_eval"]
        lines.append(f"  last eval   {e['name']} = {e['score']:.3f} on {e['snapshot'] or 'base model'} (step {e['step']})")
    return "\n".join(lines)


def _run_html(run: Run) -> str:
    import html as _html

    text = _run_text(run).splitlines()
    head, rows = text[0], text[1:]
    cells = "".join("<tr><td style='text-align:left;color:#666'>{}</td><td style='text-align:left'>{}</td></tr>"
                    .format(_html.escape(r[:14].strip()), _html.escape(r[14:].strip())) for r in rows)
    return f"<div><b>{_html.escape(head)}</b><table>{cells}</table></div>"


def _messages_of(item) -> list[dict]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if isinstance(item, dict):
        if "messages" in item:
            return list(item["messages"])
        if "prompt" in item:
            p = item["prompt"]
            return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if "role" in item:
            return [item]
    if isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
        return list(item)
    raise ValueError(f"cannot read a prompt from {item!r}: use a string, a message list, or a dict with 'messages'")


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)


def _clean(text: str, eos: str | None) -> str:
    if eos and eos in text:
        text = text.split(eos)[0]
    return text.strip()


def _call_scorer(scorer, text, item):
    try:
        return scorer(text, item)
    except TypeError as e:
        if "positional argument" in str(e):
            return scorer(text)
        raise


async def _sample_all(sampler, messages, n, max_tokens, temperature, concurrency):
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(msgs):
        async with sem:
            return await sampler.sample_with_tokens(messages=msgs, n=n, max_tokens=max_tokens,
                                                    temperature=temperature)

    try:
        return await asyncio.gather(*[one(m) for m in messages])
    finally:  # the sampler's async HTTP client belongs to this private loop: close it here
        client = getattr(sampler, "_async_client", None)
        if client is not None and not client.is_closed:
            await client.aclose()


def _run_async(make_coro):
    """Run a coroutine to completion from sync code, also inside a Jupyter kernel (whose loop is running):
    on a private event loop in a helper thread; Ctrl-C cancels it."""
    box: dict[str, Any] = {}
    loop = asyncio.new_event_loop()

    def target():
        asyncio.set_event_loop(loop)
        try:
            box["task"] = loop.create_task(make_coro())
            box["value"] = loop.run_until_complete(box["task"])
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    t = threading.Thread(target=target, name="workbench-sampling", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.1)
    except KeyboardInterrupt:
        task = box.get("task")
        if task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        t.join(5)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def stop_local_backend(backend) -> bool:
    """Stop a local backend (`workbench stop --home H`); False for a remote one."""
    home = getattr(backend, "home", None)
    if not home:
        return False
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "workbench.cli", "stop", "--home", str(home)], check=False,
                   capture_output=True, timeout=120)
    return True


def open_run(run_dir: str | os.PathLike, base_url: str | None = None, api_key: str | None = None,
             home: str | os.PathLike | None = None, tokenizer=None) -> Run:
    """Open (or create) a run directory; start or attach to its backend. See `workbench.open`."""
    from workbench.connect import connect

    path = Path(run_dir).expanduser().resolve()
    with _OPEN_LOCK:
        existing = _OPEN_RUNS.get(path)
    recorded, is_recipe = {}, False
    state_file = path / RUN_FILE
    if state_file.exists():
        data = json.loads(state_file.read_text())
        recorded, is_recipe = data.get("backend") or {}, "recipe" in data
    if existing is not None and not existing._closed and base_url is None and home is None:
        if not is_recipe:
            return existing
        existing.close()  # a recipe's log_path changes under us: read it again
    if base_url:
        backend = connect(base_url=base_url, api_key=api_key or os.environ.get("FIREWORKS_API_KEY"))
    elif home is not None:
        backend = connect(home=home)
    elif recorded.get("home"):
        backend = connect(home=recorded["home"])
    elif recorded.get("base_url"):
        key = api_key or os.environ.get("FIREWORKS_API_KEY")
        if not key:
            raise RuntimeError(f"this run uses the service at {recorded['base_url']}: pass api_key= or set "
                               "FIREWORKS_API_KEY")
        backend = connect(base_url=recorded["base_url"], api_key=key)
    else:
        backend = connect()
    run = Run(path, backend, tokenizer=tokenizer)
    with _OPEN_LOCK:
        old = _OPEN_RUNS.get(path)
        if old is not None and not old._closed:
            old.close()
        _OPEN_RUNS[path] = run
    return run
