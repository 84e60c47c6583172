"""A model directory's tokenizer.json through the `tokenizers` library alone, without importing transformers.

    from workbench import models
    tok = models.load_tokenizer(name, plain=True)     # a PlainTokenizer where it applies, else transformers'
    ids = tok.encode("Hello", add_special_tokens=False)
    text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    tok.get_vocab(); tok.eos_token_id; tok.pad_token_id

Why: a deployment replica only encodes prompts and decodes tokens, and importing transformers for that
costs it ~100 MiB of resident memory and a second or more of start-up. This is the surface the replica
uses (`encode`, `decode`, `get_vocab`, `eos_token_id`, `pad_token_id`, `len()`), with transformers'
signatures, computing what transformers' tokenizer computes: for the directories `load` accepts,
transformers' `TokenizersBackend`/`PreTrainedTokenizerFast` is itself a thin wrapper that calls the same
`tokenizers.Tokenizer` (tests/test_plain_tokenizer.py compares the two on the embedded models).

`load` accepts a directory whose tokenizer_config.json names one of those two classes and whose
tokenizer.json is a BPE model (for BPE, transformers never applies `clean_up_tokenization_spaces`, so
that flag changes nothing here either), and whose named special tokens are in the tokenizer. Anything
else (class-specific Python such as Qwen2Tokenizer or LlamaTokenizer, slow tokenizers, extra added tokens
declared only in tokenizer_config.json) returns None and the caller uses transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizer_config.json classes that are tokenizer.json and nothing more
_PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class PlainTokenizer:
    """transformers' tokenizer surface that the deployment uses, over one `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer, eos_token: str | None, pad_token: str | None):
        self._tokenizer = tokenizer
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = tokenizer.token_to_id(pad_token) if pad_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """`clean_up_tokenization_spaces` is accepted and ignored: transformers skips it for BPE too."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


def load(model_dir: str | Path) -> PlainTokenizer | None:
    """The tokenizer of `model_dir` as a PlainTokenizer, or None where transformers must build it (see the
    module docstring)."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        spec = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in _PLAIN_CLASSES:
        return None
    if not isinstance(spec, dict) or (spec.get("model") or {}).get("type") != "BPE":
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # added tokens declared in tokenizer_config.json alone would be added by transformers at load
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        if tokenizer.token_to_id(_token_text(entry) or "") != int(token_id):
            return None
    if config.get("additional_special_tokens") or config.get("extra_special_tokens"):
        return None
    named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    if any(v is not None and tokenizer.token_to_id(v) is None for v in named.values()):
        return None
    return PlainTokenizer(tokenizer, named["eos_token"], named["pad_token"])
