"""The lineage store on its own (no backend): recording, the two questions it answers, DataFrames out."""

from __future__ import annotations

import sqlite3

from workbench.notebook.lineage import LineageStore, logical_name, prompt_set_hash


def _fill(store: LineageStore) -> tuple[int, int]:
    for step in range(1, 21):
        store.log_step("job-1", step, {"loss": 2.0 / step, "grad_norm": 1.0}, data_consumed=step * 8)
    store.record_checkpoint("job-1", "step-00010-ab12cd34", kind="sampler", requested_type="base", step=10,
                            data_consumed=80)
    store.record_hotload("step-00010-ab12cd34", "dep", checkpoint_type="base", duration_s=0.4)
    e1 = store.record_evaluation("colors", snapshot="step-00010-ab12cd34", deployment_id="dep", score=0.5,
                                 prompt_hash="h", n_prompts=2, sample_count=2, job_id="job-1", step=10,
                                 samples=[{"prompt": [{"role": "user", "content": "q"}], "completion": "blue",
                                           "score": 1.0}, {"prompt": "q2", "completion": "x", "score": 0.0}])
    store.record_checkpoint("job-1", "step-00020-ab12cd34", kind="sampler", requested_type="delta", step=20,
                            data_consumed=160)
    # the control plane's authoritative type arrives later and completes the row
    store.record_checkpoint("job-1", "step-00020-ab12cd34", kind="sampler",
                            checkpoint_type="CHECKPOINT_TYPE_INFERENCE_ARC_V2", promotable=False,
                            name="accounts/a/rlorTrainerJobs/job-1/checkpoints/step-00020-ab12cd34")
    store.record_hotload("step-00020-ab12cd34", "dep", checkpoint_type="delta", previous_snapshot="step-00010-ab12cd34")
    e2 = store.record_evaluation("colors", snapshot="step-00020-ab12cd34", deployment_id="dep", score=0.75,
                                 prompt_hash="h", n_prompts=2, sample_count=2, job_id="job-1", step=20)
    return e1, e2


def test_which_checkpoint_produced_a_score_and_what_it_scored(tmp_path):
    store = LineageStore(tmp_path)
    e1, e2 = _fill(store)
    got = store.checkpoint_for(e2)
    assert got["checkpoint_id"] == "step-00020-ab12cd34"
    assert got["step"] == 20 and got["data_consumed"] == 160
    assert got["checkpoint_type"] == "CHECKPOINT_TYPE_INFERENCE_ARC_V2" and got["promotable"] is False
    assert got["hotloaded_at"] is not None and got["deployment_id"] == "dep"
    assert store.best("colors")["eval_id"] == e2
    assert store.best("colors", higher_is_better=False)["eval_id"] == e1
    scores = store.scores_for("step-00010")  # logical name, without the session suffix
    assert list(scores["score"]) == [0.5]
    lin = store.lineage("colors")
    assert list(lin["step"]) == [10, 20]
    assert list(lin["checkpoint"]) == ["step-00010-ab12cd34", "step-00020-ab12cd34"]
    assert list(lin["deployment"]) == ["dep", "dep"]
    samples = store.samples(e1)
    assert list(samples["completion"]) == ["blue", "x"]
    assert samples["prompt"].iloc[0] == [{"role": "user", "content": "q"}]


def test_metrics_are_buffered_then_flushed_and_survive_reopen(tmp_path):
    store = LineageStore(tmp_path)
    _fill(store)
    steps, values = store.metric_series("loss")  # pending values are visible before a flush
    assert steps == list(range(1, 21)) and values[0] == 2.0
    store.close()
    again = LineageStore(tmp_path)
    assert again.last_step("job-1") == 20
    assert again.last_data_consumed("job-1") == 160
    wide = again.metrics("job-1")
    assert {"step", "loss", "grad_norm", "data_consumed"} <= set(wide.columns) and len(wide) == 20
    ck = again.checkpoints()
    assert list(ck["last_score"]) == [0.5, 0.75]
    # re-logging a step replaces it (a rerun cell), keeping data_consumed when not given again
    again.log_step("job-1", 20, {"loss": 9.0})
    again.flush()
    assert again.metric_series("loss")[1][-1] == 9.0
    assert again.last_data_consumed("job-1") == 160
    with sqlite3.connect(tmp_path / "lineage.sqlite") as db:  # a second reader while it is open (WAL)
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 2


def test_names_and_hashes():
    assert logical_name("step-00010-ab12cd34") == "step-00010"
    assert logical_name("final") == "final"
    assert logical_name("step-1-notahex!") == "step-1-notahex!"
    a = prompt_set_hash([{"q": 1}], {"n": 1})
    assert a == prompt_set_hash([{"q": 1}], {"n": 1}) and a != prompt_set_hash([{"q": 2}], {"n": 1})
