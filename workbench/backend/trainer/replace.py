"""Replacing a committed checkpoint directory atomically, and finding what depends on a sampler snapshot.

    with replacing(layout.train_state("step-10")) as target:   # target == dest if nothing is there yet
        save_train_state(target, model, optimizer, meta)         # writers stage + commit into `target`
    # now dest holds the new checkpoint; readers saw the old one or the new one, never neither

    problems = sampler_dependants(HomeLayout(home), JobLayout(job_dir), layout.sampler("step-4"))

A replacement is written completely beside the destination (under a `.tmp-` name, so a crash leaves
only a leftover that `cleanup_partial` removes and listings skip), then swapped with the destination
in one `renameat2(RENAME_EXCHANGE)`; the old content, now under the temporary name, is deleted. Where
the kernel or libc lacks RENAME_EXCHANGE, the fallback is two renames (old aside, new in) with a
window of a few microseconds in which the name is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from workbench.checkpoints.layout import DELETING_PREFIX, STAGING_PREFIX, HomeLayout, JobLayout
from workbench.checkpoints.manifest import read_manifest

log = logging.getLogger("workbench.trainer.replace")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> None:
    """Swap two directories of one filesystem atomically (b ends up with a's content and vice versa)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (22, 38, 95):   # EINVAL / ENOSYS / EOPNOTSUPP: no exchange here, fall back
            raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")
    aside = b.with_name(f"{DELETING_PREFIX}{b.name}-{secrets.token_hex(4)}")
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(aside, b)
        raise
    os.rename(aside, a)


@contextmanager
def replacing(dest: Path) -> Iterator[Path]:
    """Yield where to write the checkpoint for `dest`; on success it is in place at `dest`."""
    dest = Path(dest)
    if not dest.exists():
        yield dest
        return
    staged = dest.with_name(f"{STAGING_PREFIX}replace-{dest.name}-{secrets.token_hex(4)}")
    try:
        yield staged
        exchange(staged, dest)
        log.info("replaced %s", dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)   # the old content after a swap; a partial one otherwise


def sampler_dependants(home: HomeLayout, job: JobLayout, snapshot: Path) -> list[str]:
    """What replacing the sampler snapshot `snapshot` would break: deployments whose recorded chain
    (state.json, replayed on restart) uses it, and delta snapshots of the job encoded against it."""
    snapshot = Path(snapshot)
    name = snapshot.name
    found: list[str] = []
    if home.deployments.is_dir():
        for d in sorted(home.deployments.iterdir()):
            try:
                state = json.loads(home.deployment(d.name).state_file.read_text())
            except (OSError, ValueError):
                continue   # no state (never hot-loaded), or not a deployment directory
            if not isinstance(state, dict):
                continue
            chain = state.get("chain") if isinstance(state.get("chain"), list) else []
            dirs = {Path(str(e["dir"])).resolve() for e in chain if isinstance(e, dict) and e.get("dir")}
            held = state.get("identity")
            # Held by name too: the next delta against this name would be applied to the old content.
            if snapshot.resolve() in dirs or held == name:
                found.append(f"deployment {d.name!r} holds it" + (f" (serving {held!r}, built on it)"
                                                                     if held != name else ""))
    if job.samplers.is_dir():
        for d in sorted(job.samplers.iterdir()):
            if d.name.startswith(".") or d.name == name or not d.is_dir():
                continue
            meta = read_manifest(d) or {}
            if meta.get("base_identity") == name:
                found.append(f"delta snapshot {d.name!r} is encoded against it")
    return found
