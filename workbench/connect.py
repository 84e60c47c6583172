"""Find the backend to talk to: an explicit URL, the Fireworks environment variables, or the local one.

    backend = connect()                      # starts or attaches to the local backend of $WORKBENCH_HOME
    backend = connect(base_url=..., api_key=...)   # any service that speaks the Fireworks wire contract
    TrainerJobManager(api_key=backend.api_key, base_url=backend.base_url)

Precedence: arguments, then `FIREWORKS_BASE_URL` / `FIREWORKS_API_KEY` when both are set, then the local
backend (started detached if it is not running). Used by the recipes and the notebook layer, so both
run unchanged against the local backend or the Fireworks service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backend:
    base_url: str
    """Root URL of the service (control plane, gateway, hot-load and inference all hang off it)."""
    api_key: str
    """Key sent as X-Api-Key / Authorization: Bearer."""
    home: Path | None = None
    """The local backend's state directory, or None for a remote service."""

    @property
    def is_local(self) -> bool:
        return self.home is not None


def connect(base_url: str | None = None, api_key: str | None = None, home: str | os.PathLike | None = None) -> Backend:
    if base_url:
        if not api_key:
            raise ValueError("api_key is required with base_url")
        return Backend(base_url.rstrip("/"), api_key)
    env_url, env_key = os.environ.get("FIREWORKS_BASE_URL"), os.environ.get("FIREWORKS_API_KEY")
    if env_url and env_key and home is None:
        return Backend(env_url.rstrip("/"), env_key)
    from workbench.backend.home import ensure_api_key, resolve_home
    from workbench.backend.server import start_detached

    from workbench.quiet import install_local_filters

    home_path = resolve_home(home)
    info = start_detached(home_path)
    install_local_filters()  # the SDK's console links and "Tinker is down" mean nothing for a local backend
    return Backend(info["base_url"], ensure_api_key(home_path), home_path)
