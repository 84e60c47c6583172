"""The SDK's cloud-only log text is kept from local users (`workbench/quiet.py`), and real messages are not.

The records come from the SDK's own loggers: a real `DeploymentManager.scale_to_zero` against a small HTTP
server that answers 404 (the SDK then warns with a link to the Fireworks console), and the session
heartbeat warning the SDK logs, word for word, when its backend stops answering (its 120 s threshold is
too slow to wait for here). Each check fails if `install_local_filters` installs nothing.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workbench import quiet

HOLDER = "fireworks.training.sdk._core.lib.internal_client_holder"


class _NotFound(BaseHTTPRequestHandler):
    """The account exists (the SDK resolves it first); every deployment is unknown."""

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._answer(200, b'{"accounts": [{"name": "accounts/workbench"}]}')

    def do_PATCH(self):  # noqa: N802
        self._answer(404, b'{"error": {"code": 404, "message": "deployment not found"}}')

    def log_message(self, *args):
        pass


@pytest.fixture
def not_found_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def sdk_logs(caplog, monkeypatch):
    """What reaches the handlers from the SDK's loggers, with the filters installed and no backend gone."""
    monkeypatch.setattr(quiet, "_gone", set())   # expect_backend_gone is process-wide: start from none
    quiet.install_local_filters()
    caplog.set_level(logging.INFO, logger="fireworks.training.sdk")
    return caplog


def _heartbeat_warning() -> None:
    # The SDK's text (internal_client_holder._session_heartbeat), on the SDK's logger.
    from fireworks.training.sdk._core.lib import internal_client_holder

    internal_client_holder.logger.warning(
        "Session heartbeat failed for 945.2 seconds for session s-1. Last exception: ConnectError: refused.\n"
        "Your connection may be unreliable or Tinker is down. If this persists, the session will be terminated.")


def test_console_links_are_removed_and_the_message_kept(sdk_logs, not_found_server):
    from fireworks.training.sdk import DeploymentManager

    DeploymentManager(api_key="k", base_url=not_found_server).scale_to_zero("gone-deployment")
    text = "\n".join(r.getMessage() for r in sdk_logs.records)
    assert "Failed to scale deployment gone-deployment to zero" in text   # the real message is shown
    assert "app.fireworks.ai" not in text and "Fireworks console" not in text


def test_heartbeat_warnings_are_worded_locally_then_dropped_after_a_deliberate_stop(sdk_logs):
    _heartbeat_warning()
    [record] = [r for r in sdk_logs.records if r.name == HOLDER]
    assert "Tinker is down" not in record.getMessage()
    assert "workbench backend may have stopped" in record.getMessage()

    sdk_logs.clear()
    quiet.expect_backend_gone("http://127.0.0.1:1")
    _heartbeat_warning()
    assert not [r for r in sdk_logs.records if r.name == HOLDER]
    # Other records of that logger still pass, unchanged.
    logging.getLogger(HOLDER).warning("sampling session %s created", "s-2")
    assert [r.getMessage() for r in sdk_logs.records] == ["sampling session s-2 created"]


def test_local_text_strips_the_cloud_lines_of_an_sdk_error():
    from fireworks.training.sdk.errors import CONSOLE_URL, format_sdk_error

    error = format_sdk_error("Checkpoint promotion failed", "the checkpoint is a delta",
                             f"Promote a base checkpoint. Check the Fireworks console: {CONSOLE_URL}",
                             docs_url="https://docs.fireworks.ai/fine-tuning/training-sdk/introduction",
                             show_support=True)
    text = quiet.local_text(error)
    assert "ERROR: Checkpoint promotion failed" in text and "Cause: the checkpoint is a delta" in text
    for cloud in ("fw-ai/cookbook", "discord.gg", "docs.fireworks.ai", "app.fireworks.ai"):
        assert cloud in error and cloud not in text


def test_telemetry_that_cannot_reach_the_backend_is_one_line_then_nothing(sdk_logs):
    from fireworks.training.sdk._core.lib import telemetry

    def failed_flush() -> None:   # what Telemetry._send_batch_with_retry logs when the backend is gone
        try:
            raise ConnectionError("tcp connect error: Connection refused (os error 111)")
        except ConnectionError as e:
            telemetry.logger.warning("Failed to send telemetry batch", exc_info=e)

    failed_flush()
    [record] = sdk_logs.records
    assert record.exc_info is None and "ConnectionError" in record.getMessage()
    assert "Traceback" not in sdk_logs.text

    sdk_logs.clear()
    quiet.expect_backend_gone()
    failed_flush()
    assert not sdk_logs.records
