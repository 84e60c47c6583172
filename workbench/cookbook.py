"""The embedded models under Hugging Face-style names, for the Fireworks cookbook's tokenizer and renderer code.

    python -m workbench.cookbook hf-cache ~/.cache/huggingface     # writes the offline cache entries
    export HF_HOME=~/.cache/huggingface HF_HUB_OFFLINE=1
    # cookbook: tokenizer_model="workbench/qwen3-tiny"  (DeployConfig(tokenizer_model=...) for RL)

The cookbook loads its tokenizer with `AutoTokenizer.from_pretrained(tokenizer_model)` and picks a renderer
from that name (`training.utils.supervised.resolve_renderer_name` -> tinker_cookbook's model registry). A local
directory loads but has no name to infer from ("Could not infer a renderer"). So each embedded model gets a
Hugging Face-style name, `workbench/<model>` (HF_NAMES):
* `hf_cache_entry()` writes an offline hub-cache entry of that name holding the shipped tokenizer files, so
  `from_pretrained("workbench/qwen3-tiny")` works with HF_HUB_OFFLINE=1 and no download;
* `register_renderers()` adds the `workbench` organization to tinker_cookbook's model registry, recommending
  the `qwen3` renderer (its output is token for token the shipped ChatML chat template: no thinking
  prefill; `tests/test_cookbook_compat.py` checks it). It wraps `tinker_cookbook.model_info.get_model_attributes`
  for names of that organization only; every other name is looked up unchanged. workbench-tinker.pth
  arranges for this to happen when `tinker_cookbook.model_info` is first imported (see workbench/_tinker.py),
  so the cookbook's own code needs no change; without that hook, call `register_renderers()` yourself or set
  `renderer_name="qwen3"` in the cookbook's Config.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from workbench.models import DEFAULT_MODEL, EMBEDDED_DIR, SMALL_MODEL

ORG = "workbench"
RENDERERS = ("qwen3", "qwen3_instruct")
"""tinker_cookbook renderers that reproduce the embedded models' chat template, recommended first."""
HF_NAMES = {f"{ORG}/{m.rsplit('/', 1)[-1]}": m for m in (DEFAULT_MODEL, SMALL_MODEL)}
"""Hugging Face-style tokenizer name -> the embedded model it belongs to."""


def tokenizer_dir(hf_name: str) -> Path:
    if hf_name not in HF_NAMES:
        raise KeyError(f"{hf_name!r} is not an embedded model's name (known: {sorted(HF_NAMES)})")
    return EMBEDDED_DIR / hf_name.split("/", 1)[1]


def hf_cache_entry(hf_home: str | Path, hf_name: str) -> Path:
    """Write (idempotently) the hub-cache entry `hf_name` under `<hf_home>/hub` holding the shipped tokenizer
    files; returns its snapshot directory. The revision is a hash of the files, so a changed tokenizer gets a
    new snapshot and `refs/main` moves to it."""
    src = tokenizer_dir(hf_name)
    files = sorted(p for p in src.iterdir() if p.is_file())
    revision = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    entry = Path(hf_home).expanduser() / "hub" / ("models--" + hf_name.replace("/", "--"))
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copyfile(p, snapshot / p.name)
    (entry / "refs").mkdir(exist_ok=True)
    tmp = entry / "refs" / "main.tmp"
    tmp.write_text(revision)
    tmp.replace(entry / "refs" / "main")
    return snapshot


def register_renderers(model_info=None) -> None:
    """Teach tinker_cookbook's model registry the `workbench/<model>` names (idempotent)."""
    if model_info is None:
        import tinker_cookbook.model_info as model_info
    original = model_info.get_model_attributes
    if getattr(original, "_workbench", False):
        return

    def get_model_attributes(model_name: str):
        name = model_name.split(":")[0]
        if name in HF_NAMES:
            return model_info.ModelAttributes(ORG, "3", name.split("/", 1)[1], True, RENDERERS)
        return original(model_name)

    get_model_attributes._workbench = True
    get_model_attributes.__doc__ = original.__doc__
    model_info.get_model_attributes = get_model_attributes


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "hf-cache":
        print("usage: python -m workbench.cookbook hf-cache HF_HOME", file=sys.stderr)
        return 2
    for name in HF_NAMES:
        print(f"{name}: {hf_cache_entry(argv[1], name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
