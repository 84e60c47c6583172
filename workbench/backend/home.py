"""The workbench home directory: where a backend keeps its state, and how clients find it.

Layout of `$WORKBENCH_HOME` (default `~/.workbench`; every path is named by
`workbench.checkpoints.layout.HomeLayout`):

    server.json          {"base_url", "pid", "host", "port", "home", "started_at"} while `workbench serve` runs
    api_key              the key every endpoint requires (generated once, file mode 0600)
    state.db             SQLite: trainer jobs, deployments, promoted models, operations
    logs/                one log file per trainer / deployment process, and the control plane's own
    jobs/<job_id>/       a trainer job: job.json, checkpoints/<name>/ (DCP), sampler/<name>/ (snapshots)
    deployments/<id>/    a deployment replica: deployment.json, state.json (its last good snapshot chain)
    models/<account>/<id>/  promoted models (Hugging Face directories)
    models.json          optional catalog: base-model name -> local Hugging Face directory
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from workbench.checkpoints.layout import HomeLayout
from workbench.common import ACCOUNT_ID, write_json_atomic  # noqa: F401  (re-exported for callers of home)


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """`home` if given, else `$WORKBENCH_HOME`, else `~/.workbench` (created if missing; mode 0700)."""
    path = Path(home or os.environ.get("WORKBENCH_HOME") or Path.home() / ".workbench").expanduser().resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chmod(path, 0o700)  # it holds the API key, the state and every checkpoint: owner only
    except PermissionError:
        pass  # not ours (a shared directory given explicitly): leave its mode to its owner
    return path


def api_key_file(home: Path) -> Path:
    return HomeLayout(home).api_key_file


def ensure_api_key(home: Path) -> str:
    """Return the home's API key, generating it once (mode 0600, created with O_EXCL so two servers
    starting at once cannot end up with different keys)."""
    path = api_key_file(home)
    if not path.exists():
        key = "wb-" + secrets.token_hex(24)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
    os.chmod(path, 0o600)
    return path.read_text().strip()


def read_api_key(home: Path) -> str | None:
    path = api_key_file(home)
    return path.read_text().strip() if path.exists() else None


def server_file(home: Path) -> Path:
    return HomeLayout(home).server_file


def read_server_info(home: Path) -> dict | None:
    path = server_file(home)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
