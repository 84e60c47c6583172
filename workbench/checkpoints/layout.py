"""Every path of the workbench home, of a trainer job and of a deployment, spelled in one place.

    home = HomeLayout(Path("~/.workbench").expanduser())
    job = home.job("sft-1a2b")                  # JobLayout; ValueError if the id is not a DNS label
    job.train_state("step-4")                   # <home>/jobs/sft-1a2b/checkpoints/step-4
    job.sampler("step-4-ab12cd34")              # <home>/jobs/sft-1a2b/sampler/step-4-ab12cd34
    JobLayout(job_dir)                          # the trainer, which is handed its directory

    <home>/                         HomeLayout
      server.json                   written by `workbench serve` once it accepts connections (0600)
      api_key                       the key every endpoint requires (0600)
      state.db                      SQLite: jobs, deployments, promoted models, operations (0600)
      logs/<kind>-<key>.log         one log per trainer / deployment process; control-plane.log
      models.json                   optional catalog: base-model name -> local Hugging Face directory
      models/<account>/<id>/        promoted models (Hugging Face directories)
      jobs/<job_id>/                JobLayout
        job.json                    the trainer's configuration, written by the control plane
        port                        the trainer's port, written once it serves
        trainer.lock                held (flock) by the one live trainer of this directory; holds its pid
        checkpoints/<name>/         train states (DCP) + manifest
        sampler/<name>/             sampler snapshots (base / delta / LoRA) + manifest
        <kind dir>/.tmp-<name>-*    staging directory of a save in progress (or of a crashed one)
        <kind dir>/.deleting-*      a checkpoint being deleted (renamed out of listings first)
      deployments/<id>/             DeploymentLayout
        deployment.json             the replica's configuration, written by the control plane
        port                        the replica's port
        state.json                  its last good snapshot chain (restored on restart)
        materialized/               snapshots flattened from long delta chains

Ids become directory names, so every constructor taking an id checks it with a full match first.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from workbench.common import is_resource_id

from .manifest import MANIFEST_FILE

TRAIN_STATE_DIR = "checkpoints"
SAMPLER_DIR = "sampler"
STAGING_PREFIX = ".tmp-"
DELETING_PREFIX = ".deleting-"


def _checked(kind: str, value: str) -> str:
    if not is_resource_id(value):
        raise ValueError(f"{kind} {value!r} is invalid: use 1-63 lowercase letters, digits and hyphens")
    return value


@dataclass(frozen=True)
class JobLayout:
    """The directory of one trainer job."""

    root: Path

    @property
    def job_id(self) -> str:
        return self.root.name

    @property
    def config_file(self) -> Path:
        return self.root / "job.json"

    @property
    def port_file(self) -> Path:
        return self.root / "port"

    @property
    def lock_file(self) -> Path:
        return self.root / "trainer.lock"

    @property
    def train_states(self) -> Path:
        return self.root / TRAIN_STATE_DIR

    @property
    def samplers(self) -> Path:
        return self.root / SAMPLER_DIR

    @property
    def checkpoint_roots(self) -> tuple[Path, Path]:
        """Both checkpoint kinds' directories (what listings, cleanup and the TTL sweeper walk)."""
        return self.train_states, self.samplers

    def train_state(self, name: str) -> Path:
        return self.train_states / name

    def sampler(self, name: str) -> Path:
        return self.samplers / name

    @staticmethod
    def manifest(checkpoint_dir: Path) -> Path:
        return Path(checkpoint_dir) / MANIFEST_FILE


@dataclass(frozen=True)
class DeploymentLayout:
    """The directory of one deployment replica."""

    root: Path

    @property
    def deployment_id(self) -> str:
        return self.root.name

    @property
    def config_file(self) -> Path:
        return self.root / "deployment.json"

    @property
    def port_file(self) -> Path:
        return self.root / "port"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def materialized(self) -> Path:
        return self.root / "materialized"


@dataclass(frozen=True)
class HomeLayout:
    """The workbench home (`$WORKBENCH_HOME`, `--home`, default `~/.workbench`)."""

    root: Path

    @property
    def server_file(self) -> Path:
        return self.root / "server.json"

    @property
    def api_key_file(self) -> Path:
        return self.root / "api_key"

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log_file(self, kind: str, key: str) -> Path:
        return self.logs / f"{kind}-{key}.log"

    @property
    def control_plane_log(self) -> Path:
        return self.logs / "control-plane.log"

    @property
    def models_catalog(self) -> Path:
        return self.root / "models.json"

    @property
    def models(self) -> Path:
        """The registry of promoted models: models/<account>/<id>/."""
        return self.root / "models"

    def model(self, account: str, model_id: str) -> Path:
        return self.models / _checked("account", account) / _checked("model id", model_id)

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job(self, job_id: str) -> JobLayout:
        return JobLayout(self.jobs / _checked("rlorTrainerJobId", job_id))

    def all_jobs(self) -> list[JobLayout]:
        """Every job directory present (names that are not valid ids are ignored)."""
        if not self.jobs.is_dir():
            return []
        return [JobLayout(p) for p in sorted(self.jobs.iterdir()) if p.is_dir() and is_resource_id(p.name)]

    @property
    def deployments(self) -> Path:
        return self.root / "deployments"

    def deployment(self, deployment_id: str) -> DeploymentLayout:
        return DeploymentLayout(self.deployments / _checked("deploymentId", deployment_id))


# ---- the trainer's ownership lock ----------------------------------------------------------------


def hold_job_lock(job: JobLayout, blocking: bool = False) -> int:
    """Take the job directory's ownership lock for this process and record our pid in it.

    Returns the open file descriptor: keep it open for the life of the process (the kernel releases the
    lock when the process dies, however it dies). BlockingIOError if another live process holds it.
    """
    job.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(job.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def job_lock_owner(job: JobLayout) -> int | None:
    """The pid of the live process holding the job's lock, or None if nobody holds it."""
    try:
        fd = os.open(job.lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.read(fd, 32).decode().strip() or 0) or -1
            except ValueError:
                return -1  # held, but the owner has not written its pid yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
