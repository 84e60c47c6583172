"""Model catalog: maps base-model names to local Hugging Face directories. Never downloads.

    from workbench import models
    path = models.local_path("accounts/workbench/models/qwen3-tiny")   # a directory on disk
    model = models.load_model("accounts/workbench/models/qwen3-tiny")   # fp32 Qwen3ForCausalLM
    tok = models.load_tokenizer("accounts/workbench/models/qwen3-tiny")
    # the same without importing transformers (a deployment replica): plain-torch Qwen3, tokenizers library
    model, tok = models.load_model(name, plain=True), models.load_tokenizer(name, plain=True)

Embedded models (`accounts/workbench/models/qwen3-tiny`, ~1M parameters, and `.../qwen3-small`, ~5M)
ship their config and tokenizer inside the package; their weights are created deterministically
from a fixed seed the first time they are needed and cached (see `materialize`), so the trainer and
every deployment start from bit-identical weights, offline.

Other names are mapped to local directories by configuration: a JSON file
`$WORKBENCH_HOME/models.json` (or the file named by `$WORKBENCH_MODEL_CATALOG`) of the form
`{"accounts/fireworks/models/qwen3-8b": "/data/Qwen3-8B"}`, plus the models promoted into the local
registry (`$WORKBENCH_HOME/models/<account>/<id>`). An unknown name, or a configured directory that
does not exist, raises `ModelNotFoundError` naming the model and the file to edit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_ACCOUNT = "accounts/workbench/models/"
DEFAULT_MODEL = EMBEDDED_ACCOUNT + "qwen3-tiny"
SMALL_MODEL = EMBEDDED_ACCOUNT + "qwen3-small"

# Hugging Face must never reach for the network from inside workbench.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFoundError(LookupError):
    """The model name is not in the catalog, or its configured directory is missing."""


def workbench_home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME") or Path.home() / ".workbench").expanduser()


def _cache_dir() -> Path:
    root = os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench"
    return Path(root).expanduser() / "models"


def catalog_file() -> Path:
    return Path(os.environ.get("WORKBENCH_MODEL_CATALOG") or workbench_home() / "models.json")


def configured_models() -> dict[str, str]:
    """Name -> directory entries from the catalog file (empty if the file does not exist)."""
    f = catalog_file()
    if not f.exists():
        return {}
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"model catalog {f} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"model catalog {f} must be a JSON object of name -> directory")
    return {str(k): str(v) for k, v in data.items()}


def embedded_names() -> list[str]:
    return sorted(EMBEDDED_ACCOUNT + p.name for p in EMBEDDED_DIR.iterdir() if (p / "config.json").exists())


def registry_dir(home: Path | None = None) -> Path:
    """Where promoted models live: <home>/models/<account>/<model_id>/."""
    return (home or workbench_home()) / "models"


_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _is_segment(value: str) -> bool:
    """One path segment of a model name: no separators, no `..`, nothing that can leave its directory."""
    return _SEGMENT_RE.fullmatch(value) is not None and ".." not in value


def local_path(name: str) -> Path:
    """The local Hugging Face directory of model `name` (materializing embedded weights if needed)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelNotFoundError(f"model name must be a non-empty string (got {name!r})")
    if name.startswith(EMBEDDED_ACCOUNT):
        short = name[len(EMBEDDED_ACCOUNT):]
        if not _is_segment(short):
            raise ModelNotFoundError(f"model name {name!r} is invalid: the model id must be one segment of "
                                     "letters, digits, '.', '_' and '-' (no '/' and no '..')")
        if (EMBEDDED_DIR / short / "config.json").exists():
            return materialize(name)
    configured = configured_models()
    if name in configured:
        path = Path(configured[name]).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"model {name!r} is mapped to {path} in {catalog_file()}, but that directory has no config.json")
        return path
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == "models" and _is_segment(parts[1]) \
            and _is_segment(parts[3]):
        promoted = registry_dir() / parts[1] / parts[3]
        if (promoted / "config.json").exists():
            return promoted
    raise ModelNotFoundError(
        f"unknown model {name!r}: workbench never downloads weights. Embedded models: {embedded_names()}; "
        f"map other names to local Hugging Face directories in {catalog_file()} "
        '(e.g. {"accounts/fireworks/models/qwen3-8b": "/data/Qwen3-8B"})')


def materialize(name: str) -> Path:
    """Create (once) the cached directory of an embedded model: shipped files + seeded weights.

    The weights depend only on the shipped config and its `workbench_init_seed`, so every process
    that materializes the same model gets the same bytes. Written to a temporary directory and renamed,
    so concurrent processes never see a half-written model.
    """
    import shutil
    import tempfile

    short = name[len(EMBEDDED_ACCOUNT):]
    if not _is_segment(short) or not (EMBEDDED_DIR / short / "config.json").is_file():
        raise ModelNotFoundError(f"{name!r} is not an embedded model; embedded models: {embedded_names()}")
    src = EMBEDDED_DIR / short
    config_text = (src / "config.json").read_text()
    import hashlib

    digest = hashlib.sha256(config_text.encode()).hexdigest()[:12]
    dst = _cache_dir() / f"{short}-{digest}"
    if (dst / "model.safetensors").exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        model = _init_from_config(tmp)
        model.save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.rename(tmp, dst)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _init_from_config(directory: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    seed = int(getattr(config, "workbench_init_seed", 0))
    cpu_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(cpu_rng)
    return model


def load_model(name: str, dtype=None, device: str = "cpu", plain: bool = False):
    """Load `name` as a causal LM (fp32 by default: this CPU has no fast bf16), in eval mode.

    `plain=True`: workbench's plain-torch Qwen3 (`qwen3_torch`: same logits, parameter names and state dict
    as transformers', without importing transformers) where it supports the model, else transformers'."""
    import torch

    if plain:
        from . import qwen3_torch

        model = qwen3_torch.load(local_path(name), dtype or torch.float32)
        if model is not None:
            return model.to(device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(local_path(name)), dtype=dtype or torch.float32)
    return model.to(device)


def load_tokenizer(name: str, plain: bool = False):
    """The tokenizer of `name` (transformers' AutoTokenizer).

    `plain=True`: a `plain_tokenizer.PlainTokenizer` (tokenizer.json through the `tokenizers` library, no
    transformers import; encode/decode/get_vocab only) where the directory's tokenizer is exactly that, else
    transformers'."""
    if plain:
        from . import plain_tokenizer

        tok = plain_tokenizer.load(local_path(name))
        if tok is not None:
            return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(local_path(name)))
