"""The shipped multi-turn agentic task of `igpo_loop`: look a fact up with a tool, then answer.

    rows = read_jsonl(LOOKUP_RL)          # {"messages": [...], "facts": {"3": "red", ...}, "ground_truth": "red"}
    reply = lookup_tool(assistant_text, row)   # "result: red" for "lookup 3"; None: no tool call
    lookup_reward(final_text, row)             # 1.0 when <answer>...</answer> holds the box's color

Each prompt asks for the color of one of BOXES numbered boxes; the colors are drawn per row, so the answer
cannot be memorized: an agent has to call `lookup N` (turn 1), read the environment's `result: color`
(the next user turn) and answer `<answer> color</answer>` (turn 2). Answering without the lookup is right
by chance only (1 in len(COLORS)), and so is looking up the wrong box. The outcome reward alone only says
whether the whole trajectory worked; IGPO's turn-level information gain credits the lookup turn directly,
because the right result makes the right answer far more likely.

The strings are chosen for the embedded 512-token vocabulary: every color and box number is one token, and
the answer repeats the result's color token (` red`), so a model as small as qwen3-tiny learns the
two-turn format from a short SFT warm start (`make_lookup_sft`, as the tests do) and RL has signal from
the first step. Copying the box number and the color right takes a few hundred steps more
(`make_lookup_warm_start`, scripts/igpo_reward.py).
"""

from __future__ import annotations

import random
import re

from .data import DATA_DIR

LOOKUP_RL = DATA_DIR / "lookup_igpo.jsonl"
COLORS = ("red", "blue", "green", "white")
BOXES = 4
_CALL = re.compile(r"lookup\s*(\d+)")
_ANSWER = re.compile(r"<answer>\s*(\w+)\s*</answer>")


def _prompt(box: int) -> str:
    return f"What color is box {box}?"


def tool_call(box) -> str:
    """The assistant turn that looks box `box` up."""
    return f"lookup {box}"


def answer(color: str) -> str:
    """The assistant turn that answers `color`."""
    return f"<answer> {color}</answer>"


def make_lookup_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """`n` prompts; each row's facts are all boxes' colors (boxes 1..BOXES) drawn with `random.Random(seed)`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        facts = {str(b): rng.choice(COLORS) for b in range(1, BOXES + 1)}
        box = rng.randint(1, BOXES)
        rows.append({"messages": [{"role": "user", "content": _prompt(box)}], "facts": facts,
                     "ground_truth": facts[str(box)]})
    return rows


def make_lookup_sft(n: int = 64, seed: int = 1) -> list[dict]:
    """Demonstrations: the lookup call, the tool's result as the next user turn, the answer."""
    out = []
    for row in make_lookup_rows(n, seed):
        box = row["messages"][0]["content"].split()[-1].rstrip("?")
        out.append({"messages": row["messages"] + [
            {"role": "assistant", "content": tool_call(box)},
            {"role": "user", "content": lookup_tool(tool_call(box), row)},
            {"role": "assistant", "content": answer(row["ground_truth"])}]})
    return out


def make_lookup_warm_start(n: int = 4096, seed: int = 1, mix: str = "CFFF") -> list[dict]:
    """Demonstrations for an SFT warm start, row k of kind `mix[k % len(mix)]`:
      C  the prompt and the lookup call, nothing after;
      F  the whole trajectory: call, the tool's result, the answer;
      G  a direct guess: the prompt answered at once with a color drawn at random, no lookup (right 1 time
         in len(COLORS)).
    The default "CFFF" with `train_on_what="last_assistant_message"` (loss on the call in C rows, on the
    answer in F rows) weights the answer turn above the call turn: copying the looked-up color is what a
    tiny model learns late, and the call turn stays trained (answer-only SFT alone unlearns it). Its policy
    nearly always looks up, so what RL could still improve is copying, which SFT teaches better.
    "FG" with `train_on_what="all_assistant_messages"` makes the first turn a learned coin flip between
    looking up (F) and guessing (G) while every F row trains both copies (the box number into the call,
    the color into the answer): a policy that answers well when it looks up but looks up only about half
    the time. That decision is what an outcome reward and IGPO's information gain can fix and more SFT on
    the same mix cannot (scripts/igpo_reward.py)."""
    if not mix or set(mix) - set("CFG"):
        raise ValueError(f"mix must be a non-empty string of C, F and G, got {mix!r}")
    rng = random.Random(f"guess-{seed}")
    out = []
    for k, row in enumerate(make_lookup_sft(n, seed)):
        kind = mix[k % len(mix)]
        if kind == "C":
            row = {"messages": row["messages"][:2]}
        elif kind == "G":
            row = {"messages": row["messages"][:1] + [{"role": "assistant", "content": answer(rng.choice(COLORS))}]}
        out.append(row)
    return out


def lookup_tool(text: str, row: dict) -> str | None:
    """The environment: the reply to the tool call in `text` (the first one), or None when there is none."""
    m = _CALL.search(text or "")
    if m is None:
        return None
    return f"result: {(row.get('facts') or {}).get(m.group(1), 'unknown')}"


def lookup_reward(text: str, row: dict) -> float:
    """Outcome reward: 1.0 when the final turn's `<answer>` equals the row's ground_truth."""
    m = _ANSWER.search(text or "")
    return 1.0 if m is not None and m.group(1) == str(row.get("ground_truth")) else 0.0
