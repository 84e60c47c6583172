"""Recipes: complete training loops driven through the official SDK (the cookbook's `training.recipes`).

    from workbench.recipes.sft_loop import Config, main        # also rl_loop, dpo_loop, orpo_loop
    from workbench.recipes.utils import InfraConfig, WeightSyncConfig

    summary = main(Config(log_path="./runs/sft", weight_sync=WeightSyncConfig(dcp_save_interval=10)))
    summary = main(Config(log_path="./runs/sft", ...))          # interrupted? the same call resumes it

Each recipe finds its backend with `workbench.connect.connect()` (FIREWORKS_BASE_URL / FIREWORKS_API_KEY,
else the local backend), records its trainer job in `<log_path>/run.json`, logs one JSON line per step
to `<log_path>/metrics.jsonl` and returns a summary dict. The defaults train the embedded
`accounts/workbench/models/qwen3-tiny` on the shipped arithmetic data in `workbench/recipes/data/`.
`promote.py` promotes any trainer job's checkpoint (`workbench promote`).
"""
