"""pytest plugin for the cookbook's e2e tests against workbench (`pytest -p cookbook_plugin`).

The e2e tests read their GSM8K sample from a URL (`training.tests.e2e.conftest.GSM8K_SAMPLE_URL`, fetched
with `requests.get` by `training.utils.data.load_jsonl_dataset`). Machines without outside access cannot
fetch it, so this plugin answers exactly that URL from the local file named by COOKBOOK_GSM8K (a small
GSM8K-format sample shipped in scripts/cookbook_data/); every other request goes out unchanged. The
cookbook's own code is not modified.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GSM8K_URL_SUFFIX = "/gsm8k_sample.jsonl"


def pytest_configure(config):
    import requests

    real_get = requests.get
    local = Path(os.environ["COOKBOOK_GSM8K"])

    def get(url, *args, **kwargs):
        if isinstance(url, str) and url.startswith("http") and url.endswith(GSM8K_URL_SUFFIX):
            response = requests.models.Response()
            response.status_code = 200
            response._content = local.read_bytes()
            response.encoding = "utf-8"
            response.url = url
            return response
        return real_get(url, *args, **kwargs)

    requests.get = get
    config._cookbook_requests_get = real_get


def pytest_unconfigure(config):
    real_get = getattr(config, "_cookbook_requests_get", None)
    if real_get is not None:
        import requests

        requests.get = real_get


@pytest.fixture(autouse=True)
def _cookbook_gsm8k_file():
    """Fails clearly when the local sample is missing (rather than a confusing network error)."""
    path = os.environ.get("COOKBOOK_GSM8K")
    assert path and Path(path).is_file(), f"COOKBOOK_GSM8K must name the local GSM8K sample (got {path!r})"
