"""Thin extensions of the official SDK for what the seeds document but `fireworks-ai==1.2.28` lacks.

    from workbench.sdk import TrainingClient, WeightSyncer
    client = TrainingClient(sdk_training_client, endpoint_base_url, api_key)   # wraps, never forks
    client.save_weights_for_sampler("tmp", checkpoint_type="delta", ttl_seconds=3600).result()
    client.save_state("step-10", ttl_seconds=600).result()

    syncer = WeightSyncer(policy_client=client, deploy_mgr=..., deployment_id=..., dcp_timeout=2700)
    syncer.save_dcp("step-10")        # seed 002: DCP-only save, returns bool
    snapshot = syncer.save_only("step-10")
    syncer.hotload(snapshot)          # seed 002: no checkpoint_type (the one it was saved as)

    sampler = service.create_sampling_client(model_path=sampler_model_path(job_id, "step-10"))  # serverless

TTL: the pinned SDK refuses `ttl_seconds` client-side (NotImplementedError), so the wrapper saves
without it and then sets the checkpoint's TTL on the control plane
(`PATCH .../rlorTrainerJobs/{job}/checkpoints/{id}` with `{"ttl": "<n>s"}`, a workbench extension).
Everything else is delegated unchanged to the SDK's `FiretitanTrainingClient`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import httpx
from fireworks.training.sdk import WeightSyncer as _SdkWeightSyncer

logger = logging.getLogger(__name__)

_GATEWAY = re.compile(r"^(?P<root>.+?)/training/v1/rlorTrainerJobs/(?P<account>[^/]+)/(?P<job>[^/]+)/?$")


def parse_trainer_endpoint(url: str) -> tuple[str, str, str]:
    """`http://host/training/v1/rlorTrainerJobs/<a>/<job>` -> (root url, account, job id)."""
    m = _GATEWAY.match(url)
    if not m:
        raise ValueError(f"not a trainer gateway URL: {url!r}")
    return m["root"], m["account"], m["job"]


def sampler_model_path(job_id: str, snapshot: str, account: str = "workbench") -> str:
    """The `model_path` that samples sampler snapshot `snapshot` of trainer job `job_id` through the SDK's
    serverless sampling (SDK 1.2.30+: `FiretitanServiceClient(base_url=f"{url}/training/v1/serverless")
    .create_sampling_client(model_path=...)`): `<account>/<run id>/<snapshot>`, the run id being the form
    the SDK accepts (`workbench.common.serverless_run_id`)."""
    from workbench.common import serverless_run_id

    return f"{account}/{serverless_run_id(job_id)}/{snapshot}"


class _Done:
    """A completed future (what the SDK's `_ImmediateAPIFuture` is), for calls that had to block."""

    def __init__(self, value):
        self._value = value

    def result(self, timeout: float | None = None):
        return self._value

    async def result_async(self, timeout: float | None = None):
        return self._value


class TrainingClient:
    """Wraps an SDK `FiretitanTrainingClient`, adding `ttl_seconds` to sampler and state saves."""

    def __init__(self, sdk_client, endpoint_base_url: str, api_key: str):
        self.sdk = sdk_client
        self._root, self._account, self.job_id = parse_trainer_endpoint(endpoint_base_url)
        self._api_key = api_key

    def __getattr__(self, name):  # everything not overridden is the SDK's own behaviour
        return getattr(self.sdk, name)

    def set_checkpoint_ttl(self, checkpoint_id: str, ttl_seconds: int) -> dict:
        if not isinstance(ttl_seconds, int) or isinstance(ttl_seconds, bool) or ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be a positive integer (got {ttl_seconds!r})")
        r = httpx.patch(f"{self._root}/v1/accounts/{self._account}/rlorTrainerJobs/{self.job_id}/checkpoints/"
                        f"{checkpoint_id}", json={"ttl": f"{ttl_seconds}s"},
                        headers={"X-Api-Key": self._api_key}, timeout=30)
        if r.status_code >= 400:
            raise RuntimeError(f"setting ttl on checkpoint {checkpoint_id!r} failed (HTTP {r.status_code}): {r.text}")
        return r.json()

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None,
                                     ttl_seconds: int | None = None, **kwargs):
        if ttl_seconds is not None and (not isinstance(ttl_seconds, int) or ttl_seconds <= 0):
            raise ValueError(f"ttl_seconds must be a positive integer (got {ttl_seconds!r})")
        result = self.sdk.save_weights_for_sampler_ext(name, checkpoint_type=checkpoint_type, **kwargs)
        if ttl_seconds is not None:
            self.set_checkpoint_ttl(result.snapshot_name, ttl_seconds)
        return result

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None, *,
                                 checkpoint_type: str | None = None, **kwargs):
        from fireworks.training.sdk._core import types

        result = self.save_weights_for_sampler_ext(name, checkpoint_type=checkpoint_type,
                                                   ttl_seconds=ttl_seconds, **kwargs)
        return _Done(types.SaveWeightsForSamplerResponse(path=result.path))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False, *,
                   timeout: float | None = None):
        if ttl_seconds is not None and (not isinstance(ttl_seconds, int) or ttl_seconds <= 0):
            raise ValueError(f"ttl_seconds must be a positive integer (got {ttl_seconds!r})")
        future = self.sdk.save_state(name, overwrite=overwrite, timeout=timeout)
        if ttl_seconds is None:
            return future
        result = future.result()  # the row must exist before its TTL can be set
        self.set_checkpoint_ttl(name, ttl_seconds)
        return _Done(result)


def _bounded(call, timeout: float | None, what: str):
    """`call()`, or TimeoutError naming `what` once `timeout` seconds have passed (None: no limit). The call
    goes on in a daemon thread (an SDK call cannot be cancelled from outside); its late result is dropped."""
    if timeout is None:
        return call()
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name=f"workbench-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout:g}s (call_timeout); is the workbench backend "
                           "running? (`workbench status`)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class WeightSyncer(_SdkWeightSyncer):
    """The SDK's WeightSyncer plus seed 002's `save_dcp(name)`, `dcp_timeout`, `hotload(snapshot)` without a
    `checkpoint_type` (the SDK's signature requires one), and `call_timeout` bounding its blocking saves."""

    dcp_timeout: int = 2700
    """Seconds to wait for a DCP save in `save_dcp`."""
    call_timeout: float | None = None
    """Seconds `save_only` / `save_and_hotload` may block before they fail (save_only returns None,
    save_and_hotload raises TimeoutError); None waits as long as the SDK does. The SDK's sampler save has no
    timeout of its own: when the backend dies mid-save its request is reported lost (and raised) once the
    backend is back, but a backend that stays down would block the call for ever."""

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self._saved_types: dict[str, str] = {}   # snapshot name -> the checkpoint_type it was saved as

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """The SDK's save_only, remembering which type the snapshot was saved as (for `hotload`)."""
        ckpt_type = checkpoint_type or self._next_checkpoint_type()
        try:
            snapshot = _bounded(lambda: _SdkWeightSyncer.save_only(self, name, checkpoint_type=ckpt_type),
                                self.call_timeout, f"save_only({name!r})")
        except TimeoutError as e:
            logger.warning("%s", e)
            return None
        if snapshot is not None:
            self._saved_types[snapshot] = ckpt_type
        return snapshot

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """The SDK's save_and_hotload, failing with TimeoutError after `call_timeout` seconds."""
        return _bounded(lambda: _SdkWeightSyncer.save_and_hotload(self, name, checkpoint_type=checkpoint_type),
                        self.call_timeout, f"save_and_hotload({name!r})")

    def hotload(self, snapshot_name: str, checkpoint_type: str | None = None) -> bool:
        """Hot-load a saved snapshot; True on success. Seed 002 writes `tracker.hotload(snapshot)`: without a
        `checkpoint_type` the type is the one `save_only` saved that snapshot as, else "base" (a snapshot saved
        outside this syncer; a full snapshot needs no previous one, and a delta hot-loaded as a base fails
        cleanly at the deployment, which keeps serving what it held)."""
        if checkpoint_type is None:
            checkpoint_type = self._saved_types.get(snapshot_name)
            if checkpoint_type is None:
                logger.info("hotload(%r): not saved by this syncer, hot-loading it as a base snapshot", snapshot_name)
                checkpoint_type = "base"
        return super().hotload(snapshot_name, checkpoint_type)

    def save_dcp(self, name: str) -> bool:
        """Save a resumable DCP checkpoint only (no sampler snapshot, no hotload). True on success."""
        try:
            self.policy_client.save_state(name).result(timeout=self.dcp_timeout)
        except Exception as e:  # the seed's contract is a bool, like hotload()
            logger.warning("save_dcp(%r) failed: %s", name, e)
            return False
        return True
