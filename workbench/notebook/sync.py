"""Weights from the trainer to a deployment: `run.sync`, and resumable train state (`save_state`/`load_state`).

    snapshot = run.sync("step-00020")     # WeightSyncer.save_and_hotload: a base first, then deltas
    run.save_state(); run.load_state()    # DCP weights + optimizer; load_state rolls the step counter back

`WeightSync` is the `Run`'s collaborator for these; it receives the `RunContext`, the `Provisioning` (for
the trainer and deployments) and the `Promotion` (to read back the control plane's checkpoint rows). The delta chain is kept honest: a sync that fails, is interrupted,
or finds the deployment holding something other than this run's last snapshot restarts the chain with a
full base load (`reset_delta_chain`), and a hot-load is only recorded after the deployment reports holding
the new snapshot (else `StaleDeploymentError`).

Each hot-load is recorded with what the backend says about it, for the weight-sync views: the wall time of
the sync, the load timings the deployment reports in its hot-load status (where the backend reports them),
the snapshot's bytes, changed fraction and chain length from its manifest (where the checkpoint row has
them), and the trainer step at that time (so a later view can say how many steps the deployment lags).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from workbench.records import DeploymentRecord

from .common import POLL_S, RunContext, StaleDeploymentError, _now_iso

if TYPE_CHECKING:
    from .promotion import Promotion
    from .provision import Deployment, Provisioning


class WeightSync:
    """Weight sync to deployments and resumable train state (see the module docstring)."""

    def __init__(self, ctx: RunContext, provisioning: "Provisioning", promotion: "Promotion"):
        self.ctx, self.provisioning, self.promotion = ctx, provisioning, promotion

    # ---- weight sync -----------------------------------------------------------------------------
    def syncer(self, deployment: str | Deployment | None = None):
        """The `workbench.sdk.WeightSyncer` (the SDK's, plus save_dcp) from the trainer to the deployment."""
        t = self.provisioning.require_trainer()
        d = self.provisioning.get_deployment(deployment)
        if d._syncer is None or d._syncer_client is not t.client:
            from workbench.sdk import WeightSyncer

            d._syncer = WeightSyncer(policy_client=t.client, deploy_mgr=self.ctx.clients.deployments,
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
        ctx = self.ctx
        ctx.check_open()
        store, step = ctx.store, ctx.counter.step
        t = self.provisioning.require_trainer()
        d = self.provisioning.get_deployment(deployment)
        syncer = self.syncer(d)
        used = d.__dict__.setdefault("_names", {}).setdefault(id(t.sdk_client), set())
        if name is None:
            name, n = f"step-{step:05d}", 2
            while name in used:  # synced twice at the same step: keep snapshot names unique in this session
                name, n = f"step-{step:05d}-{n}", n + 1
        elif name in used:
            raise ValueError(f"a snapshot named {name!r} was already saved in this session (as {name}-<session>); "
                             "pick another name")
        dm = ctx.clients.deployments
        info = dm.get(d.deployment_id)
        if info is not None and info.hot_load_trainer_job and info.hot_load_trainer_job != t.job_name:
            print(f"note: deployment {d.deployment_id} is attached to {info.hot_load_trainer_job.split('/')[-1]} "
                  f"(another run); re-attaching it to this run's trainer {t.job_id}.")
            d.info = dm.reattach_trainer(info, base_model=d.base_model,
                                                              trainer_job_name=t.job_name, timeout_s=300,
                                                              poll_interval_s=POLL_S)
            syncer.reset_delta_chain()
            store.record_event("deployment_reattached", {"deployment_id": d.deployment_id})
        if syncer.base_identity is not None:
            held = d.current_snapshot()
            if held != syncer.base_identity:
                # something else hot-loaded the deployment since our last sync: a delta over our last
                # snapshot would not apply to what it holds, so this sync is a full base load
                syncer.reset_delta_chain()
                store.record_event("chain_reset", {"deployment_id": d.deployment_id, "held": held})
        kind = checkpoint_type or ("base" if (t.lora_rank or not syncer.base_saved) else "delta")
        previous = syncer.base_identity
        store.flush()
        t0 = time.time()
        try:
            snapshot = syncer.save_and_hotload(name, checkpoint_type=checkpoint_type)
        except BaseException as e:
            # The save may have happened without the hot-load: the trainer's next delta would then not apply
            # to what the deployment holds. Restart the chain with a full base next time.
            syncer.reset_delta_chain()
            store.record_event("sync_failed", {"name": name, "error": str(e)[:500]})
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
        store.record_checkpoint(t.job_id, snapshot, kind="sampler", requested_type=kind,
                                step=step, data_consumed=ctx.counter.data_consumed)
        rows = self.promotion.refresh_rows(t.job_id, only={snapshot})
        row = next((r for r in rows if r["name"].split("/")[-1] == snapshot), {})
        detail = sync_detail(d, row)
        chain = 0 if kind == "base" else (self._chain_length(d.deployment_id) + 1)
        store.record_hotload(snapshot, d.deployment_id, checkpoint_type=kind,
                             previous_snapshot=previous if kind == "delta" else None,
                             duration_s=duration, verified=True, step=step,
                             load_s=detail.get("load_s"), pause_s=detail.get("pause_s"),
                             delta_bytes=detail.get("bytes"), changed_fraction=detail.get("changed_fraction"),
                             chain_length=detail.get("chain_length", chain))
        rec = ctx.record.deployments.setdefault(d.deployment_id, DeploymentRecord(base_model=d.base_model))
        rec.snapshot, rec.snapshot_step, rec.synced = snapshot, step, _now_iso()
        ctx.save_record()
        ctx.notify("sync", {"snapshot": snapshot, "deployment": d.deployment_id, "step": step, "type": kind,
                            "duration_s": duration, **detail})
        return snapshot

    def _chain_length(self, deployment_id: str) -> int:
        last = self.ctx.store.last_hotload(deployment_id)
        if not last or last.get("checkpoint_type") == "base":
            return 0
        return int(last.get("chain_length") or 0)

    def save_state(self, name: str | None = None, ttl_seconds: int | None = None) -> str:
        """Save resumable train state (DCP: weights + optimizer) and record it with its step and data consumed."""
        ctx = self.ctx
        t = self.provisioning.require_trainer()
        name = name or f"state-{ctx.counter.step:05d}"
        ctx.store.flush()
        t.client.save_state(name, ttl_seconds=ttl_seconds).result()
        ctx.store.record_checkpoint(t.job_id, name, kind="state", requested_type="state", step=ctx.counter.step,
                                    data_consumed=ctx.counter.data_consumed)
        self.promotion.refresh_rows(t.job_id, only={name})
        ctx.notify("state", {"name": name, "step": ctx.counter.step})
        return name

    def load_state(self, name: str | None = None, with_optimizer: bool = True, source_job_id: str | None = None) -> str:
        """Restore train state saved by `save_state` (default: the newest) and the run's step counter."""
        ctx = self.ctx
        t = self.provisioning.require_trainer()
        if name is None:
            states = [r for r in self.promotion.checkpoint_rows() if r["kind"] == "state"]
            if not states:
                raise RuntimeError("this run has no saved train state (run.save_state(name) saves one)")
            name = states[-1]["checkpoint_id"]
        path = t.client.resolve_checkpoint_path(name, source_job_id=source_job_id) if source_job_id else name
        (t.client.load_state_with_optimizer(path) if with_optimizer else t.client.load_state(path)).result()
        ck = ctx.store.checkpoint(name, source_job_id or t.job_id)
        if ck and ck.get("step") is not None and source_job_id is None:
            ctx.counter.step = int(ck["step"])
            ctx.counter.data_consumed = ck.get("data_consumed")
            dropped = ctx.store.truncate_after(t.job_id, ctx.counter.step)  # those steps were rolled back
            if dropped:
                ctx.store.record_event("steps_rolled_back", {"after": ctx.counter.step, "count": dropped})
        # the weights changed under the deployment's chain: the next sync must be a full base
        for d in self.provisioning.deployment_handles.values():
            if d._syncer is not None:
                d._syncer.reset_delta_chain()
        ctx.store.record_event("state_loaded", {"name": name, "step": ctx.counter.step,
                                                "source_job_id": source_job_id})
        return name


_LOAD_KEYS = ("load_seconds", "load_s", "hotload_seconds", "last_load_seconds")
_PAUSE_KEYS = ("pause_seconds", "pause_s", "sampler_pause_seconds", "sampler_pause_s", "swap_pause_seconds")
_BYTES_KEYS = ("deltaBytes", "delta_bytes", "sizeBytes")
_CHANGED_KEYS = ("changedFraction", "changed_fraction")
_CHAIN_KEYS = ("chainLength", "chain_length")


def _find(data, keys: tuple, depth: int = 0):
    """The first of `keys` found in `data` or its nested dicts (breadth first, a few levels deep)."""
    if not isinstance(data, dict) or depth > 3:
        return None
    for k in keys:
        if data.get(k) is not None:
            return data[k]
    for v in data.values():
        found = _find(v, keys, depth + 1)
        if found is not None:
            return found
    return None


def sync_detail(d: "Deployment", row: dict) -> dict:
    """What the backend reports about the sync that just finished: the deployment's load time and sampler
    pause (from its hot-load status, where it reports them), the snapshot's bytes, changed fraction and
    chain length (from the checkpoint row, where it carries them). Keys with no data are left out, so the
    views show "-" until the backend reports them."""
    out: dict = {}
    try:
        status = d.hotload_status()
    except Exception:  # noqa: BLE001 - observability never fails a sync
        status = {}
    replicas = status.get("replicas") or [{}]
    for key, names in (("load_s", _LOAD_KEYS), ("pause_s", _PAUSE_KEYS)):
        value = _find(replicas[0], names)
        if isinstance(value, (int, float)):
            out[key] = float(value)
    for key, names in (("bytes", _BYTES_KEYS), ("changed_fraction", _CHANGED_KEYS), ("chain_length", _CHAIN_KEYS)):
        value = _find(row, names)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    if "changed_fraction" not in out:
        changed, total = _find(row, ("changedElements", "changed_elements")), _find(row, ("totalElements",
                                                                                           "total_elements"))
        if isinstance(changed, (int, float)) and isinstance(total, (int, float)) and total:
            out["changed_fraction"] = changed / total
    return out
