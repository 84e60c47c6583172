"""SQLite state of the control plane: trainer jobs, deployments, promoted models, operations.

Each resource is one row holding its public JSON object (what the REST API returns) plus the few
columns the control plane queries on. Checkpoints are *not* stored here: the files under
`jobs/<job>/` are their source of truth (see `workbench.checkpoints.detect`).

    store = Store(home / "state.db")
    store.put("jobs", job_id, {"name": ..., "state": "JOB_STATE_CREATING", ...})
    job = store.get("jobs", job_id)

One connection guarded by a lock: the control plane is a single process and every query is tiny.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

TABLES = ("jobs", "deployments", "models", "operations")


class Store:
    def __init__(self, path: Path):
        self._lock = threading.Lock()
        # Owner-only from the start (sqlite gives its -wal/-shm files the database file's mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        for table in TABLES:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                " id TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)")

    def get(self, table: str, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT body FROM {table} WHERE id = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def insert(self, table: str, key: str, body: dict) -> bool:
        """Insert a new row; False if the id exists (the caller answers 409)."""
        now = time.time()
        with self._lock:
            try:
                self._db.execute(f"INSERT INTO {table} (id, body, created, updated) VALUES (?, ?, ?, ?)",
                                 (key, json.dumps(body), now, now))
            except sqlite3.IntegrityError:
                return False
        return True

    def put(self, table: str, key: str, body: dict) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                f"INSERT INTO {table} (id, body, created, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET body = excluded.body, updated = excluded.updated",
                (key, json.dumps(body), now, now))

    def update(self, table: str, key: str, **fields) -> dict | None:
        """Merge `fields` into the row's body atomically; returns the new body (None if absent)."""
        with self._lock:
            row = self._db.execute(f"SELECT body FROM {table} WHERE id = ?", (key,)).fetchone()
            if row is None:
                return None
            body = json.loads(row[0])
            body.update(fields)
            self._db.execute(f"UPDATE {table} SET body = ?, updated = ? WHERE id = ?",
                             (json.dumps(body), time.time(), key))
        return body

    def delete(self, table: str, key: str) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {table} WHERE id = ?", (key,))

    def list(self, table: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute(f"SELECT body FROM {table} ORDER BY created, id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
