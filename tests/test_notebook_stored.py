"""The tutorials as stored in git: no outputs except those nbval compares, no saved widget state, no cleanup
registered with atexit (a kernel restart must not stop the backend), a fixed run folder, an explicit last
clean-up cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_tutorial_is_stored_clean_and_restart_safe(path):
    nb = json.loads(path.read_text())
    assert "widgets" not in nb.get("metadata", {}), "saved widget state"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for c in code:
        src = "".join(c["source"])
        if "NBVAL_CHECK_OUTPUT" not in src:
            assert not c.get("outputs") and c.get("execution_count") is None, f"stored output in: {src[:80]}"
    text = "".join("".join(c["source"]) for c in code)
    assert "atexit" not in text and "mkdtemp" not in text
    assert f'Path("tutorial-runs") / "{path.stem}"' in "".join(code[0]["source"])
    last = "".join(code[-1]["source"])
    assert "stop_backend=True" in last and "rmtree(WORK" in last


def test_all_five_tutorials_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_checkpoints", "03_recipes", "04_lineage",
                                           "05_compare_and_fork"]
