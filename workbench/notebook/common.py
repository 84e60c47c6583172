"""Small pieces shared by the run session's modules: what every collaborator of a `Run` receives
(`RunContext`), its two errors, the poll interval, names and times.

`run.py` re-exports the errors, so `from workbench.notebook.run import StaleDeploymentError, PromotionError`
(and `wb.StaleDeploymentError`, `wb.PromotionError`) keep working; import from here only inside the package
(`provision.py`, `sync.py`, `evaluation.py`, `promotion.py`, `display.py`).
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.records import RunRecord

POLL_S = 0.5
"""Seconds between the SDK's readiness polls (trainer, deployment, re-attach)."""


class StaleDeploymentError(RuntimeError):
    """The deployment does not hold the snapshot this run expects; nothing was recorded."""


class PromotionError(ValueError):
    """A promotion that cannot work, with what to do instead."""


# Public names of `workbench.notebook.run` (re-exported there and from `workbench`): keep tracebacks and
# pickles naming them where users import them from.
StaleDeploymentError.__module__ = PromotionError.__module__ = "workbench.notebook.run"


def _slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return (s[:max_len].strip("-") or "run")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _short_state(state: str | None) -> str:
    return (state or "?").replace("JOB_STATE_", "")


@dataclass
class Counter:
    """The run's position: the last logged training step and the data seen by then."""

    step: int = 0
    data_consumed: int | None = None


class Clients:
    """The official SDK managers of one backend (one each, made on first use) and plain HTTP to it."""

    def __init__(self, backend):
        self.backend = backend
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _get(self, kind: str):
        with self._lock:
            if kind not in self._made:
                from fireworks.training.sdk import DeploymentManager, FireworksClient, TrainerJobManager

                cls = {"trainer": TrainerJobManager, "deployment": DeploymentManager, "fireworks": FireworksClient}[kind]
                self._made[kind] = cls(api_key=self.backend.api_key, base_url=self.backend.base_url)
            return self._made[kind]

    @property
    def trainers(self):
        """`TrainerJobManager`."""
        return self._get("trainer")

    @property
    def deployments(self):
        """`DeploymentManager`."""
        return self._get("deployment")

    @property
    def fireworks(self):
        """`FireworksClient` (checkpoint rows, promotion)."""
        return self._get("fireworks")

    @property
    def account_id(self) -> str:
        return self.deployments.account_id

    def http(self, method: str, path: str, **kw) -> dict:
        """One request on the wire contract (for what the SDK has no call for); raises on an HTTP error."""
        import httpx

        r = httpx.request(method, self.backend.base_url + path, headers={"X-Api-Key": self.backend.api_key},
                          timeout=30, **kw)
        r.raise_for_status()
        return r.json() if r.content else {}


@dataclass(eq=False)
class RunContext:
    """What a run's collaborators (provisioning, sync, evaluation, promotion) share: its directory and name,
    the backend's clients, the lineage store, the typed run.json record, the step counter and the event
    listeners. The `Run` makes one and hands it to each; nothing else is reachable from here."""

    path: Path
    """The run directory."""
    backend: Any
    """`workbench.connect.Backend`: base_url, api_key, home."""
    clients: Clients
    """SDK managers and HTTP on this backend."""
    store: Any
    """The run's `LineageStore`."""
    record: RunRecord
    """The run's `run.json`, typed; `save_record()` writes the notebook's fields."""
    counter: Counter = field(default_factory=Counter)
    """Last step and data consumed."""
    closed: bool = False
    """Set by `run.close()`: every action then refuses with a clear message."""
    backend_stopped: bool = False
    """Set by `run.close(stop_backend=True)`: the views say the backend is stopped."""
    listeners: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)
    """Widgets following the run (`on_run_event(kind, data)`)."""
    tokenizer_override: Any = None
    """A tokenizer passed to `wb.open(..., tokenizer=)`; else the base model's from the local catalog."""

    NOTEBOOK_FIELDS = ("format", "name", "created", "backend", "trainer", "past_trainers", "deployments", "parent")
    """The run.json fields the notebook layer writes (a recipe sharing the directory writes the others)."""

    @property
    def name(self) -> str:
        return self.path.name

    def tokenizer(self):
        """The tokenizer of the run's base model, for sampling through deployments (loaded once)."""
        if self.tokenizer_override is None:
            rec = self.record
            base = (rec.trainer.base_model if rec.trainer else None) or next(
                (d.base_model for d in rec.deployments.values() if d.base_model), None) or rec.base_model
            if base is None:
                raise RuntimeError("no base model yet: call run.trainer(...) first, or pass tokenizer= to wb.open")
            from workbench.models import load_tokenizer

            try:
                self.tokenizer_override = load_tokenizer(base)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"cannot load a tokenizer for {base!r} ({e}); pass tokenizer= to "
                                   "wb.open(...) or to run.evaluate(...)") from e
        return self.tokenizer_override

    def save_record(self) -> None:
        self.record.save(self.path, only=self.NOTEBOOK_FIELDS)

    def notify(self, kind: str, data: dict) -> None:
        for listener in list(self.listeners):
            try:
                listener.on_run_event(kind, data)
            except Exception:  # noqa: BLE001 - a display must never break training
                pass

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this run was closed; wb.open(run_dir) opens it again")
