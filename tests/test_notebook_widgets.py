"""The notebook layer against a real backend: a run's trainer + deployment through the official SDK, syncs,
evals through the deployment, and the widgets built from it (values, children, state; no browser).

One short training run is shared by the module (about a minute on 2 cores).
"""

from __future__ import annotations

import os
import signal

import pytest

from conftest import TINY

pytestmark = pytest.mark.timeout(600)
DEP = "nbw-serving"


@pytest.fixture(scope="module")
def trained(backend, tmp_path_factory):
    import workbench as wb
    from fireworks.training.sdk import AdamParams
    from workbench.notebook.data import COLORS, eval_items, sft_datums

    run = wb.open(tmp_path_factory.mktemp("runs") / "colors", home=backend.home)
    trainer = run.trainer(base_model=TINY, lora_rank=0, learning_rate=1e-3)
    deployment = run.deployment(DEP)
    client = trainer.client
    data = sft_datums(run.tokenizer, COLORS[:4])
    adam = AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    items = eval_items(COLORS[:4])
    results, snapshots = [], []
    monitor = run.monitor()
    for step in monitor.steps(6):
        fb = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
        monitor.log(step, loss=fb.metrics["loss:sum"], data_consumed=step * len(data))
        if step in (3, 6):
            snapshots.append(run.sync())
            results.append(run.evaluate(items, wb.exact_match("answer"), name="colors", max_tokens=6))
    state = run.save_state()
    yield dict(run=run, trainer=trainer, deployment=deployment, client=client, results=results,
               snapshots=snapshots, state=state, monitor=monitor, items=items, data=data, adam=adam, wb=wb)
    run.close()


def test_run_objects_are_the_sdks(trained):
    from fireworks.training.sdk import DeploymentManager, FiretitanTrainingClient, TrainerJobManager
    from workbench.sdk import TrainingClient, WeightSyncer

    run, trainer = trained["run"], trained["trainer"]
    assert isinstance(trainer.client, TrainingClient) and isinstance(trainer.sdk_client, FiretitanTrainingClient)
    assert isinstance(trainer.manager, TrainerJobManager) and isinstance(run.deployment_manager, DeploymentManager)
    assert isinstance(run.syncer(), WeightSyncer)
    info = run.info
    assert info["trainer"]["job_id"] == trainer.job_id
    assert info["deployments"][DEP]["snapshot"] == trained["snapshots"][-1]
    bundle = run._repr_mimebundle_()
    assert trainer.job_id in bundle["text/plain"] and DEP in bundle["text/html"]
    assert "STALE" not in bundle["text/plain"]


def test_checkpoint_table_rows_and_promote(trained, backend):
    run = trained["run"]
    base_snap, delta_snap = trained["snapshots"]
    table = run.checkpoints()
    by_id = {r["checkpoint_id"]: r for r in table.rows}
    assert by_id[base_snap]["type"] == "base" and by_id[base_snap]["promotable"] is True
    assert by_id[delta_snap]["type"] == "delta" and by_id[delta_snap]["promotable"] is False
    assert by_id[trained["state"]]["type"] == "train state" and by_id[trained["state"]]["kind"] == "state"
    assert by_id[base_snap]["step"] == 3 and by_id[delta_snap]["step"] == 6
    assert by_id[base_snap]["data_consumed"] == 12
    assert by_id[base_snap]["eval_score"] == pytest.approx(trained["results"][0].score)
    assert by_id[delta_snap]["hotloaded_to"] == DEP
    assert [r["checkpoint_id"] for r in table.rows][:2] == [base_snap, delta_snap]  # oldest first
    # children: the table, the promote controls, the status line
    html_table, controls, status = table.children
    assert base_snap in html_table.value and delta_snap in html_table.value
    choice, model_id, button = controls.children
    assert list(choice.options) == [base_snap]  # only promotable rows can be picked
    assert button.description == "Promote"
    bundle = table._repr_mimebundle_()
    assert {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"} <= set(bundle)
    assert "promotable" in bundle["text/plain"] and delta_snap in bundle["text/plain"]

    # an invalid id explains what to do instead, and creates nothing
    model_id.value = "Colors_V1"
    button.click()
    assert "Not promoted" in status.value and "colors-v1" in status.value
    assert table.last_model is None
    # a delta explains why not, and names the promotable one
    assert table.promote(delta_snap, "colors-delta") is None
    assert "delta" in status.value and base_snap in status.value
    assert backend.get("/v1/accounts/workbench/models/colors-delta").status_code == 404
    # the real thing
    model_id.value = "colors-v1"
    button.click()
    assert table.last_model and table.last_model["name"] == "accounts/workbench/models/colors-v1"
    assert "Promoted" in status.value
    assert backend.get("/v1/accounts/workbench/models/colors-v1").status_code == 200
    assert list(run.store.promotions()["checkpoint_id"]) == [base_snap]
    assert next(r for r in table.rows if r["checkpoint_id"] == base_snap)["promoted_to"] == "colors-v1"
    assert "colors-v1" in html_table.value


def test_eval_chart_and_lineage(trained):
    run = trained["run"]
    base_snap, delta_snap = trained["snapshots"]
    chart = run.evals("colors")
    pts = chart.points
    assert [(p["step"], p["snapshot"]) for p in pts] == [(3, base_snap), (6, delta_snap)]
    assert [p["score"] for p in pts] == [pytest.approx(r.score) for r in trained["results"]]
    title, image, table = chart.children
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and "2 points" in title.value
    assert base_snap in chart._repr_mimebundle_()["text/plain"]

    view = run.lineage("colors")
    df = view.frame
    assert list(df["checkpoint"]) == [base_snap, delta_snap]
    assert list(df["deployment"]) == [DEP, DEP] and list(df["data_consumed"]) == [12, 24]
    best = view.best
    results = trained["results"]
    want = max(results, key=lambda r: (r.score, -r.eval_id))
    assert best["eval_id"] == want.eval_id and best["checkpoint_id"] == want.snapshot
    assert run.store.checkpoint_for(results[1].eval_id)["checkpoint_id"] == delta_snap
    assert list(run.store.scores_for(base_snap)["score"]) == [pytest.approx(results[0].score)]
    summary, image, table = view.children
    assert "best colors score" in summary.value and image.value[:4] == b"\x89PNG"
    assert f"step 6 -> {delta_snap} (delta) -> {DEP} -> colors" in view.chains()[1]
    assert "best colors score" in view._repr_mimebundle_()["text/plain"]


def test_monitor_state_and_throttle(trained):
    run, monitor = trained["run"], trained["monitor"]
    header, progress, image, footer = monitor.children
    assert progress.value == 6 and progress.max == 6
    assert image.value[:4] == b"\x89PNG"
    assert trained["snapshots"][-1] in footer.value and "last eval colors" in footer.value
    assert "step 6/6" in monitor.text()
    # a tight loop of 300 logged steps redraws the curve only a few times
    fast = run.monitor(redraw_s=0.5)
    draws_before = fast.draws
    for step in fast.steps(306, start=7):
        fast.log(step, loss=1.0 / step)
    assert fast.draws - draws_before <= 6
    assert run.step == 306 and progress.max == 6  # the first monitor's bar is its own
    run.log(6, loss=run.store.metric_series("loss")[1][5])  # put the counter back for the other tests
    run.step = 6


def test_monitor_stops_cleanly_between_steps(trained):
    run = trained["run"]
    monitor = run.monitor()
    handler = signal.getsignal(signal.SIGINT)
    seen = []
    with pytest.raises(KeyboardInterrupt) as info:
        for step in monitor.steps(20, start=1):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the kernel's stop button, mid-step
            seen.append(step)
            run.log(step, probe=1.0)
    assert seen == [1, 2, 3] and monitor.stopped_at == 3  # the step in flight completed
    assert "stopped after step 3" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is handler
    assert run.store.metric_series("probe")[0] == [1, 2, 3]
    run.step = 6


def test_stale_deployment_is_explained_before_recording(trained):
    run, wb = trained["run"], trained["wb"]
    base_snap, delta_snap = trained["snapshots"]
    dep = run.deployment(DEP)
    # someone else loads an older snapshot into the deployment
    assert run.deployment_manager.hotload_and_wait(deployment_id=DEP, base_model=TINY, snapshot_identity=base_snap,
                                                   timeout_seconds=60)
    assert dep.current_snapshot() == base_snap
    n_evals = len(run.store.evaluations())
    with pytest.raises(wb.StaleDeploymentError) as info:
        run.evaluate(trained["items"], wb.exact_match("answer"), name="colors", max_tokens=6)
    text = str(info.value)
    assert f"is serving {base_snap} (step 3), not {delta_snap} (step 6)" in text and "run.sync()" in text
    assert len(run.store.evaluations()) == n_evals  # nothing recorded
    assert "STALE" in repr(run)
    with pytest.warns(UserWarning, match="is serving"):
        res = run.evaluate(trained["items"], wb.exact_match("answer"), name="colors-stale", max_tokens=6,
                           on_stale="warn")
    assert res.snapshot == base_snap and res.step == 3 and res.note
    # the next sync notices and loads a full base instead of a delta the deployment could not apply
    snap = run.sync("after-stale")
    assert dep.current_snapshot() == snap
    row = next(r for r in run.checkpoint_rows() if r["checkpoint_id"] == snap)
    assert row["type"] == "base"
    assert run.evaluate(trained["items"], wb.exact_match("answer"), name="colors", max_tokens=6).snapshot == snap


def test_dashboard_combines_everything(trained):
    run = trained["run"]
    dash = run.dashboard("colors")
    top, status, tabs = dash.children
    assert [tabs.get_title(i) for i in range(5)] == ["training", "weight syncs", "checkpoints", "evals", "lineage"]
    assert tabs.children[2] is dash.checkpoints.widget
    bundle = dash._repr_mimebundle_()
    text = bundle["text/plain"]
    for part in ("Run 'colors'", "Training monitor", "Weight syncs of colors", "Checkpoints of colors", "Eval scores",
                 "Lineage of colors"):
        assert part in text
    assert bundle["text/html"].count("<img") >= 2


def test_another_run_takes_over_the_deployment(trained, backend, tmp_path):
    """A second run opening the same deployment id re-attaches it to its own trainer; the first run then
    sees, in plain words, that the deployment no longer holds its snapshot."""
    import workbench as wb

    run, items = trained["run"], trained["items"]
    other = wb.open(tmp_path / "other", home=backend.home)
    trainer = other.trainer(base_model=TINY)
    dep = other.deployment(DEP)
    assert not dep.created
    assert other.deployment_manager.get(DEP).hot_load_trainer_job == trainer.job_name  # re-attached
    snap = other.sync("other-first")
    assert dep.current_snapshot() == snap
    assert next(r for r in other.checkpoint_rows() if r["checkpoint_id"] == snap)["type"] == "base"
    with pytest.raises(wb.StaleDeploymentError, match="something else hot-loaded it since"):
        run.evaluate(items, wb.exact_match("answer"), name="colors", max_tokens=6)
    other.close()
    # syncing again takes it back (re-attach, then a full base load)
    back = run.sync("taken-back")
    assert run.deployment_manager.get(DEP).hot_load_trainer_job == trained["trainer"].job_name
    assert run.deployment(DEP).current_snapshot() == back
    assert run.evaluate(items, wb.exact_match("answer"), name="colors", max_tokens=6).snapshot == back


def test_sync_panel_shows_each_sync_from_the_backend(trained):
    run = trained["run"]
    base_snap, delta_snap = trained["snapshots"]
    panel = run.syncs(DEP)
    df = panel.frame
    first = df[df["snapshot"].isin([base_snap, delta_snap])]
    assert list(first["checkpoint_type"]) == ["base", "delta"] and list(first["step"]) == [3, 6]
    assert list(first["chain_length"]) == [0, 1]
    assert (first["duration_s"] > 0).all() and (first["delta_bytes"] > 0).all()  # the rows' sizeBytes
    summary, image, table = panel.children
    assert image.value[:4] == b"\x89PNG" and f"{DEP} holds" in summary.value
    assert delta_snap[:20] in table.value


def test_eval_digest_changed_prompt_set_is_a_different_eval(trained):
    run, wb, items = trained["run"], trained["wb"], trained["items"]
    from workbench.notebook.lineage import scorer_digest

    assert scorer_digest(wb.exact_match("answer")) == scorer_digest(wb.exact_match("answer"))
    assert scorer_digest(wb.exact_match("answer")) != scorer_digest(wb.exact_match("label"))
    run.sync("digest-check")
    same = run.evaluate(items, wb.exact_match("answer"), name="digest", max_tokens=6)
    again = run.evaluate(items, wb.exact_match("answer"), name="digest", max_tokens=6)
    fewer = run.evaluate(items[:2], wb.exact_match("answer"), name="digest", max_tokens=6)
    other_scorer = run.evaluate(items, wb.contains("answer"), name="digest", max_tokens=6)
    assert same.digest == again.digest
    assert len({same.digest, fewer.digest, other_scorer.digest}) == 3
    assert run.store.eval_digests("digest") == [same.digest, fewer.digest, other_scorer.digest]
    assert "different eval sets" in (other_scorer.note or "")
    chart = run.evals("digest")
    assert len(chart.series()) == 3 and "more than one eval set" in chart.text()
    # the best of "digest" is chosen among the newest eval set only
    assert run.store.best("digest")["eval_id"] == other_scorer.eval_id


def test_aliases_move_with_history(trained, backend):
    run = trained["run"]
    base_snap = trained["snapshots"][0]
    first = run.promote(base_snap, output_model_id="nbw-alias-1", alias="champion")
    run.promote(base_snap, output_model_id="nbw-alias-2", alias="candidate")
    aliases = run.aliases()
    assert aliases.get("champion")["model"] == first["name"]
    second = run.promote(base_snap, output_model_id="nbw-alias-3", alias="champion")
    assert aliases.get("champion")["model"] == second["name"]
    hist = aliases.history("champion")
    assert list(hist["model"]) == [first["name"], second["name"]]
    assert set(aliases.current()) == {"champion", "candidate"}
    with pytest.raises(ValueError, match="not valid"):
        run.promote(base_snap, output_model_id="nbw-alias-4", alias="Bad Alias")
    assert backend.get("/v1/accounts/workbench/models/nbw-alias-4").status_code == 404


def test_fork_starts_from_the_checkpoints_weights(trained, backend):
    """Last in the module: it loads train state into the parent to read the checkpoint's weights."""
    import workbench as wb

    run, data, state = trained["run"], trained["data"], trained["state"]
    child = run.fork("colors-fork", from_checkpoint=state)
    assert child.record.parent.checkpoint == state and child.record.parent.run == str(run.path.resolve())
    assert child.step == 6 and child.job_id != run.job_id
    assert child.record.trainer.init_checkpoint == state
    fork_loss = child.trainer().client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    run.load_state(state)
    parent_loss = trained["client"].forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert fork_loss == parent_loss  # the fork's first weights are the checkpoint's, bit for bit
    # opening the fork again gives the same fork (nothing created twice)
    again = run.fork("colors-fork", from_checkpoint=state)
    assert again.job_id == child.job_id
    tree = wb.runs(run.path.parent)
    order = [(d, r["run"]) for d, r in tree.tree()]
    assert (0, "colors") in order and (1, "colors-fork") in order
    assert order.index((1, "colors-fork")) > order.index((0, "colors"))
    assert "└─ colors-fork" in tree.text()
    chart = wb.compare([run, child], eval="colors")
    assert chart.points > 0 and "colors-fork" in chart.excluded
    child.trainer_manager.delete(child.job_id)
    child.close()
