"""The manifest: the small JSON file that marks a checkpoint directory as committed.

Every checkpoint writer (train state, sampler snapshots) stages its files in a temporary directory,
writes the manifest LAST, then renames the directory into place (see `staging.py`). A directory
without a readable manifest is therefore not a checkpoint, whatever else it contains; readers call
`read_manifest` and skip the directory when it returns None.

    write_manifest(directory, {"name": "step-3", "kind": "train_state", ...})
    meta = read_manifest(directory)          # dict, or None if absent/unreadable

Keys every component relies on: "name" (str), "kind" ("train_state" | "sampler"), "created_time"
(float epoch seconds), "expire_time" (float | None), "base_model" (str), "lora_rank" (int),
"step" (int | None). Writers add their own keys (e.g. "snapshot_kind", "base_identity").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_FILE = "workbench_checkpoint.json"


def write_manifest(directory: Path, meta: dict) -> None:
    """Write `meta` as directory/MANIFEST_FILE atomically (temp file, fsync, os.replace).

    A reader sees either the old manifest or the complete new one, never a partial file.
    """
    directory = Path(directory)
    final = directory / MANIFEST_FILE
    tmp = directory / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    data = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(directory: Path) -> dict | None:
    """The manifest of `directory` as a dict, or None if it is absent, unreadable or not a JSON object."""
    try:
        meta = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
