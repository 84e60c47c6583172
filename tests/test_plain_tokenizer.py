"""The deployment's tokenizer without transformers (`workbench.models.plain_tokenizer`) computes what
transformers' tokenizer computes for the embedded models, and directories it cannot reproduce fall back."""

from __future__ import annotations

import json
import shutil

import pytest

from workbench import models
from workbench.models import plain_tokenizer
from workbench.models.plain_tokenizer import PlainTokenizer

pytestmark = pytest.mark.unit

TEXTS = ["", "Hello world", "  two  spaces\tand a tab\n\nnew lines ", "What is 2+2? <answer>4</answer>",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>",
         "naïve café, 東京, emoji 🙂👍🏽, combining e\u0301", "<|endoftext|><|endoftext|>x", "1234567890 3.14159"]


@pytest.mark.parametrize("name", [models.DEFAULT_MODEL, models.SMALL_MODEL])
def test_same_ids_text_vocab_and_special_tokens_as_transformers(name):
    reference = models.load_tokenizer(name)
    plain = models.load_tokenizer(name, plain=True)
    assert isinstance(plain, PlainTokenizer)
    assert plain.get_vocab() == reference.get_vocab() and len(plain) == len(reference)
    assert (plain.eos_token_id, plain.pad_token_id) == (reference.eos_token_id, reference.pad_token_id)
    for text in TEXTS:
        for special in (False, True):
            ids = plain.encode(text, add_special_tokens=special)
            assert ids == reference.encode(text, add_special_tokens=special), (text, special)
    # every id, alone and in runs that split multi-byte characters, decodes the same both ways
    n = len(reference)
    runs = [[i] for i in range(n)] + [list(range(i, min(n, i + 7))) for i in range(0, n, 5)]
    runs += [reference.encode(t, add_special_tokens=False) for t in TEXTS]
    for ids in runs:
        for skip in (False, True):
            want = reference.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert plain.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == want, ids


def test_tokenizers_it_cannot_reproduce_fall_back_to_transformers(tmp_path):
    src = models.local_path(models.DEFAULT_MODEL)
    config = json.loads((src / "tokenizer_config.json").read_text())
    for name, change in [("class", {"tokenizer_class": "Qwen2Tokenizer"}),
                         ("extra", {"additional_special_tokens": ["<extra>"]}),
                         ("missing", {"eos_token": "<|no such token|>"})]:
        d = tmp_path / name
        d.mkdir()
        shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert plain_tokenizer.load(d) is None, name
    assert plain_tokenizer.load(tmp_path / "nothing-here") is None
