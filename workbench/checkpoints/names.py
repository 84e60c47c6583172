"""Checkpoint name rules, shared by every writer and reader of checkpoint directories.

A checkpoint name becomes a directory name on disk and a path segment on the wire, so it must be
safe in both places. The rule is the one the official SDK enforces client-side before it sends a
`load_state` path (each segment must match `NAME_RE`); validating at save time means a name that
saves can always be loaded again (the SDK's own `save_state` does not check, so `step_1` would save
and then never load).

    from workbench.checkpoints.names import validate_checkpoint_name, CheckpointNameError
    name = validate_checkpoint_name(request["path"])                  # returns the name unchanged
    validate_checkpoint_name(model_id, field="output_model_id")       # error messages name the field
"""

from __future__ import annotations

import re

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME = re.compile(NAME_RE)


class CheckpointNameError(ValueError):
    """A checkpoint (or model) name that is missing or not 1-63 lowercase letters, digits and hyphens."""


def validate_checkpoint_name(name, field: str = "path") -> str:
    """Return `name` if it is a valid checkpoint name, else raise CheckpointNameError naming `field`."""
    if name is None or name == "":
        raise CheckpointNameError(f"{field} is required")
    # re.match's `$` also matches before a trailing newline; fullmatch does not, so "a\n" is rejected.
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointNameError(
            f"{field} must be 1-63 characters, start and end with a letter or digit, and contain only "
            f"lowercase letters, digits and hyphens (got {name!r})")
    return name
