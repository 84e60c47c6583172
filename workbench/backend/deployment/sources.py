"""Where a hot load may read a snapshot from: the same rule for every replica.

    roots = allowed_roots(deployment_config)           # the workbench home + configured snapshot roots
    candidates, src = snapshot_candidates("step-3", snapshot_root, source_url, roots)   # 400 / 403
    path, header = find_snapshot("step-3", snapshot_root, source_url, roots, is_snapshot)  # + 404

A snapshot is named by `x-workbench-snapshot-root` (set by the control plane: the linked trainer's
sampler directory) and/or `x-fireworks-hot-load-source-url` (a local path or file:// URL; a remote
gs://... cannot be fetched here, so the snapshot root is used instead). Only directories inside the
allowed roots are ever read, symlinks resolved: anything else is a 403 naming the header that
pointed there (`HotloadError.field`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .replica import HotloadError

SOURCE_HEADER = "x-fireworks-hot-load-source-url"
ROOT_HEADER = "x-workbench-snapshot-root"


def allowed_roots(config: dict) -> list[Path]:
    """The workbench home (deployment.json "home", else WORKBENCH_HOME) and every configured snapshot
    root (deployment.json "snapshot_roots", env WORKBENCH_SNAPSHOT_ROOTS, os.pathsep-separated)."""
    roots = [config.get("home") or os.environ.get("WORKBENCH_HOME")]
    roots += list(config.get("snapshot_roots") or [])
    roots += os.environ.get("WORKBENCH_SNAPSHOT_ROOTS", "").split(os.pathsep)
    return [Path(r).expanduser().resolve() for r in roots if r]


def snapshot_candidates(identity: str, snapshot_root: str | None, source_url: str | None,
                        roots: list[Path]) -> tuple[list[tuple[Path, str]], Path | None]:
    """([(directory, header that named it)...] to look in, the source URL's own path or None).
    HotloadError 400 if the request names no local location, 403 if one is outside `roots`."""
    candidates: list[tuple[Path, str]] = []
    src = None
    if source_url:
        s = source_url[len("file://"):] if source_url.startswith("file://") else source_url
        if s.startswith("/"):
            src = Path(s)
            candidates.append((src / identity, SOURCE_HEADER))
    if snapshot_root:
        candidates.append((Path(snapshot_root) / identity, ROOT_HEADER))
    if src is None and not snapshot_root:
        raise HotloadError(400, f"no snapshot location: the request has neither an {ROOT_HEADER} header "
                                "(set by the control plane for a deployment linked to a trainer) nor a "
                                f"local {SOURCE_HEADER}", SOURCE_HEADER)
    for path, header in candidates + ([(src, SOURCE_HEADER)] if src is not None else []):
        real = path.resolve()
        if not any(real == r or r in real.parents for r in roots):
            raise HotloadError(403, f"{header} points outside the workbench home and the configured "
                                    f"snapshot roots ({', '.join(map(str, roots)) or 'none configured'}): "
                                    f"{path} is not read", header)
    return candidates, src


def find_snapshot(identity: str, snapshot_root: str | None, source_url: str | None, roots: list[Path],
                  is_snapshot: Callable[[Path], bool]) -> tuple[Path, str]:
    """The snapshot directory and the header that named it; the source URL may also name the
    snapshot directory itself (`is_snapshot` decides). HotloadError 400 / 403 / 404."""
    candidates, src = snapshot_candidates(identity, snapshot_root, source_url, roots)
    for path, header in candidates:
        if path.is_dir():
            return path, header
    if src is not None and src.is_dir() and is_snapshot(src):
        return src, SOURCE_HEADER
    raise HotloadError(404, f"snapshot {identity!r} not found (looked in "
                            f"{', '.join(str(c) for c, _ in candidates)})")
