"""Checkpoint rows and promotion: which checkpoints the run's trainer has, and turning one into a model.

    run.checkpoint_rows(); run.checkpoints_frame()          # control-plane rows joined with the lineage
    run.promote("step-00040", output_model_id="colors-v1")  # only full snapshots (base / LoRA) promote
    run.promote(best, output_model_id="colors-v2", alias="champion")   # ... and move the alias to it

The control plane is the source of truth for checkpoints (`FireworksClient.list_checkpoints`); the lineage
adds step, data consumed, last eval score, where it was hot-loaded, and the models promoted from it.
`Promotion.promote` (the `Run`'s collaborator; it receives the `RunContext` and the `Provisioning`) refuses
what cannot work with a `PromotionError` that says what to do instead (an invalid or taken model id, a
delta or train-state row, an unknown name).

Aliases (`champion`, `candidate`, any name) point at promoted models across the runs of one folder; moving
one keeps its history (`AliasStore` in lineage.py, `<runs folder>/aliases.sqlite`).
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .common import PromotionError, RunContext, _slug
from .lineage import AliasStore, logical_name

if TYPE_CHECKING:
    from .provision import Provisioning

PROMOTABLE_HELP = ("Only full snapshots can become models: `base` sampler snapshots of a full-parameter run "
                   "(CHECKPOINT_TYPE_INFERENCE_BASE) and LoRA adapters (CHECKPOINT_TYPE_INFERENCE_LORA).")


def suggest_model_id(text: str) -> str:
    """A valid model id (1-63 of a-z, 0-9, -) close to `text`."""
    return _slug(text, 63)


def _parse_time(value) -> float | None:
    if not value:
        return None
    try:
        import pandas as pd

        return pd.Timestamp(value).timestamp()
    except Exception:  # noqa: BLE001 - an unparseable time sorts first, it never breaks a table
        return None


def _short_type(ctype: str | None) -> str:
    return {"CHECKPOINT_TYPE_INFERENCE_BASE": "base", "CHECKPOINT_TYPE_INFERENCE_ARC_V2": "delta",
            "CHECKPOINT_TYPE_INFERENCE_LORA": "lora", "CHECKPOINT_TYPE_TRAINING": "train state",
            "CHECKPOINT_TYPE_TRAINING_LORA": "train state (lora)"}.get(ctype or "", (ctype or "?").replace(
                "CHECKPOINT_TYPE_", "").lower())


class Promotion:
    """Checkpoint rows and promotion (see the module docstring)."""

    def __init__(self, ctx: RunContext, provisioning: "Provisioning"):
        self.ctx, self.provisioning = ctx, provisioning

    # ---- checkpoint rows (the control plane is the source of truth) ---------------------------------
    def _rows(self, job_id: str) -> list[dict]:
        try:
            return self.ctx.clients.fireworks.list_checkpoints(job_id)
        except Exception as e:  # noqa: BLE001 - a deleted job's rows are simply gone
            if "404" in str(e):
                return []
            raise

    def refresh_rows(self, job_id: str, only: set[str] | None = None) -> list[dict]:
        """The job's rows from the control plane, recorded in the lineage (all, or the ids in `only`)."""
        rows = self._rows(job_id)
        for r in rows:
            cid = r["name"].split("/")[-1]
            if only is not None and cid not in only:
                continue
            kind = "state" if r.get("checkpointType", "").startswith("CHECKPOINT_TYPE_TRAINING") else "sampler"
            self.ctx.store.record_checkpoint(job_id, cid, kind=kind, name=r["name"],
                                         checkpoint_type=r.get("checkpointType"), promotable=r.get("promotable"),
                                         step=r.get("step"), created=_parse_time(r.get("createTime")),
                                         size_bytes=r.get("sizeBytes"))
        return rows

    def _bucket_sizes(self) -> dict[str, int]:
        """Sampler snapshot sizes in bytes, read from the hot-load bucket a deployment of this run points at
        (`hotLoadBucketUrl` on the wire) when that is a local `file://` directory; {} otherwise."""
        sizes: dict[str, int] = {}
        clients = self.ctx.clients
        for dep_id in self.ctx.record.deployments:
            try:
                url = clients.http("GET", f"/v1/accounts/{clients.account_id}/deployments/{dep_id}").get(
                    "hotLoadBucketUrl")
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
        ctx, store, clients = self.ctx, self.ctx.store, self.ctx.clients
        jobs = [p.job_id for p in ctx.record.past_trainers] if all_jobs else []
        if ctx.record.trainer:
            jobs.append(ctx.record.trainer.job_id)
        out = []
        sizes = self._bucket_sizes()
        promoted: dict[str, list[str]] = {}
        try:  # models promoted from these rows (by this run, a recipe, or anyone): their sourceCheckpoint
            for m in clients.http("GET", f"/v1/accounts/{clients.account_id}/models?pageSize=200").get("models", []):
                if m.get("sourceCheckpoint"):
                    promoted.setdefault(m["sourceCheckpoint"], []).append(m["name"].split("/")[-1])
        except Exception:  # noqa: BLE001 - a service without model listing: the column stays empty
            pass
        for job in jobs:
            for r in self.refresh_rows(job):
                cid = r["name"].split("/")[-1]
                ck = store.checkpoint(cid, job) or {}
                scores = store.scores_for(cid)
                hl = store.last_hotload_of(cid)
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
                    "hotloaded_to": hl["deployment_id"] if hl else None,
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

    # ---- promotion ---------------------------------------------------------------------------------
    def promote(self, checkpoint=None, output_model_id: str | None = None, base_model: str | None = None,
                alias: str | None = None) -> dict:
        """Promote a promotable checkpoint to a model `accounts/<a>/models/<output_model_id>`.

        checkpoint: a row (from `checkpoint_rows()`), its full name or id, its name without the session
        suffix (the newest such row), or None for the newest promotable row. alias: also move this alias
        (e.g. "champion") to the new model; the move is kept in the alias history.
        """
        ctx = self.ctx
        ctx.check_open()
        from fireworks.training.sdk.fireworks_client import validate_output_model_id

        if not output_model_id:
            raise PromotionError("output_model_id is required, e.g. run.promote(checkpoint, output_model_id="
                                 f"'{suggest_model_id(ctx.name + '-v1')}')")
        errors = validate_output_model_id(output_model_id)
        if errors:
            raise PromotionError(f"{output_model_id!r} is not a valid model id: " + " ".join(errors)
                                 + f" Try output_model_id={suggest_model_id(output_model_id)!r}.")
        rows = [r for r in self.checkpoint_rows()]
        row = self._find_row(rows, checkpoint)
        if not row["promotable"]:
            raise PromotionError(self._not_promotable_text(row, rows))
        if alias is not None:
            AliasStore.check_name(alias)
        trainer = self.provisioning.trainer_handle
        base = base_model or (trainer.base_model if trainer else (ctx.record.trainer.base_model if ctx.record.trainer
                                                                  else None))
        try:
            model = ctx.clients.fireworks.promote_checkpoint(name=row["name"], output_model_id=output_model_id,
                                                      base_model=base)
        except Exception as e:  # noqa: BLE001
            text = str(e)
            if "409" in text or "already exists" in text.lower():
                raise PromotionError(f"a model named {output_model_id!r} already exists. Pick another "
                                     f"output_model_id, e.g. {suggest_model_id(output_model_id + '-2')!r}.") from e
            raise
        model = model.get("model", model) if isinstance(model, dict) else model
        model_name = model.get("name", output_model_id)
        ctx.store.record_promotion(row["checkpoint_id"], row["job_id"], model_name, base)
        if alias is not None:
            self.aliases().move(alias, model_name, run=str(ctx.path), job_id=row["job_id"],
                                checkpoint_id=row["checkpoint_id"], step=row.get("step"),
                                score=row.get("eval_score"))
        ctx.notify("promote", {"checkpoint": row["checkpoint_id"], "model": model_name, "alias": alias})
        return model

    def aliases(self) -> AliasStore:
        """The alias registry of the folder this run lives in (shared by its sibling runs)."""
        return AliasStore(self.ctx.path.parent)

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
        why = {"CHECKPOINT_TYPE_INFERENCE_ARC_V2": "a delta (the difference from the previous snapshot, only "
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
