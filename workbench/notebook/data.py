"""Small data helpers for tutorials: chat-formatted SFT datums built with the official SDK's types.

    from workbench.notebook.data import COLORS, sft_datums
    data = sft_datums(run.tokenizer, COLORS)          # loss on the assistant answer only
    client.forward_backward(data, "cross_entropy").result()
"""

from __future__ import annotations

COLORS = [
    ("What color is the sky?", "blue"),
    ("What color is grass?", "green"),
    ("What color is the sun?", "yellow"),
    ("What color is a banana?", "yellow"),
    ("What color is an apple?", "red"),
    ("What color is snow?", "white"),
    ("What color is coal?", "black"),
    ("What color is an orange?", "orange"),
]


def sft_datums(tokenizer, pairs, end: str | None = None) -> list:
    """(question, answer) pairs -> `Datum`s: the chat-templated prompt, then the answer and end-of-turn,
    with loss weights 0 on the prompt and 1 on the answer."""
    from fireworks.training.sdk import Datum, ModelInput, TensorData

    end = end if end is not None else (getattr(tokenizer, "eos_token", None) or "")
    datums = []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        completion = tokenizer.encode(answer + end, add_special_tokens=False)
        tokens = list(prompt) + list(completion)
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
        n = len(tokens) - 1
        datums.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": TensorData(data=tokens[1:], dtype="int64", shape=[n]),
                                            "weights": TensorData(data=weights, dtype="float32", shape=[n])}))
    return datums


def eval_items(pairs) -> list[dict]:
    """(question, answer) pairs -> prompt items for `run.evaluate` (messages + "answer")."""
    return [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in pairs]
