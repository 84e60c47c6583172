"""The lineage store: every number a run shows traces back to a step, a checkpoint and a snapshot.

One SQLite file per run directory (`<run_dir>/lineage.sqlite`), written by the notebook layer as the run
goes, read by the widgets and by you:

    store = LineageStore("runs/colors-sft")
    store.log_step("job-1", 10, {"loss": 0.31}, data_consumed=80)
    store.record_checkpoint("job-1", "step-00010-ab12cd34", kind="sampler", requested_type="base", step=10)
    store.record_hotload("step-00010-ab12cd34", "colors-serving", checkpoint_type="base")
    eval_id = store.record_evaluation("colors", snapshot="step-00010-ab12cd34", deployment_id="colors-serving",
                                      score=0.75, prompt_hash="...", n_prompts=8, sample_count=8, samples=[...])
    store.checkpoint_for(eval_id)          # which checkpoint produced this score (step, type, data consumed)
    store.scores_for("step-00010-ab12cd34")   # what did this checkpoint score (a DataFrame)
    store.lineage("colors")                # step -> checkpoint -> snapshot -> deployment -> eval, one row per eval

Tables (schema version 2; a version-1 file gains the new columns when opened):

    steps(job_id, step, time, data_consumed)                   one row per logged training step
    metrics(job_id, step, name, value, time)                   long form: loss, grad_norm, ... per step
    checkpoints(job_id, checkpoint_id, name, kind, requested_type, checkpoint_type, promotable,
                step, data_consumed, created, logical_name, size_bytes)
        checkpoint_id is the control plane's id (the last segment of the row name); for a sampler snapshot
        it is also the snapshot identity a deployment reports. kind is "sampler" or "state" (DCP).
        checkpoint_type / promotable are the control plane's (authoritative), filled in once its row is seen.
    hotloads(id, snapshot, deployment_id, checkpoint_type, previous_snapshot, time, duration_s, verified,
             step, load_s, pause_s, delta_bytes, changed_fraction, chain_length)
        duration_s is the sync's wall time (save + hot-load) seen by the client; load_s / pause_s the load
        time and sampler pause the deployment reports, delta_bytes / changed_fraction / chain_length what
        the snapshot's checkpoint row says (NULL where the backend does not report them).
    evaluations(id, name, snapshot, deployment_id, job_id, step, prompt_hash, n_prompts, sample_count,
                score, time, params, eval_digest, data_consumed)
        snapshot is what the deployment reported it held while sampling (NULL: the untouched base model).
        eval_digest is the content digest of the eval set (prompts, sampling parameters, scorer): scores
        are comparable only between equal digests.
    samples(eval_id, idx, prompt, completion, score, finish_reason)
    promotions(id, checkpoint_id, job_id, model, base_model, time)
    events(id, time, kind, detail)                             reconnects, resumes, stale warnings...

Writes are committed at once except step/metric logging, which is batched (`flush()`; the notebook layer
flushes at every sync, evaluation and at the end of a monitored loop) so a tight training loop pays
microseconds per step. The file is opened in WAL mode, so a second process (a recipe, another kernel) can
read it while the run writes.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS steps(
    job_id TEXT NOT NULL, step INTEGER NOT NULL, time REAL, data_consumed INTEGER,
    PRIMARY KEY(job_id, step));
CREATE TABLE IF NOT EXISTS metrics(
    job_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL, time REAL,
    PRIMARY KEY(job_id, step, name));
CREATE TABLE IF NOT EXISTS checkpoints(
    job_id TEXT NOT NULL, checkpoint_id TEXT NOT NULL, name TEXT, kind TEXT, requested_type TEXT,
    checkpoint_type TEXT, promotable INTEGER, step INTEGER, data_consumed INTEGER, created REAL,
    logical_name TEXT, size_bytes INTEGER,
    PRIMARY KEY(job_id, checkpoint_id));
CREATE TABLE IF NOT EXISTS hotloads(
    id INTEGER PRIMARY KEY AUTOINCREMENT, snapshot TEXT, deployment_id TEXT, checkpoint_type TEXT,
    previous_snapshot TEXT, time REAL, duration_s REAL, verified INTEGER);
CREATE TABLE IF NOT EXISTS evaluations(
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, snapshot TEXT, deployment_id TEXT, job_id TEXT,
    step INTEGER, prompt_hash TEXT, n_prompts INTEGER, sample_count INTEGER, score REAL, time REAL,
    params TEXT);
CREATE TABLE IF NOT EXISTS samples(
    eval_id INTEGER NOT NULL, idx INTEGER NOT NULL, prompt TEXT, completion TEXT, score REAL,
    finish_reason TEXT, PRIMARY KEY(eval_id, idx));
CREATE TABLE IF NOT EXISTS promotions(
    id INTEGER PRIMARY KEY AUTOINCREMENT, checkpoint_id TEXT, job_id TEXT, model TEXT, base_model TEXT,
    time REAL);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL, kind TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS evaluations_snapshot ON evaluations(snapshot);

CREATE INDEX IF NOT EXISTS hotloads_snapshot ON hotloads(snapshot);
"""

_ADDED_COLUMNS = {
    "hotloads": [("step", "INTEGER"), ("load_s", "REAL"), ("pause_s", "REAL"), ("delta_bytes", "INTEGER"),
                 ("changed_fraction", "REAL"), ("chain_length", "INTEGER")],
    "evaluations": [("eval_digest", "TEXT"), ("data_consumed", "INTEGER")],
}
"""Columns of schema version 2, added in place to a version-1 file."""

_SESSION_SUFFIX_LEN = 9  # "-" + 8 hex: the SDK's per-client session suffix on sampler snapshot names


def logical_name(checkpoint_id: str) -> str:
    """`step-00010-ab12cd34` -> `step-00010` (the name asked for, without the SDK's session suffix)."""
    if len(checkpoint_id) > _SESSION_SUFFIX_LEN and checkpoint_id[-_SESSION_SUFFIX_LEN] == "-":
        tail = checkpoint_id[-8:]
        if all(c in "0123456789abcdef" for c in tail):
            return checkpoint_id[:-_SESSION_SUFFIX_LEN]
    return checkpoint_id


class LineageStore:
    """SQLite lineage of one run (see the module docstring). Thread-safe; DataFrames out."""

    FILENAME = "lineage.sqlite"

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / self.FILENAME
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():  # a version-1 file: add what version 2 records
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
            for column, kind in columns:
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._pending_steps: list[tuple] = []
        self._pending_metrics: list[tuple] = []

    # ---- writing ------------------------------------------------------------------------------
    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def log_step(self, job_id: str, step: int, metrics: dict[str, float] | None = None,
                 data_consumed: int | None = None, when: float | None = None) -> None:
        """Buffer one training step and its scalar metrics (call `flush()` to commit)."""
        now = time.time() if when is None else when
        with self._lock:
            self._pending_steps.append((job_id, int(step), now, data_consumed))
            for name, value in (metrics or {}).items():
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    continue
                self._pending_metrics.append((job_id, int(step), str(name), v, now))

    def flush(self) -> None:
        with self._lock:
            if not self._pending_steps and not self._pending_metrics:
                return
            self._db.execute("BEGIN")
            try:
                for job_id, step, now, data_consumed in self._pending_steps:
                    # a step logged again (a rerun cell) replaces the old values; data_consumed survives a
                    # later log of the same step that does not give it
                    self._db.execute(
                        "INSERT INTO steps(job_id, step, time, data_consumed) VALUES(?,?,?,?) "
                        "ON CONFLICT(job_id, step) DO UPDATE SET time=excluded.time, "
                        "data_consumed=COALESCE(excluded.data_consumed, steps.data_consumed)",
                        (job_id, step, now, data_consumed))
                self._db.executemany("INSERT OR REPLACE INTO metrics(job_id, step, name, value, time) "
                                     "VALUES(?,?,?,?,?)", self._pending_metrics)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._pending_steps.clear()
            self._pending_metrics.clear()

    def truncate_after(self, job_id: str, step: int) -> int:
        """Forget the steps of `job_id` after `step` (they were rolled back by loading earlier train state,
        and will be logged again); returns how many steps were dropped. Checkpoints and evals stay."""
        self.flush()
        with self._lock:
            n = self._db.execute("DELETE FROM steps WHERE job_id=? AND step>?", (job_id, int(step))).rowcount
            self._db.execute("DELETE FROM metrics WHERE job_id=? AND step>?", (job_id, int(step)))
        return n

    def record_checkpoint(self, job_id: str, checkpoint_id: str, *, kind: str, name: str | None = None,
                          requested_type: str | None = None, checkpoint_type: str | None = None,
                          promotable: bool | None = None, step: int | None = None,
                          data_consumed: int | None = None, created: float | None = None,
                          size_bytes: int | None = None) -> None:
        """Insert or complete a checkpoint row (fields given as None keep what is recorded)."""
        self._write(
            "INSERT INTO checkpoints(job_id, checkpoint_id, name, kind, requested_type, checkpoint_type, "
            "promotable, step, data_consumed, created, logical_name, size_bytes) VALUES(?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(job_id, checkpoint_id) DO UPDATE SET "
            "name=COALESCE(excluded.name, checkpoints.name), kind=COALESCE(excluded.kind, checkpoints.kind), "
            "requested_type=COALESCE(excluded.requested_type, checkpoints.requested_type), "
            "checkpoint_type=COALESCE(excluded.checkpoint_type, checkpoints.checkpoint_type), "
            "promotable=COALESCE(excluded.promotable, checkpoints.promotable), "
            "step=COALESCE(checkpoints.step, excluded.step), "
            "data_consumed=COALESCE(checkpoints.data_consumed, excluded.data_consumed), "
            "created=COALESCE(checkpoints.created, excluded.created), "
            "size_bytes=COALESCE(excluded.size_bytes, checkpoints.size_bytes)",
            (job_id, checkpoint_id, name, kind, requested_type, checkpoint_type,
             None if promotable is None else int(bool(promotable)), step, data_consumed,
             time.time() if created is None else created, logical_name(checkpoint_id), size_bytes))

    def record_hotload(self, snapshot: str, deployment_id: str, *, checkpoint_type: str | None = None,
                       previous_snapshot: str | None = None, duration_s: float | None = None,
                       verified: bool = True, when: float | None = None, step: int | None = None,
                       load_s: float | None = None, pause_s: float | None = None, delta_bytes: int | None = None,
                       changed_fraction: float | None = None, chain_length: int | None = None) -> int:
        cur = self._write("INSERT INTO hotloads(snapshot, deployment_id, checkpoint_type, previous_snapshot, time, "
                          "duration_s, verified, step, load_s, pause_s, delta_bytes, changed_fraction, chain_length) "
                          "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                          (snapshot, deployment_id, checkpoint_type, previous_snapshot,
                           time.time() if when is None else when, duration_s, int(verified), step, load_s, pause_s,
                           delta_bytes, changed_fraction, chain_length))
        return int(cur.lastrowid)

    def record_evaluation(self, name: str, *, snapshot: str | None, deployment_id: str, score: float,
                          prompt_hash: str, n_prompts: int, sample_count: int, job_id: str | None = None,
                          step: int | None = None, params: dict | None = None,
                          samples: Iterable[dict] = (), when: float | None = None, eval_digest: str | None = None,
                          data_consumed: int | None = None) -> int:
        """Record one evaluation and its samples (dicts: prompt, completion, score, finish_reason)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                cur = self._db.execute(
                    "INSERT INTO evaluations(name, snapshot, deployment_id, job_id, step, prompt_hash, n_prompts, "
                    "sample_count, score, time, params, eval_digest, data_consumed) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (name, snapshot, deployment_id, job_id, step, prompt_hash, n_prompts, sample_count,
                     float(score), time.time() if when is None else when, json.dumps(params or {}, sort_keys=True),
                     eval_digest or prompt_hash, data_consumed))
                eval_id = int(cur.lastrowid)
                self._db.executemany(
                    "INSERT INTO samples(eval_id, idx, prompt, completion, score, finish_reason) VALUES(?,?,?,?,?,?)",
                    [(eval_id, i, json.dumps(s.get("prompt"), ensure_ascii=False), s.get("completion"),
                      None if s.get("score") is None else float(s["score"]), s.get("finish_reason"))
                     for i, s in enumerate(samples)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return eval_id

    def record_promotion(self, checkpoint_id: str, job_id: str, model: str, base_model: str | None) -> None:
        self._write("INSERT INTO promotions(checkpoint_id, job_id, model, base_model, time) VALUES(?,?,?,?,?)",
                    (checkpoint_id, job_id, model, base_model, time.time()))

    def record_event(self, kind: str, detail: dict | str | None = None) -> None:
        text = detail if isinstance(detail, str) or detail is None else json.dumps(detail, sort_keys=True)
        self._write("INSERT INTO events(time, kind, detail) VALUES(?,?,?)", (time.time(), kind, text))

    # ---- reading ------------------------------------------------------------------------------
    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _df(self, sql: str, args: tuple = (), columns: list[str] | None = None):
        import pandas as pd

        rows = self._rows(sql, args)
        if rows:
            return pd.DataFrame(rows)
        return pd.DataFrame(columns=columns or [])

    def last_step(self, job_id: str | None = None) -> int | None:
        self.flush()
        q = "SELECT MAX(step) AS s FROM steps" + (" WHERE job_id=?" if job_id else "")
        row = self._rows(q, (job_id,) if job_id else ())
        return row[0]["s"] if row else None

    def last_data_consumed(self, job_id: str | None = None) -> int | None:
        self.flush()
        q = ("SELECT data_consumed FROM steps WHERE data_consumed IS NOT NULL" + (" AND job_id=?" if job_id else "")
             + " ORDER BY step DESC LIMIT 1")
        row = self._rows(q, (job_id,) if job_id else ())
        return row[0]["data_consumed"] if row else None

    def metric_series(self, name: str, job_id: str | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, in step order (pending, unflushed values included)."""
        with self._lock:
            q = "SELECT step, value FROM metrics WHERE name=?" + (" AND job_id=?" if job_id else "") + " ORDER BY step"
            rows = self._db.execute(q, (name, job_id) if job_id else (name,)).fetchall()
            series = {r[0]: r[1] for r in rows}
            for j, step, n, v, _ in self._pending_metrics:
                if n == name and (job_id is None or j == job_id):
                    series[step] = v
        steps = sorted(series)
        return steps, [series[s] for s in steps]

    def metric_names(self) -> list[str]:
        self.flush()
        return [r["name"] for r in self._rows("SELECT DISTINCT name FROM metrics ORDER BY name")]

    def metrics(self, job_id: str | None = None):
        """Wide DataFrame: one row per step, one column per metric (plus data_consumed)."""
        self.flush()
        import pandas as pd

        where = " WHERE job_id=?" if job_id else ""
        args = (job_id,) if job_id else ()
        steps = self._df(f"SELECT job_id, step, time, data_consumed FROM steps{where} ORDER BY step", args,
                         ["job_id", "step", "time", "data_consumed"])
        long = self._df(f"SELECT job_id, step, name, value FROM metrics{where}", args,
                        ["job_id", "step", "name", "value"])
        if long.empty:
            return steps
        wide = long.pivot_table(index=["job_id", "step"], columns="name", values="value", aggfunc="last")
        wide.columns.name = None
        wide = wide.drop(columns=[c for c in ("time", "data_consumed") if c in wide.columns]).reset_index()
        return pd.merge(steps, wide, on=["job_id", "step"], how="outer").sort_values("step").reset_index(drop=True)

    def checkpoints(self, job_id: str | None = None):
        where = " WHERE c.job_id=?" if job_id else ""
        return self._df(
            "SELECT c.*, (SELECT e.score FROM evaluations e WHERE e.snapshot=c.checkpoint_id "
            "ORDER BY e.time DESC LIMIT 1) AS last_score, "
            "(SELECT e.name FROM evaluations e WHERE e.snapshot=c.checkpoint_id "
            "ORDER BY e.time DESC LIMIT 1) AS last_eval "
            f"FROM checkpoints c{where} ORDER BY c.created", (job_id,) if job_id else (),
            ["job_id", "checkpoint_id", "name", "kind", "requested_type", "checkpoint_type", "promotable", "step",
             "data_consumed", "created", "logical_name", "size_bytes", "last_score", "last_eval"])

    def checkpoint(self, checkpoint_id: str, job_id: str | None = None) -> dict | None:
        q = "SELECT * FROM checkpoints WHERE checkpoint_id=?" + (" AND job_id=?" if job_id else "")
        rows = self._rows(q + " ORDER BY created DESC", (checkpoint_id, job_id) if job_id else (checkpoint_id,))
        return rows[0] if rows else None

    def hotloads(self, deployment_id: str | None = None):
        where = " WHERE deployment_id=?" if deployment_id else ""
        return self._df(f"SELECT * FROM hotloads{where} ORDER BY id", (deployment_id,) if deployment_id else (),
                        ["id", "snapshot", "deployment_id", "checkpoint_type", "previous_snapshot", "time",
                         "duration_s", "verified"])

    def last_hotload(self, deployment_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM hotloads WHERE deployment_id=? ORDER BY id DESC LIMIT 1", (deployment_id,))
        return rows[0] if rows else None

    def last_hotload_of(self, snapshot: str) -> dict | None:
        """The newest hot-load of `snapshot` (into any deployment)."""
        rows = self._rows("SELECT * FROM hotloads WHERE snapshot=? ORDER BY id DESC LIMIT 1", (snapshot,))
        return rows[0] if rows else None

    def latest_state(self, job_id: str) -> dict | None:
        """The newest train state (kind 'state') recorded for `job_id`."""
        rows = self._rows("SELECT * FROM checkpoints WHERE job_id=? AND kind='state' ORDER BY created DESC LIMIT 1",
                          (job_id,))
        return rows[0] if rows else None

    def syncs(self, deployment_id: str | None = None):
        """One row per hot-load with what is known about it: wall time, the deployment's load time and sampler
        pause, delta bytes, changed fraction, chain length since the last base, and the step it carried."""
        where = " WHERE deployment_id=?" if deployment_id else ""
        return self._df(f"SELECT id, time, deployment_id, snapshot, checkpoint_type, step, duration_s, load_s, pause_s, "
                        f"delta_bytes, changed_fraction, chain_length FROM hotloads{where} ORDER BY id",
                        (deployment_id,) if deployment_id else (),
                        ["id", "time", "deployment_id", "snapshot", "checkpoint_type", "step", "duration_s", "load_s",
                         "pause_s", "delta_bytes", "changed_fraction", "chain_length"])

    def eval_digests(self, name: str) -> list[str]:
        """The distinct eval sets (digests) recorded under `name`, oldest first."""
        return [r["d"] for r in self._rows("SELECT eval_digest AS d, MIN(id) AS first FROM evaluations WHERE name=? "
                                           "GROUP BY eval_digest ORDER BY first", (name,))]

    def latest_digest(self, name: str | None = None) -> str | None:
        """The eval set of the newest evaluation (named `name`)."""
        where = " WHERE name=?" if name else ""
        rows = self._rows(f"SELECT eval_digest FROM evaluations{where} ORDER BY id DESC LIMIT 1",
                          (name,) if name else ())
        return rows[0]["eval_digest"] if rows else None

    def eval_curve(self, name: str, digest: str | None = None):
        """(step, data_consumed, score, snapshot) of evaluations of `name` on one eval set (default: the newest
        one's), in step order: the curve `wb.compare` puts beside other runs'."""
        digest = digest or self.latest_digest(name)
        return self._df("SELECT e.step AS step, COALESCE(e.data_consumed, c.data_consumed) AS data_consumed, "
                        "e.score AS score, e.snapshot AS snapshot, e.eval_digest AS eval_digest "
                        "FROM evaluations e LEFT JOIN checkpoints c ON c.checkpoint_id=e.snapshot "
                        "AND (e.job_id IS NULL OR c.job_id=e.job_id) WHERE e.name=? AND e.eval_digest=? "
                        "ORDER BY e.step, e.id", (name, digest),
                        ["step", "data_consumed", "score", "snapshot", "eval_digest"])

    def evaluations(self, name: str | None = None):
        where = " WHERE name=?" if name else ""
        return self._df(f"SELECT * FROM evaluations{where} ORDER BY id", (name,) if name else (),
                        ["id", "name", "snapshot", "deployment_id", "job_id", "step", "prompt_hash", "n_prompts",
                         "sample_count", "score", "time", "params"])

    def evaluation(self, eval_id: int) -> dict | None:
        rows = self._rows("SELECT * FROM evaluations WHERE id=?", (int(eval_id),))
        return rows[0] if rows else None

    def samples(self, eval_id: int):
        df = self._df("SELECT idx, prompt, completion, score, finish_reason FROM samples WHERE eval_id=? ORDER BY idx",
                      (int(eval_id),), ["idx", "prompt", "completion", "score", "finish_reason"])
        if not df.empty:
            df["prompt"] = df["prompt"].map(lambda s: json.loads(s) if s else None)
        return df

    def promotions(self):
        return self._df("SELECT * FROM promotions ORDER BY id", (),
                        ["id", "checkpoint_id", "job_id", "model", "base_model", "time"])

    def events(self):
        return self._df("SELECT * FROM events ORDER BY id", (), ["id", "time", "kind", "detail"])

    # ---- the questions the store exists to answer ------------------------------------------------
    def checkpoint_for(self, eval_id: int) -> dict:
        """Which checkpoint produced this score: the evaluation joined with its checkpoint and hotload."""
        ev = self.evaluation(eval_id)
        if ev is None:
            raise KeyError(f"no evaluation with id {eval_id}")
        out = {"eval_id": ev["id"], "eval": ev["name"], "score": ev["score"], "sample_count": ev["sample_count"],
               "snapshot": ev["snapshot"], "deployment_id": ev["deployment_id"], "evaluated_at": ev["time"],
               "step": ev["step"], "checkpoint_id": None, "checkpoint_name": None, "checkpoint_type": None,
               "promotable": None, "data_consumed": None, "hotloaded_at": None}
        if ev["snapshot"] is None:
            out["checkpoint_id"] = "(base model)"
            return out
        ck = self.checkpoint(ev["snapshot"], ev["job_id"]) or self.checkpoint(ev["snapshot"])
        if ck:
            out.update(checkpoint_id=ck["checkpoint_id"], checkpoint_name=ck["name"],
                       checkpoint_type=ck["checkpoint_type"] or ck["requested_type"],
                       promotable=None if ck["promotable"] is None else bool(ck["promotable"]),
                       data_consumed=ck["data_consumed"], step=ck["step"] if ck["step"] is not None else ev["step"])
        hl = self._rows("SELECT time FROM hotloads WHERE snapshot=? AND deployment_id=? AND time<=? "
                        "ORDER BY time DESC LIMIT 1", (ev["snapshot"], ev["deployment_id"], ev["time"]))
        if hl:
            out["hotloaded_at"] = hl[0]["time"]
        return out

    def scores_for(self, checkpoint: str):
        """What did this checkpoint score: every evaluation of the snapshot (id, or logical name)."""
        ids = [r["checkpoint_id"] for r in self._rows(
            "SELECT checkpoint_id FROM checkpoints WHERE checkpoint_id=? OR logical_name=?", (checkpoint, checkpoint))]
        ids = ids or [checkpoint]
        marks = ",".join("?" * len(ids))
        return self._df(f"SELECT id AS eval_id, name, score, sample_count, snapshot, deployment_id, step, time, "
                        f"prompt_hash FROM evaluations WHERE snapshot IN ({marks}) ORDER BY id", tuple(ids),
                        ["eval_id", "name", "score", "sample_count", "snapshot", "deployment_id", "step", "time",
                         "prompt_hash"])

    def lineage(self, name: str | None = None):
        """One row per evaluation: step -> checkpoint -> snapshot -> deployment (hotload) -> eval score."""
        where = " WHERE e.name=?" if name else ""
        return self._df(
            "SELECT COALESCE(c.step, e.step) AS step, c.data_consumed AS data_consumed, "
            "COALESCE(e.snapshot, '(base model)') AS checkpoint, c.logical_name AS logical_name, "
            "COALESCE(c.checkpoint_type, c.requested_type) AS checkpoint_type, c.promotable AS promotable, "
            "e.snapshot AS snapshot, e.deployment_id AS deployment, "
            "(SELECT h.time FROM hotloads h WHERE h.snapshot=e.snapshot AND h.deployment_id=e.deployment_id "
            " AND h.time<=e.time ORDER BY h.time DESC LIMIT 1) AS hotloaded_at, "
            "e.name AS eval, e.score AS score, e.sample_count AS samples, e.id AS eval_id, e.time AS evaluated_at, "
            "e.prompt_hash AS prompt_hash, e.eval_digest AS eval_digest "
            "FROM evaluations e LEFT JOIN checkpoints c ON c.checkpoint_id=e.snapshot AND "
            "(e.job_id IS NULL OR c.job_id=e.job_id)" + where + " ORDER BY e.id", (name,) if name else (),
            ["step", "data_consumed", "checkpoint", "logical_name", "checkpoint_type", "promotable", "snapshot",
             "deployment", "hotloaded_at", "eval", "score", "samples", "eval_id", "evaluated_at", "prompt_hash",
             "eval_digest"])

    def best(self, name: str | None = None, higher_is_better: bool = True, digest: str | None = None) -> dict | None:
        """The best evaluation (of `name`), as `checkpoint_for` describes it; None if there is none. Only
        evaluations on one eval set compete: `digest`, else the newest evaluation's."""
        digest = digest or self.latest_digest(name)
        where = " WHERE eval_digest=?" + (" AND name=?" if name else "")
        order = "DESC" if higher_is_better else "ASC"
        rows = self._rows(f"SELECT id FROM evaluations{where} ORDER BY score {order}, id ASC LIMIT 1",
                          (digest, name) if name else (digest,))
        return self.checkpoint_for(rows[0]["id"]) if rows else None

    def close(self) -> None:
        with self._lock:
            try:
                self.flush()
            finally:
                self._db.close()

    def __repr__(self) -> str:
        return f"LineageStore({str(self.path)!r})"


def prompt_set_hash(items: list[Any], params: dict | None = None) -> str:
    """A stable hash of an evaluation's prompt set (and sampling parameters), to compare like with like."""
    import hashlib

    blob = json.dumps({"prompts": items, "params": params or {}}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scorer_digest(scorer) -> str:
    """A stable digest of a scorer: its code (bytecode, constants, names), the values its closure captured
    and its default arguments, recursively for the functions it captured. Two scorers with equal digests
    score the same way; editing the scorer (or `wb.exact_match("answer")` vs `("label")`) changes it."""
    import hashlib

    seen: set[int] = set()

    def describe(obj, depth: int = 0):
        if depth > 6 or id(obj) in seen:
            return "..."
        if isinstance(obj, (str, int, float, bool, type(None), bytes)):
            return repr(obj)
        if isinstance(obj, (list, tuple, set, frozenset)):
            items = [describe(x, depth + 1) for x in obj]
            return f"{type(obj).__name__}[{','.join(sorted(items) if isinstance(obj, (set, frozenset)) else items)}]"
        if isinstance(obj, dict):
            return "{" + ",".join(f"{describe(k, depth + 1)}:{describe(v, depth + 1)}"
                                  for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))) + "}"
        seen.add(id(obj))
        code = getattr(obj, "__code__", None)
        if code is not None:
            closure = [describe(c.cell_contents, depth + 1) for c in (getattr(obj, "__closure__", None) or ())
                       if _cell_filled(c)]
            return (f"fn({describe_code(code, depth)};closure={closure};"
                    f"defaults={describe(getattr(obj, '__defaults__', None), depth + 1)};"
                    f"kwdefaults={describe(getattr(obj, '__kwdefaults__', None), depth + 1)})")
        if hasattr(obj, "__func__"):  # a bound method: its function and its object's state
            return f"method({describe(obj.__func__, depth + 1)};{describe(getattr(obj, '__self__', None), depth + 1)})"
        if callable(obj) and hasattr(type(obj), "__call__") and hasattr(obj, "__dict__"):
            return f"obj({type(obj).__qualname__};{describe(type(obj).__call__, depth + 1)};" \
                   f"{describe(vars(obj), depth + 1)})"
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    def describe_code(code, depth):
        consts = [describe_code(c, depth + 1) if hasattr(c, "co_code") else repr(c) for c in code.co_consts]
        return f"{code.co_code.hex()}|{consts}|{code.co_names}|{code.co_varnames}"

    return hashlib.sha256(describe(scorer).encode()).hexdigest()[:16]


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def eval_digest(prompt_hash: str, scorer_hash: str) -> str:
    """The eval set's content digest: the prompt set with its sampling parameters, and the scorer."""
    import hashlib

    return hashlib.sha256(f"{prompt_hash}:{scorer_hash}".encode()).hexdigest()[:16]


# ---- aliases of promoted models -------------------------------------------------------------------------
class AliasStore:
    """Movable names for promoted models (`champion`, `candidate`, ...) shared by the runs of one folder.

        aliases = AliasStore("runs")                 # <folder>/aliases.sqlite
        aliases.move("champion", "accounts/workbench/models/colors-v2", run="runs/lr-3e-3", step=40)
        aliases.current()                            # {"champion": {...}, ...}
        aliases.history("champion")                  # every move, oldest first (a DataFrame)

    A move is one appended row, so the history is never rewritten; the current target of an alias is its
    newest row."""

    FILENAME = "aliases.sqlite"
    _NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / self.FILENAME
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS moves(id INTEGER PRIMARY KEY AUTOINCREMENT, alias TEXT NOT NULL, "
                         "model TEXT NOT NULL, run TEXT, job_id TEXT, checkpoint_id TEXT, step INTEGER, score REAL, "
                         "time REAL, note TEXT)")

    @classmethod
    def check_name(cls, alias: str) -> str:
        if not isinstance(alias, str) or not cls._NAME.match(alias):
            raise ValueError(f"alias {alias!r} is not valid: 1-40 of a-z, 0-9, '-', '_', starting with a letter "
                             "(e.g. 'champion', 'candidate')")
        return alias

    def move(self, alias: str, model: str, *, run: str | None = None, job_id: str | None = None,
             checkpoint_id: str | None = None, step: int | None = None, score: float | None = None,
             note: str | None = None) -> dict:
        """Point `alias` at `model` (appends to its history); returns the new current entry."""
        self.check_name(alias)
        self._db.execute("INSERT INTO moves(alias, model, run, job_id, checkpoint_id, step, score, time, note) "
                         "VALUES(?,?,?,?,?,?,?,?,?)", (alias, model, run, job_id, checkpoint_id, step, score,
                                                         time.time(), note))
        return self.get(alias)

    def get(self, alias: str) -> dict | None:
        row = self._db.execute("SELECT * FROM moves WHERE alias=? ORDER BY id DESC LIMIT 1", (alias,)).fetchone()
        return dict(row) if row else None

    def current(self) -> dict[str, dict]:
        rows = self._db.execute("SELECT m.* FROM moves m JOIN (SELECT alias, MAX(id) AS id FROM moves GROUP BY alias) "
                                "x ON x.id=m.id ORDER BY m.alias").fetchall()
        return {r["alias"]: dict(r) for r in rows}

    def history(self, alias: str | None = None):
        import pandas as pd

        q = "SELECT * FROM moves" + (" WHERE alias=?" if alias else "") + " ORDER BY id"
        rows = [dict(r) for r in self._db.execute(q, (alias,) if alias else ()).fetchall()]
        return pd.DataFrame(rows, columns=["id", "alias", "model", "run", "job_id", "checkpoint_id", "step", "score",
                                           "time", "note"])

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        cur = self.current()
        if not cur:
            return f"AliasStore({str(self.folder)!r}): no aliases yet"
        return "\n".join(f"{a} -> {r['model'].split('/')[-1]} (run {Path(r['run'] or '?').name}, step {r['step']})"
                         for a, r in cur.items())


def run_summary(run_dir: str | os.PathLike, eval_name: str | None = None, higher_is_better: bool = True) -> dict:
    """What `wb.runs()` shows of one run directory, read from its files only (no backend): its trainer job,
    parent (for a fork), last step and best score per eval set."""
    from workbench.records import RunRecord

    path = Path(run_dir)
    rec = RunRecord.load(path)
    out = {"run": path.name, "path": str(path), "job_id": rec.trainer.job_id if rec.trainer else
           rec.trainers.get("policy"), "parent": None, "parent_checkpoint": None, "parent_step": None,
           "last_step": None, "best_score": None, "best_snapshot": None, "best_step": None, "eval": eval_name,
           "eval_digest": None}
    if rec.parent:
        out.update(parent=Path(rec.parent.run).name, parent_checkpoint=rec.parent.checkpoint,
                   parent_step=rec.parent.step)
    if (path / LineageStore.FILENAME).exists():
        store = LineageStore(path)
        try:
            out["last_step"] = store.last_step()
            best = store.best(eval_name, higher_is_better)
            if best:
                ev = store.evaluation(best["eval_id"])
                out.update(best_score=best["score"], best_snapshot=best["checkpoint_id"], best_step=best["step"],
                           eval=ev["name"], eval_digest=ev["eval_digest"])
        finally:
            store.close()
    return out
