"""The notebook session: one run directory, its trainer job, its deployments, and their lineage.

    import workbench as wb
    run = wb.open("runs/colors-sft")             # starts or attaches to the backend; creates the run dir
    trainer = run.trainer(base_model="accounts/workbench/models/qwen3-tiny", lora_rank=0, learning_rate=1e-3)
    deployment = run.deployment("colors-serving") # requested at once; both awaited in parallel
    client = trainer.client                       # the official FiretitanTrainingClient (wrapped for TTL)

    run.log(step, loss=...)                       # or monitor.log(...) inside `for step in run.monitor().steps(N)`
    snapshot = run.sync("step-00020")             # WeightSyncer: base, then deltas; recorded as a hotload
    result = run.evaluate(prompts, scorer, name="colors")   # samples THROUGH the deployment; checks its snapshot
    run.promote(checkpoint, output_model_id="colors-v1", alias="champion")
    child = run.fork("colors-lr-low", from_checkpoint="state-00020")   # a new run from that train state
    run.checkpoints(); run.evals(); run.lineage("colors"); run.monitor(); run.dashboard()

Design
------
* The run directory holds `run.json` (a `workbench.records.RunRecord`: backend, trainer job, deployments,
  the snapshot each deployment should hold, the parent of a fork) and `lineage.sqlite` (see `lineage.py`).
  Opening the same directory again - after a kernel restart, a crash, the next morning - reconnects to the
  same trainer job and deployments; nothing is created twice. The trainer job id is chosen and written to
  `run.json` *before* the create request (`TrainerJobConfig.requested_job_id`; the control plane answers
  409 for an existing id and the SDK then gets it), so even a kernel killed mid-create cannot leave a
  duplicate.
* Everything goes through the official SDK (`TrainerJobManager`, `DeploymentManager`,
  `FiretitanServiceClient`, `WeightSyncer`, `DeploymentSampler`, `FireworksClient`) or plain HTTP on the
  wire contract; the notebook layer never reaches into the backend's processes or files, so pointing
  `wb.open(..., base_url=..., api_key=...)` at a remote compatible service changes nothing else.
* Waiting (trainer and deployment readiness) runs the SDK's own `wait_for_ready` / `reconnect_and_wait`
  in threads with a 0.5 s poll, shown as one progress line each, and can be interrupted.
* A new kernel means a new `FiretitanTrainingClient` (new session suffix) and a new `WeightSyncer`, whose
  first save is a `base`; the delta chain restarts correctly. A sync that fails or is interrupted after its
  save resets the chain (`reset_delta_chain`), so the next delta never refers to a snapshot the deployment
  does not hold.
* `evaluate` compares the snapshot the deployment reports (`GET /hot_load/v1/models/hot_load`) with the one
  this run last hot-loaded into it, before sampling and again after; a mismatch is explained in plain words
  and nothing is recorded unless you accept it (`on_stale="warn"` records it against what was served).

Where things are
----------------
`Run` is built by composition: it makes one `RunContext` (common.py: the directory, the backend's clients,
the lineage store, the typed run record, the step counter, the listeners) and hands it to four
collaborators, each of which receives what it needs and nothing more:

    provision.py   Provisioning (run.trainer / run.deployment: create, reconnect, resume, await); Trainer, Deployment
    sync.py        WeightSync (run.sync, run.save_state / run.load_state)
    evaluation.py  Evaluation (run.evaluate, EvalResult, the staleness check, sampling through the deployment)
    promotion.py   Promotion (run.checkpoint_rows / checkpoints_frame, run.promote, aliases, PromotionError's text)
    display.py     repr(run) and its HTML
    common.py      RunContext, Clients, Counter, StaleDeploymentError, PromotionError, POLL_S, name/time helpers

`Run` itself keeps the session: open/close, step logging, status, forks and the views.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from workbench.records import BackendRecord, ParentRecord, RunRecord, TrainerRecord

from .common import (POLL_S, Clients, PromotionError, RunContext, StaleDeploymentError, _now_iso,  # noqa: F401
                     _short_state, _slug)
from .display import _run_html, _run_summary, _run_text  # noqa: F401
from .evaluation import EvalResult, Evaluation  # noqa: F401
from .lineage import AliasStore, LineageStore, logical_name, prompt_set_hash  # noqa: F401
from .progress import ProgressLines, WaitCancelled, in_kernel, wait_all  # noqa: F401
from .promotion import PROMOTABLE_HELP, Promotion, suggest_model_id  # noqa: F401
from .provision import GONE_STATES, RESUMABLE_STATES, Deployment, Provisioning, Trainer  # noqa: F401
from .sync import WeightSync

RUN_FILE = "run.json"

_OPEN_RUNS: dict[Path, "Run"] = {}
_OPEN_LOCK = threading.RLock()  # re-entrant: open_run closes the run it replaces while holding it


# ---------------------------------------------------------------------------------------------------
class Run:
    """A run directory and the backend objects it owns. Use `workbench.open(run_dir)` to get one.

    Its jobs are done by collaborators it owns (see the module docstring): `provisioning`, `weights`,
    `evaluation`, `promotion`; the methods below are the run's public face and delegate to them."""

    def __init__(self, run_dir: Path, backend, tokenizer=None):
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        record = RunRecord.load(path)
        self.ctx = RunContext(path=path, backend=backend, clients=Clients(backend), store=LineageStore(path),
                              record=record, tokenizer_override=tokenizer)
        self.provisioning = Provisioning(self.ctx)
        self.promotion = Promotion(self.ctx, self.provisioning)
        self.weights = WeightSync(self.ctx, self.provisioning, self.promotion)
        self.evaluation = Evaluation(self.ctx, self.provisioning)
        record.name = record.name or path.name
        record.backend = BackendRecord(base_url=backend.base_url,
                                       home=str(backend.home) if getattr(backend, "home", None) else None)
        record.created = record.created or _now_iso()
        if record.recipe is not None:
            self._adopt_recipe()
        self.ctx.save_record()
        job = self.job_id
        counter = self.ctx.counter
        counter.step = (self.store.last_step(job) or 0) if job else 0
        counter.data_consumed = self.store.last_data_consumed(job) if job else None
        if record.parent is not None and job and self.store.last_step(job) is None:
            counter.step = record.parent.step or 0  # a fork that has not trained yet continues its parent's count
            counter.data_consumed = record.parent.data_consumed

    # ---- what the run is ---------------------------------------------------------------------------
    path = property(lambda self: self.ctx.path, doc="The run directory.")
    name = property(lambda self: self.ctx.path.name, doc="The run's name (its directory's name).")
    backend = property(lambda self: self.ctx.backend, doc="The backend: base_url, api_key, home.")
    store = property(lambda self: self.ctx.store, doc="The run's `LineageStore`.")
    record = property(lambda self: self.ctx.record, doc="`run.json`, typed (`workbench.records.RunRecord`).")

    @property
    def step(self) -> int:
        """The last logged training step."""
        return self.ctx.counter.step

    @step.setter
    def step(self, value: int) -> None:
        self.ctx.counter.step = int(value)

    @property
    def data_consumed(self) -> int | None:
        """Data seen by the last logged step (when the loop logs it)."""
        return self.ctx.counter.data_consumed

    @data_consumed.setter
    def data_consumed(self, value: int | None) -> None:
        self.ctx.counter.data_consumed = value

    @property
    def state_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def info(self) -> dict:
        """A copy of what `run.json` records."""
        return json.loads(json.dumps(self.ctx.record.to_dict()))

    @property
    def closed(self) -> bool:
        """True after `run.close()`: the widgets say so, and every action refuses."""
        return self.ctx.closed

    _closed = closed  # the name the display helpers used before

    @property
    def job_id(self) -> str | None:
        t = self.ctx.record.trainer
        return t.job_id if t else None

    @property
    def deployment_ids(self) -> list[str]:
        return list(self.ctx.record.deployments)

    @property
    def trainer_manager(self):
        """The official `TrainerJobManager` on this run's backend."""
        return self.ctx.clients.trainers

    @property
    def deployment_manager(self):
        """The official `DeploymentManager` on this run's backend."""
        return self.ctx.clients.deployments

    @property
    def fireworks(self):
        """The official `FireworksClient` (checkpoint rows, promotion) on this run's backend."""
        return self.ctx.clients.fireworks

    @property
    def account_id(self) -> str:
        return self.ctx.clients.account_id

    @property
    def tokenizer(self):
        """The tokenizer of the run's base model (local catalog), for sampling through deployments."""
        return self.ctx.tokenizer()

    @property
    def _listeners(self):
        return self.ctx.listeners

    # ---- a recipe's log_path ------------------------------------------------------------------------
    def _adopt_recipe(self) -> None:
        """This directory is a recipe's `log_path` (its run.json names the policy trainer): view that run.

        The recipe's trainer becomes the run's trainer (`run.trainer()` reconnects to it), its
        `metrics.jsonl` is imported into the lineage (steps, losses, data consumed) and its
        `dataloader.json` gives each resumable checkpoint its data cursor. Re-opening re-imports."""
        rec = self.ctx.record
        policy = rec.trainers.get("policy")
        if not policy:
            return
        if not rec.trainer or rec.trainer.job_id != policy:
            if rec.trainer:
                rec.past_trainers.append(rec.trainer)
            rec.trainer = TrainerRecord(job_id=policy, base_model=rec.base_model, lora_rank=rec.lora_rank or 0,
                                        created="by the recipe", owner="recipe")
        self.import_recipe_metrics()

    def import_recipe_metrics(self) -> int:
        """(Re-)import a recipe's metrics.jsonl and dataloader.json into the lineage; returns the step count."""
        from workbench.records import DataloaderRecord, RecordError

        job = self.job_id
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
        try:
            cursors = DataloaderRecord.load(self.path).cursors
        except RecordError:
            cursors = {}
        for name, consumed in cursors.items():
            m = re.search(r"step-(\d+)$", name)
            self.store.record_checkpoint(job, name, kind="state", requested_type="state",
                                         step=int(m.group(1)) if m else None, data_consumed=consumed)
        return n

    # ---- the collaborators' methods ------------------------------------------------------------------
    def trainer(self, base_model: str | None = None, lora_rank: int | None = None,
                learning_rate: float | None = None, training_shape: str | None = None, wait: bool = False,
                **config) -> Trainer:
        """Create this run's trainer job, or reconnect to the one it already has (see `Provisioning.trainer`)."""
        return self.provisioning.trainer(base_model, lora_rank, learning_rate, training_shape, wait, **config)

    def deployment(self, deployment_id: str | None = None, base_model: str | None = None, wait: bool = True,
                   **config) -> Deployment:
        """Create a deployment linked to this run's trainer, or reconnect to it (see `Provisioning.deployment`)."""
        return self.provisioning.deployment(deployment_id, base_model, wait, **config)

    def syncer(self, deployment: str | Deployment | None = None):
        """The `workbench.sdk.WeightSyncer` from the trainer to the deployment."""
        return self.weights.syncer(deployment)

    def sync(self, name: str | None = None, checkpoint_type: str | None = None,
             deployment: str | Deployment | None = None) -> str:
        """Save sampler weights and hot-load them into the deployment; returns the snapshot identity."""
        return self.weights.sync(name, checkpoint_type, deployment)

    def save_state(self, name: str | None = None, ttl_seconds: int | None = None) -> str:
        """Save resumable train state (DCP: weights + optimizer) with its step and data consumed."""
        return self.weights.save_state(name, ttl_seconds)

    def load_state(self, name: str | None = None, with_optimizer: bool = True,
                   source_job_id: str | None = None) -> str:
        """Restore train state saved by `save_state` (default: the newest) and the run's step counter."""
        return self.weights.load_state(name, with_optimizer, source_job_id)

    def evaluate(self, prompts, scorer, name: str = "eval", **kwargs) -> EvalResult:
        """Sample `prompts` through the deployment, score them, record the score (see `Evaluation.evaluate`)."""
        return self.evaluation.evaluate(prompts, scorer, name, **kwargs)

    def checkpoint_rows(self, all_jobs: bool = True) -> list[dict]:
        """The control plane's checkpoint rows of this run's trainer job(s), joined with the lineage."""
        return self.promotion.checkpoint_rows(all_jobs)

    def checkpoints_frame(self):
        """`checkpoint_rows()` as a pandas DataFrame."""
        return self.promotion.checkpoints_frame()

    def promote(self, checkpoint=None, output_model_id: str | None = None, base_model: str | None = None,
                alias: str | None = None) -> dict:
        """Promote a promotable checkpoint to a model (and move `alias` to it, e.g. "champion")."""
        return self.promotion.promote(checkpoint, output_model_id, base_model, alias)

    def aliases(self) -> AliasStore:
        """The aliases (`champion`, `candidate`, ...) of the runs in this run's folder, with their history."""
        return self.promotion.aliases()

    # ---- training steps --------------------------------------------------------------------------
    def log(self, step: int, data_consumed: int | None = None, **metrics) -> None:
        """Record one training step's metrics (cheap: buffered, committed at syncs/evals/loop end)."""
        job = self.job_id
        if job is None:
            raise RuntimeError("call run.trainer(...) before logging steps")
        self.ctx.counter.step = int(step)
        if data_consumed is not None:
            self.ctx.counter.data_consumed = int(data_consumed)
        self.store.log_step(job, step, metrics, data_consumed)
        self.ctx.notify("step", {"step": step, "metrics": metrics})

    # ---- forks ----------------------------------------------------------------------------------
    def fork(self, name: str, from_checkpoint: str | dict | None = None, **trainer_config) -> "Run":
        """A new run `name` (a sibling directory) whose trainer starts from one of this run's train states.

        from_checkpoint: a train state (`run.save_state` name or row), or a sampler snapshot (then the train
        state saved at the same step is used, and named), default the newest train state. The fork gets a
        new trainer job with this run's base model and rank (override with `trainer_config`, e.g.
        learning_rate), loads that state (weights and optimizer) before anything else, continues the step
        and data counters from it, and records its parent in run.json (`wb.runs()` shows the tree).
        Calling it again (a rerun cell, a restarted kernel) opens the same fork; nothing is created twice.
        """
        self.ctx.check_open()
        child_path = Path(name) if os.sep in str(name) else self.path.parent / name
        child_path = child_path.expanduser().resolve()
        if child_path == self.path.resolve():
            raise ValueError("a fork needs a new run name (it would be this run's own directory)")
        existing = RunRecord.load(child_path) if RunRecord.exists_in(child_path) else None
        if existing is not None and existing.parent is not None and existing.trainer and \
                existing.trainer.init_checkpoint:
            if Path(existing.parent.run).resolve() != self.path.resolve():
                raise ValueError(f"{child_path} is already a fork of {existing.parent.run}; pick another name")
            child = self._open_sibling(child_path)
            child.trainer().wait()
            return child
        if existing is not None and existing.trainer and existing.parent is None:
            raise ValueError(f"{child_path} already holds a run with its own trainer; pick another name for the fork")
        state = self._fork_source(from_checkpoint)
        parent_rec = self.ctx.record.trainer
        if parent_rec is None:
            raise RuntimeError("this run has no trainer to fork from")
        child = self._open_sibling(child_path)
        child.ctx.record.parent = ParentRecord(run=str(self.path.resolve()), job_id=state["job_id"],
                                               checkpoint=state["checkpoint_id"], step=state.get("step"),
                                               data_consumed=state.get("data_consumed"))
        child.ctx.save_record()
        config = {"base_model": parent_rec.base_model, "lora_rank": parent_rec.lora_rank,
                  "learning_rate": parent_rec.learning_rate, **trainer_config}
        t = child.trainer(wait=True, **config)
        path = t.client.resolve_checkpoint_path(state["checkpoint_id"], source_job_id=state["job_id"])
        t.client.load_state_with_optimizer(path).result()
        child.ctx.record.trainer.init_checkpoint = state["checkpoint_id"]
        child.ctx.save_record()
        child.ctx.counter.step = int(state.get("step") or 0)
        child.ctx.counter.data_consumed = state.get("data_consumed")
        child.store.record_event("forked", {"parent": str(self.path), "job_id": state["job_id"],
                                            "checkpoint": state["checkpoint_id"], "step": state.get("step")})
        self.store.record_event("fork", {"child": str(child_path), "checkpoint": state["checkpoint_id"]})
        return child

    def _open_sibling(self, path: Path) -> "Run":
        home = getattr(self.backend, "home", None)
        if home:
            return open_run(path, home=home)
        return open_run(path, base_url=self.backend.base_url, api_key=self.backend.api_key)

    def _fork_source(self, checkpoint) -> dict:
        """The train-state row a fork starts from (see `fork`)."""
        rows = self.checkpoint_rows()
        states = [r for r in rows if r["kind"] == "state"]
        if not states:
            raise RuntimeError("this run has no saved train state to fork from: run.save_state() saves one")
        if checkpoint is None:
            return states[-1]
        if isinstance(checkpoint, dict):
            checkpoint = checkpoint.get("checkpoint_id") or checkpoint.get("checkpoint") or checkpoint.get("name")
        if hasattr(checkpoint, "snapshot"):  # an EvalResult
            checkpoint = checkpoint.snapshot
        key = str(checkpoint).split("/")[-1]
        row = next((r for r in rows if key in (r["checkpoint_id"], r["logical_name"])), None)
        if row is None:
            raise ValueError(f"no checkpoint {key!r} on this run; train states: "
                             + ", ".join(r["checkpoint_id"] for r in states[-6:]))
        if row["kind"] == "state":
            return row
        same = [r for r in states if r.get("step") is not None and r.get("step") == row.get("step")]
        if not same:
            steps = ", ".join(f"{r['checkpoint_id']} (step {r.get('step')})" for r in states[-6:])
            raise ValueError(f"{key} is a sampler snapshot (weights only, no optimizer state) and no train state "
                             f"was saved at its step {row.get('step')}; a fork starts from train state: "
                             f"{steps}. Call run.save_state() next to run.sync() to make every synced step forkable.")
        print(f"note: forking from train state {same[-1]['checkpoint_id']}, saved at the same step "
              f"({row.get('step')}) as snapshot {key}.")
        return same[-1]

    # ---- views ------------------------------------------------------------------------------------
    def monitor(self, total: int | None = None, metric: str = "loss", **kwargs):
        """A live training monitor (progress, loss curve, weight syncs, last eval, deployment identity)."""
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

    def syncs(self, deployment: str | None = None):
        """Weight syncs: hot-load time, sampler pause, delta bytes, changed fraction, chain length, lag."""
        from .widgets import SyncPanel

        return SyncPanel(self, deployment)

    def dashboard(self, name: str | None = None):
        from .widgets import Dashboard

        return Dashboard(self, name=name)

    # ---- housekeeping -----------------------------------------------------------------------------
    def _http(self, method: str, path: str, **kw) -> dict:
        return self.ctx.clients.http(method, path, **kw)

    def status(self) -> dict:
        """Live state of the run's trainer job and deployments (one GET each); never raises."""
        out: dict[str, Any] = {"base_url": self.backend.base_url, "step": self.step, "trainer": None,
                               "deployments": {}, "backend": "running"}
        if self.job_id:
            try:
                job = self.trainer_manager.try_get(self.job_id)
                out["trainer"] = {"job_id": self.job_id, "state": job.get("state") if job else "missing"}
            except Exception as e:  # noqa: BLE001 - a status display never raises
                out["trainer"] = {"job_id": self.job_id, "state": _unreachable(e)}
                out["backend"] = "stopped" if _is_connection_error(e) else "unreachable"
        for dep_id in self.deployment_ids:
            held = None
            if out["backend"] != "running":
                state = "backend stopped" if out["backend"] == "stopped" else "unreachable"
            else:
                try:
                    info = self.deployment_manager.get(dep_id)
                    state = info.state if info else "missing"
                    if info and state == "READY":
                        d = self.provisioning.deployment_handles.get(dep_id) or Deployment(
                            owner=self.provisioning, deployment_id=dep_id, base_model=info.base_model or "")
                        try:
                            held = d.current_snapshot()
                        except Exception:  # noqa: BLE001
                            held = "?"
                except Exception as e:  # noqa: BLE001
                    state = _unreachable(e)
                    if _is_connection_error(e):
                        out["backend"] = "stopped"
            last = self.store.last_hotload(dep_id)
            out["deployments"][dep_id] = {"state": state, "holds": held,
                                          "expected": last["snapshot"] if last else None,
                                          "expected_step": last.get("step") if last else None}
        return out

    def _check_open(self) -> None:
        self.ctx.check_open()

    def close(self, stop_backend: bool = False) -> None:
        """Close the run's clients (the trainer job and deployments keep running). `stop_backend=True` also
        stops the local backend (and every trainer and deployment process it runs). Open widgets say so."""
        if self.ctx.closed:
            if stop_backend and not self.ctx.backend_stopped:
                from workbench.quiet import expect_backend_gone

                expect_backend_gone(self.backend.base_url)
                self.ctx.backend_stopped = stop_local_backend(self.backend)
                self.ctx.notify("closed", {"backend_stopped": self.ctx.backend_stopped})
            return
        self.store.flush()
        t = self.provisioning.trainer_handle
        if t is not None and t.service is not None:
            try:
                t.service.close()
            except Exception:  # noqa: BLE001
                pass
        self.ctx.closed = True
        with _OPEN_LOCK:
            if _OPEN_RUNS.get(self.path.resolve()) is self:
                del _OPEN_RUNS[self.path.resolve()]
        if stop_backend:
            from workbench.quiet import expect_backend_gone

            expect_backend_gone(self.backend.base_url)
            self.ctx.backend_stopped = stop_local_backend(self.backend)
        self.store.flush()  # the store stays readable: the views of a closed run still show its history
        self.ctx.notify("closed", {"backend_stopped": self.ctx.backend_stopped})

    def __repr__(self) -> str:
        return _run_text(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": _run_text(self), "text/html": _run_html(self)}


def _is_connection_error(e: BaseException) -> bool:
    import httpx

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx.ConnectError, ConnectionRefusedError, ConnectionError)):
            return True
        if "Connection refused" in str(e) or "ConnectError" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
    return False


def _unreachable(e: BaseException) -> str:
    return "backend stopped" if _is_connection_error(e) else f"unreachable ({type(e).__name__})"


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
    record = RunRecord.load(path)
    recorded = record.backend or BackendRecord()
    is_recipe = record.recipe is not None
    if existing is not None and not existing._closed and base_url is None and home is None:
        if not is_recipe:
            return existing
        existing.close()  # a recipe's log_path changes under us: read it again
    if base_url:
        backend = connect(base_url=base_url, api_key=api_key or os.environ.get("FIREWORKS_API_KEY"))
    elif home is not None:
        backend = connect(home=home)
    elif recorded.home:
        backend = connect(home=recorded.home)
    elif recorded.base_url:
        key = api_key or os.environ.get("FIREWORKS_API_KEY")
        if not key:
            raise RuntimeError(f"this run uses the service at {recorded.base_url}: pass api_key= or set "
                               "FIREWORKS_API_KEY")
        backend = connect(base_url=recorded.base_url, api_key=key)
    else:
        backend = connect()
    run = Run(path, backend, tokenizer=tokenizer)
    with _OPEN_LOCK:
        old = _OPEN_RUNS.get(path)
        if old is not None and not old._closed:
            old.close()
        _OPEN_RUNS[path] = run
    return run
