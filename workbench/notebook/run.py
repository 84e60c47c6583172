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

Where things are
----------------
This module holds the session itself: `Run` (run.json, the SDK managers, step logging, the views, status,
close) and `open_run` (what `workbench.open` calls: one `Run` per directory per kernel). `Run`'s larger
jobs live beside it and are mixed into the class; every name is still importable from here:

    provision.py   Trainer, Deployment; run.trainer / run.deployment: create, reconnect, resume, await
    sync.py        run.sync (weight sync + hot-load), run.save_state / run.load_state
    evaluation.py  run.evaluate, EvalResult, the staleness check, sampling through the deployment
    promotion.py   run.checkpoint_rows / checkpoints_frame, run.promote, PromotionError's explanations
    display.py     repr(run) and its HTML
    common.py      StaleDeploymentError, PromotionError, POLL_S, small name/time helpers
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from pathlib import Path
from typing import Any

# Everything below was defined in this module before it was split: it stays importable from here.
from .common import POLL_S, PromotionError, StaleDeploymentError, _now_iso, _short_state, _slug  # noqa: F401
from .display import _run_html, _run_summary, _run_text  # noqa: F401
from .evaluation import (EvalResult, EvaluationMixin, _call_scorer, _clean, _jsonable, _messages_of,  # noqa: F401
                         _run_async, _sample_all)
from .lineage import LineageStore, logical_name, prompt_set_hash  # noqa: F401
from .progress import ProgressLines, WaitCancelled, in_kernel, wait_all  # noqa: F401
from .promotion import PROMOTABLE_HELP, PromotionMixin, _parse_time, _short_type, suggest_model_id  # noqa: F401
from .provision import (GONE_STATES, RESUMABLE_STATES, Deployment, ProvisioningMixin, Trainer,  # noqa: F401
                        _cancellable)
from .sync import SyncMixin

RUN_FILE = "run.json"
RUN_FORMAT = 1

_OPEN_RUNS: dict[Path, "Run"] = {}
_OPEN_LOCK = threading.Lock()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
class Run(ProvisioningMixin, SyncMixin, EvaluationMixin, PromotionMixin):
    """A run directory and the backend objects it owns. Use `workbench.open(run_dir)` to get one.

    The trainer/deployment methods come from `ProvisioningMixin` (provision.py), `sync`/`save_state`/
    `load_state` from `SyncMixin` (sync.py), `evaluate` from `EvaluationMixin` (evaluation.py), and
    `checkpoint_rows`/`promote` from `PromotionMixin` (promotion.py)."""

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
