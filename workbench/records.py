"""The run directory's records, typed: `run.json` and `dataloader.json`, shared by the recipes and the notebook.

    from workbench.records import RunRecord, DataloaderRecord
    rec = RunRecord.load(run_dir)              # an empty record if run.json does not exist yet
    rec.trainers["policy"] = "sft-1a2b3c4d"    # a recipe's trainer roles
    rec.trainer = TrainerRecord(job_id=..., base_model=..., lora_rank=0)   # the notebook's trainer
    rec.save(run_dir)                          # atomic (workbench.common.write_json_atomic)

    cursors = DataloaderRecord.load(log_path)  # {checkpoint name: data consumed}, newest last
    cursors.put("step-40", 320); cursors.save(log_path)

One schema, two writers. A recipe writes its fields (`recipe`, `trainers`, `deployment_id`, `status`,
`summary`, ...); a notebook `Run` opened on the same directory writes its own (`trainer`, `deployments`,
`backend`, `parent`, ...). `save(dir, only=(...))` re-reads the file and replaces just the named fields,
so two writers never drop each other's fields; fields this version does not know are kept in `extra` and
written back unchanged. `format` guards against a newer layout: reading a record with a higher format
raises instead of silently dropping what it cannot understand.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from workbench.common import atomic_write_text, write_json_atomic

RUN_FILE = "run.json"
DATALOADER_FILE = "dataloader.json"
RUN_FORMAT = 1
DATALOADER_KEEP = 20


class RecordError(ValueError):
    """A record file that cannot be read (invalid JSON, a newer format); the message names the file."""


def _write(path: Path, data: Any) -> None:
    """Atomic JSON (workbench.common); values JSON cannot hold (a recipe summary's paths) are written as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.loads(json.dumps(data, default=str)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def _build(cls, data):
    """A dataclass from a dict, ignoring keys the class does not define (a newer writer's additions)."""
    if data is None or isinstance(data, cls):
        return data
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dict(data).items() if k in names})


# ---- the pieces of run.json ------------------------------------------------------------------------
@dataclass
class BackendRecord:
    """Where the run's backend is."""

    base_url: str | None = None
    """Root URL of the service."""
    home: str | None = None
    """The local backend's home directory (None for a remote service)."""


@dataclass
class TrainerRecord:
    """The notebook run's trainer job (recipes record theirs by role in `RunRecord.trainers`)."""

    job_id: str
    """The control plane's job id, chosen client-side and written before the create request."""
    job_name: str | None = None
    """`accounts/<a>/rlorTrainerJobs/<job_id>`."""
    base_model: str | None = None
    """The model the job trains."""
    lora_rank: int = 0
    """0 for full-parameter training."""
    learning_rate: float | None = None
    """The job's configured learning rate (the AdamParams of each step decide the step's rate)."""
    training_shape: str | None = None
    """The training shape the job was created with."""
    requested: str | None = None
    """When the create request was about to be sent (RFC 3339)."""
    created: str | None = None
    """When the create request succeeded; None if it never completed (a rerun creates it with the same id)."""
    owner: str | None = None
    """"recipe" when the job belongs to a recipe run in this directory."""
    init_checkpoint: str | None = None
    """For a fork: the train state the job was loaded from before its first step."""


@dataclass
class DeploymentRecord:
    """One deployment of a notebook run, and the snapshot it should hold."""

    base_model: str | None = None
    """The deployment's base model."""
    trainer_job: str | None = None
    """The trainer job it hot-loads from (`job_name`)."""
    created: str | None = None
    """When this run first asked for it."""
    snapshot: str | None = None
    """The snapshot this run last hot-loaded into it."""
    snapshot_step: int | None = None
    """The training step of that snapshot."""
    synced: str | None = None
    """When that hot-load finished."""


@dataclass
class ParentRecord:
    """Where a forked run comes from (`run.fork(...)`)."""

    run: str
    """The parent run's directory."""
    job_id: str
    """The parent's trainer job."""
    checkpoint: str
    """The parent's train state the fork starts from."""
    step: int | None = None
    """The parent's step at that checkpoint (the fork's first step is step + 1)."""
    data_consumed: int | None = None
    """Data seen by the parent at that checkpoint (the fork continues counting from it)."""


@dataclass
class RunRecord:
    """`<run_dir>/run.json`: what a run created and uses, so reopening the directory reconnects to it."""

    format: int = RUN_FORMAT
    """Layout version of this file."""
    name: str | None = None
    """The run's name (its directory name)."""
    created: str | None = None
    """When the directory became a run."""
    backend: BackendRecord | None = None
    """The backend the run uses (notebook)."""
    trainer: TrainerRecord | None = None
    """The notebook run's trainer job."""
    past_trainers: list[TrainerRecord] = field(default_factory=list)
    """Trainer jobs the notebook run had before (deleted, or replaced); their history stays in the lineage."""
    deployments: dict[str, DeploymentRecord] = field(default_factory=dict)
    """The notebook run's deployments by id."""
    parent: ParentRecord | None = None
    """Set on a fork: the run and checkpoint it started from."""
    # ---- written by a recipe (its log_path) ----
    recipe: str | None = None
    """The recipe that owns the directory ("sft", "dpo", "orpo", "rl"), if any."""
    base_model: str | None = None
    """The recipe's base model."""
    lora_rank: int | None = None
    """The recipe's LoRA rank."""
    status: str | None = None
    """"running" or "completed" (recipes)."""
    trainers: dict[str, str] = field(default_factory=dict)
    """A recipe's trainer job ids by role ("policy", "reference")."""
    previous_trainers: list[str] = field(default_factory=list)
    """A recipe's trainer job ids replaced by a new one."""
    deployment_id: str | None = None
    """A recipe's deployment (RL)."""
    deployment_created: bool | None = None
    """True if the recipe created that deployment (and so deletes it when done)."""
    training_started: bool | None = None
    """True once the recipe took its first optimizer step on the recorded trainer."""
    reference: Any = None
    """How an RL recipe's reference model is provided."""
    summary: dict | None = None
    """A completed recipe's summary."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields this version does not know, kept as they were."""

    # ---- reading and writing ----
    @classmethod
    def path_in(cls, run_dir: str | os.PathLike) -> Path:
        return Path(run_dir).expanduser() / RUN_FILE

    @classmethod
    def from_dict(cls, data: dict, source: str = RUN_FILE) -> "RunRecord":
        data = dict(data)
        if int(data.get("format", RUN_FORMAT)) > RUN_FORMAT:
            raise RecordError(f"{source} was written by a newer workbench (format {data['format']}); upgrade "
                              "workbench to open it")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        rec = cls(**known, extra=data)
        rec.backend = _build(BackendRecord, rec.backend)
        rec.trainer = _build(TrainerRecord, rec.trainer)
        rec.parent = _build(ParentRecord, rec.parent)
        rec.past_trainers = [_build(TrainerRecord, t) for t in rec.past_trainers or []]
        rec.deployments = {k: _build(DeploymentRecord, v or {}) for k, v in (rec.deployments or {}).items()}
        rec.trainers = dict(rec.trainers or {})
        rec.previous_trainers = list(rec.previous_trainers or [])
        return rec

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "RunRecord":
        """The record in `run_dir` (an empty one if there is none yet)."""
        path = cls.path_in(run_dir)
        if not path.exists():
            return cls()
        data = _read_json(path)
        if not isinstance(data, dict):
            raise RecordError(f"{path} does not hold a JSON object; fix or remove it")
        return cls.from_dict(data, str(path))

    @classmethod
    def exists_in(cls, run_dir: str | os.PathLike) -> bool:
        return cls.path_in(run_dir).exists()

    def to_dict(self) -> dict:
        """The JSON form: unset optional fields left out, unknown fields kept."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None or value == {} or value == []:
                continue
            out[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else _plain(value)
        return out

    def save(self, run_dir: str | os.PathLike, only: tuple[str, ...] | None = None) -> None:
        """Write run.json atomically. `only`: re-read the file and replace just these fields (and keep every
        other writer's), so a notebook and a recipe sharing a directory never drop each other's fields."""
        path = self.path_in(run_dir)
        if only is None:
            _write(path, self.to_dict())
            return
        current = RunRecord.load(run_dir) if path.exists() else RunRecord()
        for name in only:
            setattr(current, name, getattr(self, name))
        _write(path, current.to_dict())

    def update(self, run_dir: str | os.PathLike, **values) -> None:
        """Set fields and save just those (the recipes' way: one field group per event)."""
        for k, v in values.items():
            if k not in {f.name for f in fields(self)} or k == "extra":
                raise AttributeError(f"run.json has no field {k!r}")
            setattr(self, k, v)
        self.save(run_dir, only=tuple(values))


def _plain(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---- dataloader.json ----------------------------------------------------------------------------------
@dataclass
class DataloaderRecord:
    """`<log_path>/dataloader.json`: the data cursor of each resumable save, `{name: data_consumed}`.

    Insertion order is age; only the newest `DATALOADER_KEEP` are kept. The entry is written before the
    train state is saved, so a save that finished always has its cursor."""

    cursors: dict[str, int] = field(default_factory=dict)
    """Checkpoint name (without session suffix) -> dataset rows consumed when it was saved."""

    @staticmethod
    def path_in(log_path: str | os.PathLike) -> Path:
        return Path(log_path).expanduser() / DATALOADER_FILE

    @classmethod
    def load(cls, log_path: str | os.PathLike) -> "DataloaderRecord":
        path = cls.path_in(log_path)
        if not path.exists():
            return cls()
        data = _read_json(path)
        if not isinstance(data, dict):
            raise RecordError(f"{path} does not hold a JSON object; fix or remove it")
        try:
            return cls({str(k): int(v) for k, v in data.items()})
        except (TypeError, ValueError):
            raise RecordError(f"{path} maps names to non-integers; fix or remove it") from None

    def put(self, name: str, data_consumed: int, keep: int = DATALOADER_KEEP) -> None:
        self.cursors.pop(name, None)
        self.cursors[name] = int(data_consumed)
        self.cursors = dict(list(self.cursors.items())[-keep:])

    def save(self, log_path: str | os.PathLike) -> None:
        path = self.path_in(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.cursors, indent=2) + "\n")  # insertion order is age: not sorted


__all__ = ["RunRecord", "TrainerRecord", "DeploymentRecord", "BackendRecord", "ParentRecord", "DataloaderRecord",
           "RecordError", "RUN_FILE", "DATALOADER_FILE"]
