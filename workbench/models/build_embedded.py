"""Builds the files of the embedded models shipped in `workbench/models/embedded/`.

Run once by a developer (`python -m workbench.models.build_embedded`); the output is committed, so
nothing here runs on a user's machine. It writes, for each embedded model, a Hugging Face
`config.json` (Qwen3 architecture) and a byte-level BPE tokenizer trained offline on a small built-in
corpus, with a ChatML chat template. Weights are *not* shipped: `catalog.materialize` creates them
deterministically from `workbench_init_seed` in the config (see catalog.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "embedded"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]

# ChatML, as Qwen uses it, without Qwen3's tool-calling branches.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# name -> (hidden, layers, heads, kv heads, head_dim, intermediate); sizes from docs/calibration.md
EMBEDDED_SIZES = {
    "qwen3-tiny": (128, 5, 4, 2, 32, 384),    # ~1.05M parameters
    "qwen3-small": (256, 6, 4, 2, 64, 768),   # ~4.85M parameters, for benchmarks
}
VOCAB_SIZE = 512
INIT_SEED = 1234


def _corpus() -> list[str]:
    """A small deterministic corpus: English-ish text, chat turns, arithmetic with answer tags."""
    rng = random.Random(0)
    words = ("the model learns to answer questions about colors numbers and simple facts . "
             "red green blue yellow purple orange black white sky grass sun apple banana "
             "what is the color of a an is are you i we they it this that please answer with "
             "one word sum plus minus times equals question answer user assistant system "
             "hello world good great bad yes no think step first then finally result").split()
    lines = []
    for _ in range(3000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
    for _ in range(3000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} + {b}? <answer>{a + b}</answer>")
        lines.append(f"{a} * {b} = {a * b}, {a} - {b} = {a - b}")
    return lines


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_config(name: str, out_dir: Path, vocab_size: int, eos_id: int, pad_id: int) -> None:
    from transformers import Qwen3Config

    hidden, layers, heads, kv, head_dim, inter = EMBEDDED_SIZES[name]
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    d = cfg.to_dict()
    d["torch_dtype"] = "float32"
    d["workbench_init_seed"] = INIT_SEED
    (out_dir / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def main() -> None:
    for name in EMBEDDED_SIZES:
        out = EMBEDDED_DIR / name
        out.mkdir(parents=True, exist_ok=True)
        build_tokenizer(out)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        build_config(name, out, VOCAB_SIZE, tok.convert_tokens_to_ids("<|im_end|>"),
                     tok.convert_tokens_to_ids("<|endoftext|>"))
        print("wrote", out, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
