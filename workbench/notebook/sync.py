"""Weights from the trainer to a deployment: `run.sync`, and resumable train state (`save_state`/`load_state`).

    snapshot = run.sync("step-00020")     # WeightSyncer.save_and_hotload: a base first, then XOR deltas
    run.save_state(); run.load_state()    # DCP weights + optimizer; load_state rolls the step counter back

`SyncMixin` holds these `Run` methods. The delta chain is kept honest: a sync that fails, is interrupted,
or finds the deployment holding something other than this run's last snapshot restarts the chain with a
full base load (`reset_delta_chain`), and a hot-load is only recorded after the deployment reports holding
the new snapshot (else `StaleDeploymentError`). `Run` (run.py) mixes this in; use it through `Run`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .common import POLL_S, StaleDeploymentError, _now_iso

if TYPE_CHECKING:
    from .provision import Deployment


class SyncMixin:
    """`Run`'s weight-sync and train-state methods (see the module docstring)."""

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
