"""One cookbook recipe or tool run against workbench, in the cookbook's own environment (see scripts/cookbook.py).

    python scripts/cookbook_items.py sft_loop        # exit 0 on success; the cookbook's own output otherwise

Each item calls the cookbook exactly as its README shows (`from training.recipes.X import Config, main`, the
tools as command lines), changing only what points it at workbench: base model, training shapes,
tokenizer name and small sizes (a few steps on the embedded model). Runs that a later item needs (the
tools need a trainer job with checkpoints) record their summary in COOKBOOK_WORK/<item>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORK = Path(os.environ["COOKBOOK_WORK"])
MODEL = os.environ["COOKBOOK_MODEL"]
TOKENIZER = os.environ["COOKBOOK_TOKENIZER"]
SHAPE = os.environ["COOKBOOK_SHAPE"]
LORA_SHAPE = os.environ["COOKBOOK_LORA_SHAPE"]
REFERENCE_SHAPE = os.environ["COOKBOOK_REFERENCE_SHAPE"]
GSM8K = os.environ["COOKBOOK_GSM8K"]


def data(name: str) -> str:
    from workbench.recipes.utils import data as D

    return str(Path(D.__file__).resolve().parent.parent / "data" / name)


def log_path(item: str) -> str:
    path = WORK / item
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def record(item: str, summary) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{item}.json").write_text(json.dumps(summary, default=str, indent=2))
    print(json.dumps(summary, default=str)[:2000])


def trainer(lora: bool, **kw):
    from training.utils import TrainerConfig

    return TrainerConfig(training_shape_id=LORA_SHAPE if lora else SHAPE, **kw)


def sft_loop(item="sft_loop"):
    from training.recipes.sft_loop import Config, main

    record(item, main(Config(log_path=log_path(item), base_model=MODEL, dataset=data("arithmetic_sft.jsonl"),
                             tokenizer_model=TOKENIZER, learning_rate=3e-3, epochs=1, batch_size=8, max_seq_len=256,
                             max_examples=32, dcp_save_interval=2, output_model_id="cookbook-sft", render_workers=1,
                             trainer=trainer(False))))


def _dpo(item: str, lora: bool):
    from training.recipes.dpo_loop import Config, main

    record(item, main(Config(log_path=log_path(item), base_model=MODEL, dataset=data("arithmetic_preferences.jsonl"),
                             tokenizer_model=TOKENIZER, learning_rate=1e-3, epochs=1, batch_size=4, max_seq_len=256,
                             max_pairs=16, lora_rank=8 if lora else 0, dcp_save_interval=2, render_workers=0,
                             trainer=trainer(lora, reference_training_shape_id=REFERENCE_SHAPE if not lora else None))))


def dpo_loop():
    _dpo("dpo_loop", lora=False)


def dpo_loop_lora():
    _dpo("dpo_loop_lora", lora=True)


def orpo_loop(item="orpo_loop"):
    from training.recipes.orpo_loop import Config, main

    record(item, main(Config(log_path=log_path(item), base_model=MODEL, dataset=data("arithmetic_preferences.jsonl"),
                             tokenizer_model=TOKENIZER, learning_rate=1e-3, epochs=1, batch_size=4, max_seq_len=256,
                             max_pairs=16, dcp_save_interval=2, trainer=trainer(False))))


def _rl(item: str, lora: bool):
    from training.recipes.rl_loop import Config, main
    from training.utils import DeployConfig

    record(item, main(Config(log_path=log_path(item), base_model=MODEL, dataset=data("arithmetic_rl.jsonl"),
                             learning_rate=1e-3, kl_beta=0.001, completions_per_prompt=4, max_completion_tokens=16,
                             max_rows=6, prompt_groups_per_step=2, lora_rank=8 if lora else 0, dcp_save_interval=2,
                             trainer=trainer(lora, reference_training_shape_id=None if lora else REFERENCE_SHAPE),
                             deployment=DeployConfig(tokenizer_model=TOKENIZER))))


def rl_loop_full_kl():
    _rl("rl_loop_full_kl", lora=False)


def rl_loop_lora_kl():
    _rl("rl_loop_lora_kl", lora=True)


def igpo_loop(item="igpo_loop"):
    from training.recipes.igpo_loop import Config, main
    from training.utils import DeployConfig

    record(item, main(Config(log_path=log_path(item), base_model=MODEL, dataset=GSM8K, learning_rate=1e-3,
                             kl_beta=0.001, completions_per_prompt=4, max_completion_tokens=16, max_rows=4,
                             prompt_groups_per_step=2, dcp_save_interval=2,
                             trainer=trainer(False, reference_training_shape_id=REFERENCE_SHAPE),
                             deployment=DeployConfig(tokenizer_model=TOKENIZER))))


def async_rl_loop(item="async_rl_loop"):
    from training.recipes.async_rl_loop import Config, main
    from training.tests.async_grpo_helpers import gsm8k_numeric_reward, make_message_rollout_fn_factory
    from training.utils import DeployConfig

    record(item, main(Config(log_path=log_path(item), base_model=MODEL, dataset=GSM8K, learning_rate=1e-3,
                             kl_beta=0.001, completions_per_prompt=4, max_completion_tokens=16, max_rows=4,
                             prompt_groups_per_step=1, max_head_offpolicy_versions=1, dcp_save_interval=2,
                             trainer=trainer(False, reference_training_shape_id=REFERENCE_SHAPE),
                             deployment=DeployConfig(tokenizer_model=TOKENIZER)),
                      rollout_fn_factory=make_message_rollout_fn_factory(gsm8k_numeric_reward)))


# ---- tools (need a trainer job with DCP and promotable rows: made with workbench's own sft recipe, so a
# failing cookbook recipe does not hide how the tools themselves fare) ------------------------------------
def _job_id() -> str:
    path = WORK / "tools-job.json"
    if not path.exists():
        from workbench.recipes import sft_loop as wb_sft
        from workbench.recipes.utils import InfraConfig, WeightSyncConfig

        summary = wb_sft.main(wb_sft.Config(log_path=log_path("tools-job"), max_steps=4, batch_size=8,
                                            weight_sync=WeightSyncConfig(dcp_save_interval=2),
                                            infra=InfraConfig(cleanup_on_success=False)))
        path.write_text(json.dumps({"job_id": summary["trainer_job_id"]}))
    return json.loads(path.read_text())["job_id"]


def _tool(name: str, *args: str) -> None:
    tools = Path.cwd() / "training" / "examples" / "tools"
    cmd = [sys.executable, str(tools / f"{name}.py"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def list_checkpoints():
    _tool("list_checkpoints", "--job-id", _job_id())
    _tool("list_checkpoints", "--job-id", _job_id(), "--promotable-only", "--json")


def promote_checkpoint():
    _tool("promote_checkpoint", "--job-id", _job_id(), "--base-model", MODEL, "--output-model-id", "cookbook-promoted")


def verify_logprobs():
    # The tool's policy is full-parameter (`lora_rank=0`): a policy shape; its frozen reference goes on the
    # LoRA-capable shape, as the tool's help asks.
    _tool("verify_logprobs", "--training-shape", SHAPE, "--ref-training-shape", REFERENCE_SHAPE, "--base-model", MODEL,
          "--tokenizer", TOKENIZER,
          "--dataset", GSM8K, "--max-rows", "2", "--max-new-tokens", "16", "--log-dir", log_path("verify_logprobs"),
          "--cleanup")


ITEMS = {f.__name__: f for f in [sft_loop, dpo_loop, dpo_loop_lora, orpo_loop, rl_loop_full_kl, rl_loop_lora_kl,
                                 igpo_loop, async_rl_loop, list_checkpoints, promote_checkpoint, verify_logprobs]}

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ITEMS[sys.argv[1]]()
