"""Issue 10 end to end through the official SDK: each trainer job writes its chosen delta format, a deployment
hot-loads base + 3 deltas of it, and interop with fireworks_delta_compression goes both ways.

- arc_v2 (the default: no option), arc_v3 (TrainerJobConfig.extra_values) and workbench_v1
  (TrainerJobConfig.extra_args), each synced with WeightSyncer(compression_format=<same>): the
  deployment ends on the trainer's bf16 weights bit for bit, samples, and the rows show the format;
- a workbench arc_v2 chain decodes with the library alone in a process that never imports workbench;
- a base + 2 deltas written by the library alone (Fireworks' layout) hot-load into a deployment;
- a hot-load naming another compression_format is a 4xx naming both, the held snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap

import httpx
import pytest
import tinker
import torch

from conftest import TINY
from test_sdk_trainer import make_datums

pytestmark = pytest.mark.timeout(900)
ADAM = tinker.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
# format -> how the job chooses it (None: the default)
CHOICES = {"arc_v2": {}, "arc_v3": {"extra_values": {"compression_format": "arc_v3"}},
           "workbench_v1": {"extra_args": ["--compression-format", "workbench_v1"]}}


def start(backend, fmt: str):
    """A trainer job writing `fmt`, a deployment linked to it, a training client and a WeightSyncer."""
    from workbench.sdk import WeightSyncer

    env = backend.start_policy_and_deployment(f"fmt-{fmt.replace('_', '-')}", **CHOICES[fmt])
    syncer = WeightSyncer(policy_client=env["client"], deploy_mgr=env["deploy"], deployment_id=env["deployment_id"],
                          base_model=TINY, hotload_timeout=120, first_checkpoint_type="base", compression_format=fmt)
    return dict(job_id=env["job_id"], deployment_id=env["deployment_id"], service=env["service"],
                client=env["client"], syncer=syncer, deploy=env["deploy"], snapshots=[])


def trainer_bf16(backend, run, name: str) -> dict:
    """The trainer's current weights rounded to bf16, read back from a save_state of them."""
    from workbench.checkpoints import load_train_state
    from workbench.models import load_model

    run["client"].save_state(name).result()
    model = load_model(TINY)
    load_train_state(backend.home / "jobs" / run["job_id"] / "checkpoints" / name, model, None)
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def deployment_chain(backend, run) -> list:
    """The snapshot directories the deployment says (state.json) it rebuilt its weights from."""
    state = json.loads((backend.home / "deployments" / run["deployment_id"] / "state.json").read_text())
    return [e["dir"] for e in state["chain"]]


def sample_once(backend, run) -> str:
    from fireworks.training.sdk import DeploymentSampler

    from workbench.models import load_tokenizer

    sampler = DeploymentSampler(inference_url=run["deploy"].inference_url,
                                model=f"accounts/{run['deploy'].account_id}/deployments/{run['deployment_id']}",
                                api_key=backend.api_key, tokenizer=load_tokenizer(TINY))
    out = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "hi"}], n=1, max_tokens=4,
                                                 temperature=1.0, logprobs=True))
    assert out and out[0].completion_len > 0 and len(out[0].inference_logprobs) == out[0].completion_len
    return out[0].text


def same_bits(a: dict, b: dict) -> None:
    assert set(a) <= set(b) and a
    for k, v in a.items():
        assert torch.equal(v.view(torch.int16), b[k].to(torch.bfloat16).view(torch.int16)), k


@pytest.fixture(scope="module")
def runs(backend):
    started = {}
    yield started
    for run in started.values():
        run["service"].close()


@pytest.mark.parametrize("fmt", list(CHOICES))
def test_base_and_three_deltas_hot_load_bit_for_bit(backend, runs, fmt):
    from fireworks.training.sdk import FireworksClient

    from workbench.checkpoints import reconstruct

    run = runs[fmt] = start(backend, fmt)
    data = make_datums(n=2, seed=21)
    for i in range(4):
        run["client"].forward_backward(data, "cross_entropy").result()
        run["client"].optim_step(ADAM).result()
        run["snapshots"].append(run["syncer"].save_and_hotload(f"{fmt.replace('_', '-')}-{i}"))
        assert run["syncer"].check_deployment_state() == run["snapshots"][-1]
    expected = trainer_bf16(backend, run, "after-sync")
    chain = deployment_chain(backend, run)
    assert [os.path.basename(d) for d in chain] == run["snapshots"]      # base + 3 deltas, no reload in between
    same_bits(reconstruct(chain), expected)
    sample_once(backend, run)

    rows = {r["name"].split("/")[-1]: r for r in
            FireworksClient(api_key=backend.api_key, base_url=backend.base_url).list_checkpoints(run["job_id"])}
    assert rows[run["snapshots"][0]]["checkpointType"] == "CHECKPOINT_TYPE_INFERENCE_BASE"
    for i, name in enumerate(run["snapshots"][1:], start=1):
        row = rows[name]
        assert (row["checkpointType"], row["promotable"], row["deltaFormat"]) == \
            ("CHECKPOINT_TYPE_INFERENCE_ARC_V2", False, fmt)
        assert row["chainLength"] == i and 0 < row["changedFraction"] <= 1 and row["deltaBytes"] > 0
    job = backend.get(f"/v1/accounts/workbench/rlorTrainerJobs/{run['job_id']}").json()
    assert job["extraValues"]["compression_format"] == fmt


def test_workbench_delta_decodes_with_the_library_alone(backend, runs, tmp_path):
    if "arc_v2" not in runs:
        pytest.skip("needs the arc_v2 chain of test_base_and_three_deltas_hot_load_bit_for_bit")
    from safetensors.torch import save_file

    run = runs["arc_v2"]
    chain = deployment_chain(backend, run)
    save_file({k: v.contiguous() for k, v in trainer_bf16(backend, run, "for-library").items()},
              str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent("""
        import sys, glob, torch
        from safetensors.torch import load_file
        from fireworks_delta_compression import delta_decompress_dict_from_file
        base, deltas, expected = sys.argv[1], sys.argv[2:-1], load_file(sys.argv[-1])
        weights = load_file(base + "/model.safetensors")
        for d in deltas:
            weights = delta_decompress_dict_from_file(src=weights, diff_file=glob.glob(d + "/*.safetensors")[0],
                                                      compression_format="arc_v2")
        assert weights and all(torch.equal(w.view(torch.int16), expected[k].view(torch.int16))
                               for k, w in weights.items()), "not the trainer's weights"
        assert not any(m == "workbench" or m.startswith("workbench.") for m in sys.modules), "imported workbench"
        print("OK", len(weights))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, *chain, str(tmp_path / "expected.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stderr[-2000:]


def test_disagreeing_compression_format_is_refused_and_previous_keeps_serving(backend, runs):
    if "workbench_v1" not in runs:
        pytest.skip("needs the workbench_v1 run of test_base_and_three_deltas_hot_load_bit_for_bit")
    run = runs["workbench_v1"]
    held = run["syncer"].check_deployment_state()
    run["client"].forward_backward(make_datums(n=2, seed=22), "cross_entropy").result()
    run["client"].optim_step(ADAM).result()
    name = run["client"].save_weights_for_sampler_ext("mismatch", checkpoint_type="delta").snapshot_name
    meta = {"previous_snapshot_identity": held, "compression_format": "arc_v2", "checksum_format": "alder32"}
    with pytest.raises(httpx.HTTPStatusError) as refused:
        run["deploy"].hotload(run["deployment_id"], TINY, name, incremental_snapshot_metadata=meta)
    assert 400 <= refused.value.response.status_code < 500
    message = refused.value.response.text
    assert "'arc_v2'" in message and "'workbench_v1'" in message and "compression_format" in message, message
    status = run["deploy"].hotload_check_status(run["deployment_id"], TINY)["replicas"][0]
    assert status["current_snapshot_identity"] == held
    sample_once(backend, run)


def test_foreign_chain_written_by_the_library_hot_loads(backend, runs):
    """Fireworks' layout: <dir>/<identity>/ per snapshot; the base an HF directory, each delta directory
    the library's *.safetensors of patches (here model.safetensors, as delta_compress_dirs names it)."""
    if "arc_v2" not in runs:
        pytest.skip("needs a deployment from test_base_and_three_deltas_hot_load_bit_for_bit")
    from fireworks_delta_compression import delta_compress_dicts_to_file
    from safetensors.torch import load_file, save_file

    from workbench.models import load_model, local_path

    run = runs["arc_v2"]
    root = backend.home / "imports" / "foreign-chain"
    base_dir = root / "foreign-base"
    base_dir.mkdir(parents=True)
    for f in local_path(TINY).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, base_dir / f.name)
    model = load_model(TINY)
    weights = [{k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                if k != "lm_head.weight" or not model.config.tie_word_embeddings}]
    save_file(weights[0], str(base_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    for i in (1, 2):
        nxt = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in weights[-1].items()}
        (root / f"foreign-delta-{i}").mkdir()
        delta_compress_dicts_to_file(src=weights[-1], dst=nxt, diff_file=str(root / f"foreign-delta-{i}" / "model.safetensors"),
                                     compression_format="arc_v2")
        weights.append(nxt)
    deploy, dep = run["deploy"], run["deployment_id"]
    deploy.hotload(dep, TINY, "foreign-base", path=str(root))
    assert deploy.wait_for_hotload(dep, TINY, "foreign-base", timeout_seconds=120)
    previous = "foreign-base"
    for i in (1, 2):
        meta = {"previous_snapshot_identity": previous, "compression_format": "arc_v2", "checksum_format": "alder32"}
        deploy.hotload(dep, TINY, f"foreign-delta-{i}", incremental_snapshot_metadata=meta, path=str(root))
        assert deploy.wait_for_hotload(dep, TINY, f"foreign-delta-{i}", timeout_seconds=120)
        previous = f"foreign-delta-{i}"
    status = deploy.hotload_check_status(dep, TINY)["replicas"][0]
    assert status["current_snapshot_identity"] == "foreign-delta-2"
    chain = deployment_chain(backend, run)
    assert [os.path.basename(d) for d in chain] == ["foreign-base", "foreign-delta-1", "foreign-delta-2"]
    from workbench.checkpoints import reconstruct

    same_bits(reconstruct(chain), weights[-1])
    assert load_file(str(base_dir / "model.safetensors")).keys() == weights[0].keys()   # the chain was not modified
    sample_once(backend, run)
    run["syncer"].reset_delta_chain()


def test_crafted_pickles_in_a_job_directory_run_nothing(backend, runs, tmp_path):
    """A crafted arc_v3 patch is refused by the deployment; a crafted DCP .metadata is listed from the
    manifest and refused by load_state; the pickle, which would create a marker file, never runs."""
    import pickle

    from fireworks.training.sdk import FireworksClient

    from test_delta_formats import _Marker, _replace_patch

    if "arc_v3" not in runs:
        pytest.skip("needs the arc_v3 run of test_base_and_three_deltas_hot_load_bit_for_bit")
    run = runs["arc_v3"]
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Marker(marker), protocol=pickle.HIGHEST_PROTOCOL)
    job_dir = backend.home / "jobs" / run["job_id"]

    held = run["syncer"].check_deployment_state()
    name = run["client"].save_weights_for_sampler_ext("crafted", checkpoint_type="delta").snapshot_name
    delta_file = job_dir / "sampler" / name / "delta.safetensors"
    from workbench.checkpoints.formats import safetensors_header

    _replace_patch(delta_file, next(iter(safetensors_header(delta_file)[0])), b"ARC3_ENVELOPE\0" + evil)
    meta = {"previous_snapshot_identity": held, "compression_format": "arc_v3", "checksum_format": "alder32"}
    with pytest.raises(httpx.HTTPStatusError) as refused:
        run["deploy"].hotload(run["deployment_id"], TINY, name, incremental_snapshot_metadata=meta)
    assert 400 <= refused.value.response.status_code < 500 and "import or call" in refused.value.response.text
    assert run["deploy"].hotload_check_status(run["deployment_id"], TINY)["replicas"][0]["current_snapshot_identity"] == held

    run["client"].save_state("crafted-state").result()
    (job_dir / "checkpoints" / "crafted-state" / ".metadata").write_bytes(evil)
    rows = FireworksClient(api_key=backend.api_key, base_url=backend.base_url).list_checkpoints(run["job_id"])
    assert any(r["name"].endswith("/crafted-state") for r in rows)
    with pytest.raises(Exception, match="open"):
        run["client"].load_state("crafted-state").result()
    assert not marker.exists()
    sample_once(backend, run)
