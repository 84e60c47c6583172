"""Atomic creation of checkpoint directories: stage beside the destination, manifest last, rename.

Every checkpoint writer in this package uses `staged_checkpoint`:

    with staged_checkpoint(dest, meta) as tmp:      # FileExistsError if dest already exists
        write files into tmp ...
    # on normal exit: the manifest is written into tmp, tmp is fsynced and renamed to dest

Guarantees:
- `dest` appears only complete (os.rename of a directory is atomic on one filesystem), with its
  manifest already inside, so a reader never sees a half-written checkpoint.
- An exception inside the block removes the staging directory; a hard crash (kill -9, power loss)
  can leave a `.tmp-<name>-<random>` directory beside dest. Listings skip dot-directories, and
  `cleanup_partial(root)` removes the leftovers.
- An existing dest is never overwritten: the caller decides what a name collision means.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .layout import STAGING_PREFIX
from .manifest import write_manifest

TMP_PREFIX = STAGING_PREFIX
# Test hook: seconds to stall between writing a checkpoint's data and committing it, so a crash test
# can kill the writer inside that window. Unset (the default) costs nothing.
FAULT_STALL_ENV = "WORKBENCH_FAULT_STALL_BEFORE_COMMIT_S"


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable; not supported everywhere (ignored then).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def complete_meta(dest: Path, meta: dict) -> dict:
    """Copy of `meta` with the keys every reader relies on filled in (name, created_time, expire_time)."""
    full = dict(meta)
    full.setdefault("name", Path(dest).name)
    full.setdefault("created_time", time.time())
    full.setdefault("expire_time", None)
    return full


@contextmanager
def staged_checkpoint(dest: Path, meta: dict):
    """Yield a fresh staging directory; on success write the manifest (last) and rename it to `dest`."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"checkpoint {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        stall = float(os.environ.get(FAULT_STALL_ENV) or 0)
        if stall > 0:  # fault injection for crash tests: data written, not yet committed
            time.sleep(stall)
        write_manifest(tmp, complete_meta(dest, meta))
        _fsync_dir(tmp)
        if dest.exists():  # created while we were writing; os.rename would replace an empty dir
            raise FileExistsError(f"checkpoint {dest} already exists")
        try:
            os.rename(tmp, dest)
        except OSError as e:  # ENOTEMPTY / EEXIST: another writer won the race
            if dest.exists():
                raise FileExistsError(f"checkpoint {dest} already exists") from e
            raise
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cleanup_partial(root: Path, min_age_seconds: float = 0.0) -> None:
    """Remove `.tmp-*` staging leftovers in `root` and in its direct subdirectories (a job's checkpoints/, sampler/).

    `min_age_seconds` spares staging directories younger than that, for callers that may run while
    another process is still saving (a save in flight also has a .tmp-* directory).
    """
    root = Path(root)
    if not root.is_dir():
        return
    now = time.time()
    # Two levels: root may be a job directory (job/checkpoints/.tmp-*) or a checkpoints directory.
    # Not deeper: checkpoint directories never contain staging directories.
    candidates = [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"*/{TMP_PREFIX}*")]
    for tmp in candidates:
        try:
            if not tmp.is_dir() or tmp.is_symlink():
                continue
            if min_age_seconds and now - tmp.stat().st_mtime < min_age_seconds:
                continue
        except OSError:  # vanished meanwhile (e.g. its save just committed)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
