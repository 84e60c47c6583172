"""What the Fireworks cookbook and the seeds need from workbench's client side (issue 14, items 6-8):

* `import tinker` is the SDK's native Tinker surface (`tinker.types`, `SamplingClient`, `StopReason`,
  `APIError`, ...), also when PyPI `tinker` (which the cookbook pulls in through tinker-cookbook) is installed
  in front of it on sys.path;
* the embedded tokenizers under Hugging Face-style names: an offline hub-cache entry and a renderer
  registration for tinker_cookbook's model registry;
* seed 002's `tracker.hotload(snapshot)` (no checkpoint_type) through `workbench.sdk.WeightSyncer`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TINY, TINY_SHAPE

REPO = Path(__file__).resolve().parent.parent
PYPI_TINKER = "tinker==0.38.0"
pytestmark = pytest.mark.timeout(600)


def test_tinker_is_the_sdk_surface():
    import fireworks.training.sdk as sdk
    import fireworks.training.sdk._core as core
    import tinker
    from tinker import types
    from tinker.lib._pydantic_conv import to_pydantic_input
    from tinker.types.datum import Datum

    assert types is sdk.types and Datum is sdk.Datum and tinker.AdamParams is sdk.AdamParams
    assert tinker.SamplingClient is sdk.SamplingClient and tinker.ServiceClient is sdk.ServiceClient
    assert tinker.StopReason is sdk.StopReason and tinker.APIError is core.APIError
    assert set(core._EXPORTS) <= set(tinker.__all__)                 # the whole native surface
    from fireworks.training.sdk._core.lib import _pydantic_conv
    assert to_pydantic_input is _pydantic_conv.to_pydantic_input     # the SDK's module, not a copy
    with pytest.raises(ModuleNotFoundError, match="tinker.no_such_module"):
        import tinker.no_such_module  # noqa: F401


@pytest.fixture(scope="module")
def pypi_tinker(tmp_path_factory) -> Path:
    """PyPI's `tinker` installed into a target directory (never into the shared environment)."""
    target = tmp_path_factory.mktemp("pypi-tinker")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        PYPI_TINKER], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot install {PYPI_TINKER} from the package index here: {r.stderr[-300:]}")
    assert (target / "tinker" / "__init__.py").exists()
    return target


PROBE = """
import site, sys
sys.path.insert(0, sys.argv[1])                # PyPI tinker first on the path, as in the cookbook's venv
if sys.argv[2] == "pth":
    site.addsitedir(sys.argv[3])               # what an installed workbench wheel has: workbench-tinker.pth
import tinker
from tinker import types
import fireworks.training.sdk as sdk
datum = sdk.Datum(model_input=tinker.ModelInput.from_ints([1, 2, 3]),
                  loss_fn_inputs={"target_tokens": tinker.TensorData(data=[2, 3, 4], dtype="int64", shape=[3])})
print(types is sdk.types, tinker.ModelInput is sdk.ModelInput, type(datum).__name__)
"""


def test_import_tinker_is_the_sdk_even_with_pypi_tinker_installed(pypi_tinker, tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "workbench-tinker.pth").write_text((REPO / "workbench" / "workbench-tinker.pth").read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("WORKBENCH_TINKER", None)

    def probe(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", PROBE, str(pypi_tinker), mode, str(site_dir)], env=env,
                              capture_output=True, text=True, timeout=300)

    with_hook = probe("pth")
    assert with_hook.returncode == 0, with_hook.stderr
    assert with_hook.stdout.split() == ["True", "True", "Datum"]
    # without the hook the PyPI package wins, and the SDK rejects its objects (what the cookbook hit)
    without = probe("none")
    assert without.returncode != 0 and "ModelInput" in without.stderr, without.stdout + without.stderr
    # the opt-out leaves `tinker` to PyPI's package
    env["WORKBENCH_TINKER"] = "pypi"
    opted_out = probe("pth")
    assert opted_out.returncode != 0 and "ModelInput" in opted_out.stderr


def test_wheel_ships_the_pth(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("workbench-*.whl"))).namelist()
    assert "workbench-tinker.pth" in names and "workbench/_tinker.py" in names and "tinker/__init__.py" in names


def test_embedded_tokenizer_under_a_hugging_face_name(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from workbench.cookbook import HF_NAMES, hf_cache_entry
    from workbench.models import load_tokenizer

    assert "workbench/qwen3-tiny" in HF_NAMES
    snapshot = hf_cache_entry(tmp_path / "hf", "workbench/qwen3-tiny")
    assert hf_cache_entry(tmp_path / "hf", "workbench/qwen3-tiny") == snapshot          # idempotent
    tok = AutoTokenizer.from_pretrained("workbench/qwen3-tiny", cache_dir=str(tmp_path / "hf" / "hub"),
                                        local_files_only=True)
    shipped = load_tokenizer(TINY)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        shipped.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with pytest.raises(KeyError, match="not an embedded model"):
        hf_cache_entry(tmp_path / "hf", "Qwen/Qwen3-8B")


def test_renderer_registration_covers_only_workbench_names():
    from workbench.cookbook import RENDERERS, register_renderers

    class ConfigurationError(Exception):
        pass

    def unknown(name):
        raise ConfigurationError(f"Unknown model: {name}")

    fake = SimpleNamespace(ModelAttributes=lambda *a: a, get_model_attributes=unknown)
    register_renderers(fake)
    register_renderers(fake)                                  # idempotent: wrapped once
    assert fake.get_model_attributes("workbench/qwen3-tiny")[4] == RENDERERS == ("qwen3", "qwen3_instruct")
    assert fake.get_model_attributes("workbench/qwen3-small:step-4")[2] == "qwen3-small"
    with pytest.raises(ConfigurationError):
        fake.get_model_attributes("foo/bar")


def test_seed_002_hotload_without_checkpoint_type(backend):
    """Seed 002: `snapshot = tracker.save_only(...)` then `tracker.hotload(snapshot)`; the SDK's hotload needs a
    checkpoint_type, workbench.sdk.WeightSyncer takes the one the snapshot was saved as."""
    import tinker
    from fireworks.training.sdk import DeploymentConfig, FiretitanServiceClient, TrainerJobConfig

    from workbench.sdk import WeightSyncer

    rlor_mgr, deploy_mgr = backend.trainer_manager(), backend.deployment_manager()
    profile = rlor_mgr.resolve_training_profile(TINY_SHAPE)
    created = rlor_mgr.create(TrainerJobConfig(base_model=TINY, training_shape_ref=profile.training_shape,
                                               lora_rank=0, learning_rate=1e-3))
    deploy_mgr.create_or_get(DeploymentConfig(deployment_id="seed2-serving", base_model=TINY,
                                              hot_load_trainer_job=created.job_name, min_replica_count=0,
                                              max_replica_count=1))
    endpoint = rlor_mgr.wait_for_ready(created.job_id, poll_interval_s=1)
    deploy_mgr.wait_for_ready("seed2-serving", poll_interval_s=1)
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=backend.api_key)
    try:
        client = service.create_training_client(base_model=TINY, lora_rank=0)
        tracker = WeightSyncer(policy_client=client, deploy_mgr=deploy_mgr, deployment_id="seed2-serving",
                               base_model=TINY, hotload_timeout=120, warmup_after_hotload=False)
        first = tracker.save_only("resume-step-0", checkpoint_type="base")
        assert tracker.hotload(first) is True and tracker.check_deployment_state() == first
        datum = tinker.Datum(model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
                             loss_fn_inputs={"target_tokens": tinker.TensorData(data=[2, 3, 4, 5], dtype="int64",
                                                                                shape=[4])})
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)).result()
        second = tracker.save_only("step-00001")                   # the chain's next type: a delta
        assert tracker._saved_types[second] == "delta"
        assert tracker.hotload(second) is True and tracker.check_deployment_state() == second
        # a snapshot this syncer did not save is hot-loaded as a base
        third = client.save_weights_for_sampler_ext("outside", checkpoint_type="base").snapshot_name
        assert tracker.hotload(third) is True and tracker.check_deployment_state() == third
    finally:
        service.close()
