"""Save, resume and promote inside a recipe: `TrainingCheckpoints` (the cookbook's class).

    ckpt = TrainingCheckpoints(client, rlor_mgr, trainer_id=job_id, log_path=cfg.log_path,
                               lora_rank=cfg.lora_rank, save_every=cfg.weight_sync.dcp_save_interval)
    info = ckpt.resume(init_from_checkpoint=cfg.init_from_checkpoint,
                       warm_start_from_adapter=cfg.warm_start_from_adapter)
    step, data_consumed = (info.step, info.data_consumed) if info else (0, 0)
    ...
    if ckpt.should_save(step):
        ckpt.save(f"step-{step}", resumable=True, promotable=False, data_consumed=data_consumed)
    ...
    ckpt.save(f"step-{step}", resumable=True, promotable=True, data_consumed=data_consumed)   # final
    if cfg.output_model_id:
        ckpt.promote_latest(cfg.output_model_id, cfg.base_model)

Two sources of truth, as in the cookbook:
* the control plane (`FireworksClient.list_checkpoints(job_id)`) for which checkpoints exist, their type
  and whether they are promotable: resume and promotion query it, never a local registry;
* `<log_path>/dataloader.json`, `{checkpoint name: data_consumed}` for the newest 20 resumable saves:
  the data cursor has no server-side representation.

`save(resumable=True)` writes the dataloader.json entry BEFORE the DCP save (the value is known then),
so every resumable row a kill can leave behind has its cursor; an entry whose save never finished is
never used, because resume only considers rows the control plane lists. A save whose row already
exists (a final save at a step that was just saved periodically, or a save a killed run finished) is
not repeated. `save(promotable=True)` writes a `base` sampler snapshot unless a promotable row of that
logical name exists (e.g. the RL weight sync of a LoRA run already wrote one).

`resume()` priority:
1. the newest resumable row of THIS trainer that has a dataloader.json entry (auto-resume): weights +
   optimizer load, step parsed from `step-N`, data cursor from dataloader.json;
2. otherwise `init_from_checkpoint="job-id:checkpoint-name"`: weights + optimizer of that job's DCP
   checkpoint (`cross_job://`), step and data cursor reset to 0;
3. otherwise `warm_start_from_adapter` (LoRA only): adapter weights, fresh optimizer, step 0;
4. otherwise a fresh start (None).
(2) and (3) are mutually exclusive (`ConfigError`). Workbench differs from the cookbook's literal order
(which puts `init_from_checkpoint` first) on purpose: a rerun of a run that was started with
`init_from_checkpoint` must pick up its own progress instead of starting over from the source
checkpoint, or rerunning "with the same config" would silently lose work.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workbench import records

from .config import ConfigError, parse_checkpoint_ref

logger = logging.getLogger("workbench.recipes")

DATALOADER_FILE = records.DATALOADER_FILE
DATALOADER_KEEP = records.DATALOADER_KEEP
RESUMABLE_TYPES = ("CHECKPOINT_TYPE_TRAINING", "CHECKPOINT_TYPE_TRAINING_LORA")
_SESSION_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_STEP_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class ResumeInfo:
    """Where a run continues from."""

    step: int = 0
    """Optimizer steps already taken (the next step is step + 1)."""
    data_consumed: int = 0
    """Raw dataset rows consumed so far (dropped rows included)."""
    source: str = ""
    """What was loaded: "resume" (this run's own checkpoint), "init_from_checkpoint" or "adapter"."""
    checkpoint: str | None = None
    """The checkpoint (or adapter) that was loaded."""
    source_job_id: str | None = None
    """The job the checkpoint belongs to."""


def short_name(resource_name: str) -> str:
    """`accounts/a/rlorTrainerJobs/j/checkpoints/step-4` -> `step-4`."""
    return resource_name.rstrip("/").rsplit("/", 1)[-1]


def logical_name(short: str) -> str:
    """Strip the SDK's `-<8 hex>` session suffix from a sampler snapshot id (`step-5-45dda197` -> `step-5`)."""
    return _SESSION_SUFFIX.sub("", short)


def step_from_name(name: str) -> int | None:
    m = _STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def is_resumable(row: dict) -> bool:
    return (row.get("checkpointType") or "") in RESUMABLE_TYPES


def parse_time(value: str | None) -> datetime:
    """RFC 3339 -> aware datetime (mixed precisions compare correctly; unparseable sorts oldest)."""
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    if not value:
        return oldest
    s = value.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return oldest
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def newest_first(rows: list[dict]) -> list[dict]:
    """Sort by parsed createTime (never lexicographically), ties broken by the step number."""
    def key(r):
        name = short_name(r.get("name", ""))
        return parse_time(r.get("createTime")), step_from_name(logical_name(name)) or -1
    return sorted(rows, key=key, reverse=True)


class TrainingCheckpoints:
    """The cookbook's checkpoint manager: thin over the SDK, the control plane is the source of truth."""

    def __init__(self, client, fw_client, *, trainer_id: str, log_path: str | os.PathLike, lora_rank: int = 0,
                 save_every: int = 0, dcp_timeout: float = 2700):
        """`client`: the policy's training client (FiretitanTrainingClient); `fw_client`: a FireworksClient
        (a TrainerJobManager is one) for `list_checkpoints` / `promote_checkpoint`."""
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
            raise ConfigError(f"save_every (dcp_save_interval) must be an integer >= 0, got {save_every!r}")
        self.client = client
        self.fw = fw_client
        self.trainer_id = trainer_id
        self.log_path = Path(log_path).expanduser()
        self.lora_rank = lora_rank
        self.save_every = save_every
        self.dcp_timeout = dcp_timeout

    # ---- dataloader.json ---------------------------------------------------------------------------
    @property
    def dataloader_path(self) -> Path:
        return self.log_path / DATALOADER_FILE

    def read_dataloader(self) -> dict[str, int]:
        try:
            return records.DataloaderRecord.load(self.log_path).cursors
        except records.RecordError as e:
            raise ConfigError(str(e)) from None

    def _write_dataloader(self, name: str, data_consumed: int) -> None:
        entries = records.DataloaderRecord(self.read_dataloader())
        entries.put(name, data_consumed, keep=DATALOADER_KEEP)   # insertion order = age; keep the newest
        entries.save(self.log_path)

    def reset_dataloader(self) -> None:
        """Forget every cursor (the run starts over on a new trainer job)."""
        self.dataloader_path.unlink(missing_ok=True)

    # ---- control plane ---------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """This trainer's checkpoint rows, oldest first (the control plane's order)."""
        return self.fw.list_checkpoints(self.trainer_id)

    def latest_resumable(self) -> dict | None:
        """Newest resumable row of this trainer that has a dataloader.json entry."""
        cursors = self.read_dataloader()
        rows = [r for r in self.rows() if is_resumable(r) and short_name(r["name"]) in cursors]
        return newest_first(rows)[0] if rows else None

    # ---- save ------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True when `step` is due for a periodic resumable save (every `save_every` steps; 0 = never)."""
        return self.save_every > 0 and step > 0 and step % self.save_every == 0

    def save(self, name: str, *, resumable: bool, promotable: bool, data_consumed: int | None = None) -> dict:
        """Write a DCP train state (resumable) and/or a `base` sampler snapshot (promotable).

        Returns {"resumable": row id or None, "promotable": row id or None, "skipped": [...]}."""
        if not (resumable or promotable):
            raise ValueError("save() needs resumable=True and/or promotable=True")
        if resumable and data_consumed is None:
            raise ValueError("a resumable save needs data_consumed (the data cursor to resume from)")
        rows = self.rows()
        out: dict[str, Any] = {"resumable": None, "promotable": None, "skipped": []}
        if resumable:
            self._write_dataloader(name, data_consumed)
            if any(is_resumable(r) and short_name(r["name"]) == name for r in rows):
                logger.info("DCP checkpoint %r already exists on %s: not saving it again", name, self.trainer_id)
                out["skipped"].append("resumable")
            else:
                self.client.save_state(name).result(timeout=self.dcp_timeout)
                logger.info("saved DCP checkpoint %s (data_consumed=%s)", name, data_consumed)
            out["resumable"] = name
        if promotable:
            existing = [r for r in rows if r.get("promotable") and logical_name(short_name(r["name"])) == name]
            if existing:
                out["promotable"] = short_name(newest_first(existing)[0]["name"])
                out["skipped"].append("promotable")
                logger.info("promotable row %s already exists: no extra sampler save", out["promotable"])
            else:
                # A full-parameter weight sync may have written a (non-promotable) delta under this name in
                # this session; the base then goes under `<name>-base`.
                taken = {short_name(r["name"]) for r in rows}
                session = getattr(self.client, "session_id", None)
                sampler_name = name
                if session and f"{name}-{session}" in taken:
                    sampler_name = f"{name}-base"
                result = self.client.save_weights_for_sampler_ext(sampler_name, checkpoint_type="base")
                out["promotable"] = getattr(result, "snapshot_name", None) or sampler_name
                logger.info("saved promotable sampler snapshot %s", out["promotable"])
        return out

    # ---- resume ----------------------------------------------------------------------------------
    def resume(self, *, init_from_checkpoint: str | None = None,
               warm_start_from_adapter: str | None = None) -> ResumeInfo | None:
        """Load what the run continues from (see the module docstring for the priority)."""
        if init_from_checkpoint and warm_start_from_adapter:
            raise ConfigError("init_from_checkpoint and warm_start_from_adapter are mutually exclusive")
        if warm_start_from_adapter and not self.lora_rank:
            raise ConfigError("warm_start_from_adapter requires lora_rank > 0")
        source = parse_checkpoint_ref(init_from_checkpoint) if init_from_checkpoint else None

        latest = self.latest_resumable()
        if latest is not None:
            name = short_name(latest["name"])
            cursor = self.read_dataloader()[name]
            step = step_from_name(name)
            if step is None:
                step = int(latest.get("step") or 0)
            if init_from_checkpoint or warm_start_from_adapter:
                logger.info("resuming this run's own checkpoint %s; init_from_checkpoint / warm_start_from_adapter "
                            "only apply to the run's first start", name)
            self.client.load_state_with_optimizer(self.client.resolve_checkpoint_path(name)).result(
                timeout=self.dcp_timeout)
            logger.info("resumed from %s: step %d, data_consumed %d", name, step, cursor)
            return ResumeInfo(step=step, data_consumed=cursor, source="resume", checkpoint=name,
                              source_job_id=self.trainer_id)

        if source is not None:
            job_id, name = source
            path = self.client.resolve_checkpoint_path(name, source_job_id=job_id if job_id != self.trainer_id
                                                       else None)
            self.client.load_state_with_optimizer(path).result(timeout=self.dcp_timeout)
            logger.info("initialized from %s:%s (weights + optimizer); step and data cursor start at 0", job_id, name)
            return ResumeInfo(step=0, data_consumed=0, source="init_from_checkpoint", checkpoint=name,
                              source_job_id=job_id)

        if warm_start_from_adapter:
            self.client.load_adapter(warm_start_from_adapter).result(timeout=self.dcp_timeout)
            logger.info("warm start from adapter %s (weights only)", warm_start_from_adapter)
            return ResumeInfo(step=0, data_consumed=0, source="adapter", checkpoint=warm_start_from_adapter)
        return None

    # ---- promote ---------------------------------------------------------------------------------
    def promote_latest(self, output_model_id: str, base_model: str, *, checkpoint_name: str | None = None) -> dict:
        """Promote the newest promotable row of this trainer (optionally only rows of one logical name)."""
        rows = [r for r in self.rows() if r.get("promotable")]
        if checkpoint_name is not None:
            rows = [r for r in rows if checkpoint_name in (short_name(r["name"]), logical_name(short_name(r["name"])))]
        if not rows:
            raise RuntimeError(f"no promotable checkpoint on trainer job {self.trainer_id!r}"
                               + (f" matching {checkpoint_name!r}" if checkpoint_name else "")
                               + ": save(promotable=True) first")
        row = newest_first(rows)[0]
        logger.info("promoting %s -> %s", short_name(row["name"]), output_model_id)
        return self.fw.promote_checkpoint(name=row["name"], output_model_id=output_model_id, base_model=base_model)
