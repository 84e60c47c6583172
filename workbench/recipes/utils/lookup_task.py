"""The shipped multi-turn agentic task of `igpo_loop`: look a fact up with a tool, then answer.

    rows = read_jsonl(LOOKUP_RL)          # {"messages": [...], "facts": {"3": "red", ...}, "ground_truth": "red"}
    reply = lookup_tool(assistant_text, row)   # "<result>red</result>" for "<lookup>3</lookup>", None: no call
    lookup_reward(final_text, row)             # 1.0 when <answer>...</answer> holds the looked-up color

Each prompt asks for the color of one numbered box and names the tool; the colors are drawn per row, so the
answer cannot be memorized: an agent has to call `<lookup>N</lookup>` (turn 1), read the environment's
`<result>color</result>` and answer `<answer>color</answer>` (turn 2). The outcome reward alone only says
whether the whole trajectory worked; IGPO's turn-level information gain credits the lookup turn directly,
because the result makes the right answer far more likely. `make_lookup_sft` gives demonstrations of the
two-turn trajectory (for a short SFT warm start, as the tests do).
"""

from __future__ import annotations

import random
import re

from .data import DATA_DIR

LOOKUP_RL = DATA_DIR / "lookup_igpo.jsonl"
COLORS = ("red", "blue", "green", "white")
BOXES = 8
_CALL = re.compile(r"<lookup>\s*(\w+)\s*</lookup>")
_ANSWER = re.compile(r"<answer>\s*(\w+)\s*</answer>")


def _prompt(box: int) -> str:
    return f"What color is box {box}? Use <lookup>{box}</lookup>."


def make_lookup_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """`n` prompts; each row's facts are all boxes' colors drawn with `random.Random(seed)`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        facts = {str(b): rng.choice(COLORS) for b in range(BOXES)}
        box = rng.randrange(BOXES)
        rows.append({"messages": [{"role": "user", "content": _prompt(box)}], "facts": facts,
                     "ground_truth": facts[str(box)]})
    return rows


def make_lookup_sft(n: int = 64, seed: int = 1) -> list[dict]:
    """Demonstrations: the lookup call, the tool's result as the next user turn, the answer."""
    out = []
    for row in make_lookup_rows(n, seed):
        box = _CALL.search(row["messages"][0]["content"]).group(1)
        out.append({"messages": row["messages"] + [
            {"role": "assistant", "content": f"<lookup>{box}</lookup>"},
            {"role": "user", "content": f"<result>{row['facts'][box]}</result>"},
            {"role": "assistant", "content": f"<answer>{row['ground_truth']}</answer>"}]})
    return out


def lookup_tool(text: str, row: dict) -> str | None:
    """The environment: the reply to the tool call in `text` (the first one), or None when there is none."""
    m = _CALL.search(text or "")
    if m is None:
        return None
    return f"<result>{(row.get('facts') or {}).get(m.group(1), 'unknown')}</result>"


def lookup_reward(text: str, row: dict) -> float:
    """Outcome reward: 1.0 when the final turn's `<answer>` equals the row's ground_truth."""
    m = _ANSWER.search(text or "")
    return 1.0 if m is not None and m.group(1) == str(row.get("ground_truth")) else 0.0
