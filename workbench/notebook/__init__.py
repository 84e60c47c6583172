"""The notebook layer: a run session (`run.py`), its lineage store (`lineage.py`), widgets (`widgets.py`).

    import workbench as wb
    run = wb.open("runs/colors-sft")       # run.py: Run (and open_run, what wb.open calls)
    run.trainer(...); run.deployment(...)  # provision.py: Trainer, Deployment (create / reconnect / await)
    run.sync(); run.save_state()           # sync.py: weight sync + hot-load, resumable train state
    run.evaluate(prompts, scorer)          # evaluation.py: EvalResult, the staleness check
    run.checkpoint_rows(); run.promote()   # promotion.py: checkpoint rows, promotion
    run.store                              # lineage.py: LineageStore (SQLite in the run directory)
    run.checkpoints(); run.evals(); run.lineage(); run.monitor(); run.dashboard()   # widgets.py

It talks to the backend only through the official SDK and HTTP on the wire contract (plus
`workbench.connect`, `workbench.sdk` and `workbench.models.load_tokenizer`), so it works unchanged against
any service that speaks the contract. Importing this package imports nothing heavy; `workbench.open`
loads the pieces on first use (no torch in the notebook kernel unless you import it).

`Run` is one class; its larger jobs live in the modules above and are mixed into it, and every name stays
importable from `workbench.notebook.run`. `display.py` renders `repr(run)`; `common.py` holds the two
errors (`StaleDeploymentError`, `PromotionError`) and small shared helpers.

`data.py` holds the tiny chat dataset and the datum builder the tutorials use.

Tutorials and how they are tested
---------------------------------
`notebooks/01_quickstart.ipynb` .. `04_lineage.ipynb` are stored with the outputs of a real run and are
executed by nbval in *lax* mode:

    pytest notebooks --nbval-lax --nbval-current-env

Lax mode runs every cell (any exception, including a failed `assert` inside a cell, fails the test) but
compares stored outputs only for cells marked `# NBVAL_CHECK_OUTPUT`. Training on CPU, timings, job ids,
session suffixes, ports and temp paths make most outputs legitimately different on every run, so the
notebooks check what matters with `assert`s in their own cells (checkpoint types, promotability, resume
exactness, reconnect identity) and mark the deterministic outputs (e.g. the refusal of an invalid model
id) for comparison. Each notebook sets its own `WORKBENCH_HOME` in a temporary directory, registers an
`atexit` cleanup (stop its backend, remove the directory) in case a cell fails, and cleans up in its last
cell. To refresh the stored outputs after a change:

    jupyter nbconvert --to notebook --execute --inplace notebooks/0*.ipynb
"""
