"""Keep the Fireworks SDK's cloud-only text away from local users, through logging filters and message cleanup.

    from workbench.quiet import install_local_filters, expect_backend_gone, local_text
    install_local_filters()                  # connect() does this for a local backend
    expect_backend_gone(base_url)            # before a deliberate stop: its heartbeat warnings are dropped
    print(local_text(str(error)))            # an SDK error without console links / cookbook / Discord lines

The SDK is written for the hosted service: its warnings and errors point at the Fireworks console, Discord,
"clone https://github.com/fw-ai/cookbook", and its session heartbeat warns "Your connection may be
unreliable or Tinker is down" for as long as a client outlives its server. Against a local backend none
of that is actionable. Nothing here patches the SDK: `install_local_filters` adds one `logging.Filter` to
the SDK's loggers, which drops heartbeat warnings about a backend stopped on purpose, words the remaining
ones for a local backend, and removes the cloud-only lines from every other record. SDK telemetry that cannot
reach the backend is one line without a traceback (none after a deliberate stop). `local_text` does the
same to an error message the CLI or a widget is about to show.
"""

from __future__ import annotations

import logging
import re
import threading

SDK_LOGGERS = ("fireworks.training.sdk._core.lib.internal_client_holder", "fireworks.training.sdk.deployment",
               "fireworks.training.sdk.trainer", "fireworks.training.sdk.errors",
               "fireworks.training.sdk.weight_syncer", "fireworks.training.sdk.client",
               "fireworks.training.sdk.fireworks_client", "fireworks.training.sdk._core.lib.telemetry")
"""The SDK modules whose log records can carry cloud-only text (a filter on a logger sees only its own)."""

_CLOUD_LINE = re.compile(r"(Fireworks console|app\.fireworks\.ai|discord\.gg|Discord|fw-ai/cookbook|cookbook skill|"
                         r"Agent debug:|docs\.fireworks\.ai)", re.IGNORECASE)
_HEARTBEAT = re.compile(r"Session heartbeat failed|Tinker is down", re.IGNORECASE)
_TELEMETRY = re.compile(r"Failed to send telemetry batch", re.IGNORECASE)

_gone: set[str] = set()
_lock = threading.Lock()
_installed = False


def local_text(text: str) -> str:
    """`text` without its cloud-only lines (console links, Discord, cookbook hints); the rest unchanged."""
    lines = [ln for ln in str(text).splitlines() if not _CLOUD_LINE.search(ln)]
    out = "\n".join(lines).strip()
    out = re.sub(r"\s*(Check|Manage)[^.\n]*Fireworks console[^.\n]*\.?", "", out)
    return out or str(text).splitlines()[0]


def expect_backend_gone(base_url: str | None = None) -> None:
    """The backend is being stopped on purpose: from now on heartbeat warnings are noise, not news."""
    with _lock:
        _gone.add(base_url or "*")


class LocalBackendFilter(logging.Filter):
    """Drops heartbeat and telemetry warnings after a deliberate stop, rewords the others (telemetry without
    its traceback), strips cloud-only lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record we cannot format is passed on untouched
            return True
        if _HEARTBEAT.search(message):
            if _gone:
                return False
            record.msg = ("the training session's heartbeat is not answered: the workbench backend may have "
                          "stopped (`workbench status` shows what runs)")
            record.args = ()
            return True
        if _TELEMETRY.search(message):
            # The SDK's usage telemetry, flushed at exit to a backend that may be gone: one line, no traceback.
            if _gone:
                return False
            cause = record.exc_info[1] if record.exc_info else None
            record.msg = "the SDK could not send its telemetry to the workbench backend" + (
                f" ({type(cause).__name__})" if cause is not None else "")
            record.args, record.exc_info, record.exc_text = (), None, None
            return True
        if _CLOUD_LINE.search(message):
            record.msg = local_text(message)
            record.args = ()
        return True


_FILTER = LocalBackendFilter()


def install_local_filters() -> None:
    """Add the filter to the SDK's loggers (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    for name in SDK_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
