"""The notebook layer: a run session (`run.py`), its lineage store (`lineage.py`), widgets (`widgets.py`).

    import workbench as wb
    run = wb.open("runs/colors-sft")       # run.py: Run (and open_run, what wb.open calls)
    run.trainer(...); run.deployment(...)  # provision.py: Provisioning, Trainer, Deployment
    run.sync(); run.save_state()           # sync.py: WeightSync (weight sync + hot-load, resumable train state)
    run.evaluate(prompts, scorer)          # evaluation.py: Evaluation, EvalResult, the staleness check
    run.checkpoint_rows(); run.promote()   # promotion.py: Promotion (checkpoint rows, promotion, aliases)
    run.fork("new-run", from_checkpoint=)  # run.py: a new run from a train state, its parent recorded
    run.store                              # lineage.py: LineageStore (SQLite in the run directory), AliasStore
    run.checkpoints(); run.evals(); run.lineage(); run.syncs(); run.monitor(); run.dashboard()   # widgets.py
    wb.runs("runs"); wb.compare([...], eval="colors")   # compare.py: RunTree, ComparisonChart

It talks to the backend only through the official SDK and HTTP on the wire contract (plus
`workbench.connect`, `workbench.sdk` and `workbench.models.load_tokenizer`), so it works unchanged against
any service that speaks the contract. Importing this package imports nothing heavy; `workbench.open`
loads the pieces on first use (no torch in the notebook kernel unless you import it).

`Run` is built by composition: one `RunContext` (common.py: directory, clients, lineage store, the typed
run.json record from `workbench.records`, step counter, listeners) handed to four collaborators
(`Provisioning`, `WeightSync`, `Evaluation`, `Promotion`), each receiving what it needs. `display.py`
renders `repr(run)`; `common.py` also holds the two errors (`StaleDeploymentError`, `PromotionError`).

`data.py` holds the tiny chat dataset and the datum builder the tutorials use.

Tutorials and how they are tested
---------------------------------
`notebooks/01_quickstart.ipynb` .. `05_compare_and_fork.ipynb` are stored without outputs (except cells
marked `# NBVAL_CHECK_OUTPUT`, whose output a run reproduces exactly) and are executed by nbval in *lax*
mode:

    pytest notebooks --nbval-lax --nbval-current-env

Lax mode runs every cell (any exception, including a failed `assert` inside a cell, fails the test) but
compares stored outputs only for cells marked `# NBVAL_CHECK_OUTPUT`. Training on CPU, timings, job ids,
session suffixes and ports make most outputs legitimately different on every run, so the notebooks check
what matters with `assert`s in their own cells. Each notebook keeps its backend (`WORKBENCH_HOME`) and runs
in a fixed folder next to it, `tutorial-runs/<notebook>/` (git-ignored), so running its cells again after a
kernel restart reconnects to the same trainer jobs and deployments; nothing is registered to stop the
backend when a kernel exits, and only the explicit last cell stops it and removes the folder.
`tests/test_notebook_stored.py` checks that the stored notebooks carry no other outputs.
"""
