"""Promote a trainer job's checkpoint to a model (the cookbook's `promote_checkpoint.py`).

    python -m workbench.recipes.promote --job-id sft-1a2b3c4d --output-model-id tiny-sft \\
        --base-model accounts/workbench/models/qwen3-tiny [--checkpoint-name step-40]
    workbench promote --job-id ... --output-model-id ... --base-model ...        # the same function

    from workbench.recipes.promote import promote_from_job
    model = promote_from_job("sft-1a2b3c4d", "tiny-sft", "accounts/workbench/models/qwen3-tiny")

By default the newest promotable row of the job (by parsed createTime) is promoted. `checkpoint_name`
selects a row by its exact id (`step-40-8a7dc192`) or by its logical name without the SDK's 8-hex session
suffix (`step-40`; the newest such row wins). The trainer job need not be running; its row must exist.
The backend comes from `workbench.connect.connect()` (FIREWORKS_BASE_URL / FIREWORKS_API_KEY, else local).
"""

from __future__ import annotations

import argparse
import json
import sys

from workbench.recipes.utils.checkpoints import logical_name, newest_first, short_name


class PromoteError(RuntimeError):
    """Nothing promotable matches, or the output model id is invalid."""


def promote_from_job(job_id: str, output_model_id: str, base_model: str, checkpoint_name: str | None = None,
                     *, backend=None) -> dict:
    """Promote the newest promotable checkpoint of `job_id` (or the one named) to `output_model_id`.

    Returns the model dict (`name`, `state`, `kind`, ...)."""
    from fireworks.training.sdk import FireworksClient, validate_output_model_id

    from workbench.connect import connect

    problems = validate_output_model_id(output_model_id)
    if problems:  # validated before anything is staged or copied
        raise PromoteError("; ".join(problems))
    if not base_model:
        raise PromoteError("base_model is required (e.g. accounts/workbench/models/qwen3-tiny)")
    backend = backend or connect()
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    rows = fw.list_checkpoints(job_id)
    promotable = [r for r in rows if r.get("promotable")]
    if checkpoint_name:
        def named(r):
            return checkpoint_name in (short_name(r["name"]), logical_name(short_name(r["name"])))

        matching = [r for r in promotable if named(r)]
        if not matching:
            others = [short_name(r["name"]) for r in rows if named(r)]
            hint = (f"{others} exist but are not promotable (DCP train state or full-parameter deltas); "
                    if others else "")
            raise PromoteError(f"no promotable checkpoint named {checkpoint_name!r} on trainer job {job_id!r}: {hint}"
                               f"promotable rows: {[short_name(r['name']) for r in promotable]}")
        promotable = matching
    if not promotable:
        raise PromoteError(f"trainer job {job_id!r} has no promotable checkpoint (rows: "
                           f"{[(short_name(r['name']), r.get('checkpointType')) for r in rows]}); save a base "
                           "sampler snapshot first (save_weights_for_sampler_ext(..., checkpoint_type='base'))")
    row = newest_first(promotable)[0]
    return fw.promote_checkpoint(name=row["name"], output_model_id=output_model_id, base_model=base_model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.recipes.promote", description=__doc__.split("\n\n")[0])
    p.add_argument("--job-id", required=True, help="trainer job id")
    p.add_argument("--output-model-id", required=True, help="new model id: 1-63 of a-z, 0-9, '-'")
    p.add_argument("--base-model", required=True, help="base model resource name")
    p.add_argument("--checkpoint-name", help="exact row id or logical name (default: newest promotable row)")
    a = p.parse_args(argv)
    try:
        model = promote_from_job(a.job_id, a.output_model_id, a.base_model, a.checkpoint_name)
    except PromoteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(model, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
