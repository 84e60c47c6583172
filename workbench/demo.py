"""The main demo (`workbench demo`): seed 003's research loop on the embedded model, end to end.

It starts (or attaches to) the local backend, requests a trainer and a deployment in parallel, trains
the tiny model to answer a few questions with `forward_backward` + `optim_step`, syncs weights to the
deployment with `WeightSyncer` (a base snapshot, then deltas), samples through the deployment to
score each synced step, and promotes the final snapshot to a model. Everything goes through the
official Fireworks SDK; only the URL, the key and the model names are local. At the end it says what it
leaves running (the backend, the trainer job, the deployment) and how to remove it, and where the tutorials are.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

MODEL = "accounts/workbench/models/qwen3-tiny"
SHAPE = "accounts/workbench/trainingShapes/qwen3-tiny-cpu"

QA = [
    ("What color is the sky?", "blue"),
    ("What color is grass?", "green"),
    ("What color is the sun?", "yellow"),
    ("What color is a banana?", "yellow"),
    ("What color is an apple?", "red"),
    ("What is 2 + 3?", "5"),
    ("What is 10 + 10?", "20"),
    ("Say hello.", "hello world"),
]


def sft_datums(tokenizer, pairs):
    """Chat-formatted datums with loss on the assistant answer only (weights 0 on the prompt)."""
    import tinker

    datums = []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        completion = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
        tokens = prompt + completion
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
        datums.append(tinker.Datum(
            model_input=tinker.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
                            "weights": tinker.TensorData(data=weights, dtype="float32", shape=[len(weights)])}))
    return datums


def lr_at(step: int, steps: int, peak: float = 3e-3, warmup: int = 5) -> float:
    """Linear warm-up to `peak`, then cosine decay: from random weights, full-size first Adam steps make
    learning erratic (see notebooks/01_quickstart)."""
    return peak * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))


def run_demo(home=None, steps: int = 40, sync_every: int = 10) -> dict:
    import tinker
    from fireworks.training.sdk import (AdaptiveConcurrencyController, DeploymentConfig, DeploymentManager,
                                        DeploymentSampler, FireworksClient, FiretitanServiceClient,
                                        TrainerJobConfig, TrainerJobManager)

    from workbench.connect import connect
    from workbench.models import load_tokenizer
    from workbench.sdk import WeightSyncer

    backend = connect(home=home)
    print(f"backend: {backend.base_url}")
    rlor_mgr = TrainerJobManager(api_key=backend.api_key, base_url=backend.base_url)
    deploy_mgr = DeploymentManager(api_key=backend.api_key, base_url=backend.base_url)
    profile = rlor_mgr.resolve_training_profile(SHAPE)
    created = rlor_mgr.create(TrainerJobConfig(base_model=MODEL, training_shape_ref=profile.training_shape,
                                               lora_rank=0, learning_rate=1e-3))
    deployment_id = f"demo-{created.job_id[-8:]}"
    deploy_mgr.create_or_get(DeploymentConfig(deployment_id=deployment_id, base_model=MODEL,
                                              hot_load_trainer_job=created.job_name,
                                              min_replica_count=0, max_replica_count=1))
    with ThreadPoolExecutor(max_workers=2) as pool:
        trainer_future = pool.submit(rlor_mgr.wait_for_ready, created.job_id, poll_interval_s=1)
        deploy_future = pool.submit(deploy_mgr.wait_for_ready, deployment_id, poll_interval_s=1)
        endpoint = trainer_future.result()
        deploy_future.result()
    print(f"trainer {created.job_id} and deployment {deployment_id} are ready")

    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    client = service.create_training_client(base_model=MODEL, lora_rank=0)
    tokenizer = load_tokenizer(MODEL)
    data = sft_datums(tokenizer, QA)
    syncer = WeightSyncer(policy_client=client, deploy_mgr=deploy_mgr, deployment_id=deployment_id,
                          base_model=MODEL, hotload_timeout=120, first_checkpoint_type="base")
    sampler = DeploymentSampler(inference_url=backend.base_url,
                                model=f"accounts/{deploy_mgr.account_id}/deployments/{deployment_id}",
                                api_key=backend.api_key, tokenizer=tokenizer,
                                concurrency_controller=AdaptiveConcurrencyController(initial_window=16))

    def evaluate() -> float:
        async def sample_all():
            return await asyncio.gather(*[sampler.sample_with_tokens(
                messages=[{"role": "user", "content": q}], n=1, max_tokens=8, temperature=0.0) for q, _ in QA])

        results = asyncio.run(sample_all())
        correct = sum(r[0].text.replace("<|im_end|>", "").strip() == a for r, (_, a) in zip(results, QA))
        return correct / len(QA)

    history = []
    t0 = time.time()
    for step in range(1, steps + 1):
        fb = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=lr_at(step, steps), beta1=0.9, beta2=0.999, eps=1e-8,
                                            weight_decay=0.0)).result()
        loss = fb.metrics["loss:sum"] / max(fb.metrics.get("num_loss_tokens:sum", 1), 1)
        if step % sync_every == 0 or step == steps:
            snapshot = syncer.save_and_hotload(f"step-{step:05d}")
            assert syncer.check_deployment_state() == snapshot
            score = evaluate()
            history.append({"step": step, "loss": loss, "snapshot": snapshot, "eval_score": score})
            print(f"step {step:3d}  loss/token {loss:.3f}  synced {snapshot}  eval exact-match {score:.2f}")

    # Promote the last base snapshot (deltas of a full-parameter run are not promotable).
    fw = FireworksClient(api_key=backend.api_key, base_url=backend.base_url)
    rows = fw.list_checkpoints(created.job_id)
    final = client.save_weights_for_sampler_ext(f"final-{steps}", checkpoint_type="base")
    row = next(r for r in fw.list_checkpoints(created.job_id) if r["name"].endswith("/" + final.snapshot_name))
    model_id = f"demo-{created.job_id[-8:]}-final"
    model = fw.promote_checkpoint(name=row["name"], output_model_id=model_id, base_model=MODEL)
    print(f"{len(rows) + 1} checkpoints; promoted {row['name'].split('/')[-1]} -> {model['name']} "
          f"({model.get('localPath')})")
    print(f"done in {time.time() - t0:.1f}s")
    service.close()
    home = f" --home {backend.home}" if backend.home else ""
    print(f"\nleft running: the backend at {backend.base_url}, trainer job {created.job_id} and deployment "
          f"{deployment_id} (one process each, a few hundred MB of memory).\n"
          f"  workbench ls{home}          lists them\n"
          f"  workbench rm --all{home}    deletes the trainer jobs and deployments\n"
          f"  workbench stop{home}        stops the backend and everything it runs")
    print("next: the tutorials in notebooks/ (start with notebooks/01_quickstart.ipynb in Jupyter)")
    return {"history": history, "model": model, "job_id": created.job_id, "deployment_id": deployment_id}
