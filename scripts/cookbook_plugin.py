"""pytest plugin for the cookbook's e2e tests against workbench (`pytest -p cookbook_plugin`).

Two harness-side settings; the cookbook's own code is not modified:

* GSM8K: the e2e tests read their GSM8K sample from a URL (`training.tests.e2e.conftest.GSM8K_SAMPLE_URL`,
  fetched with `requests.get` by `training.utils.data.load_jsonl_dataset`). Machines without outside access
  cannot fetch it, so this plugin answers exactly that URL from the local file named by COOKBOOK_GSM8K (a
  small GSM8K-format sample shipped in scripts/cookbook_data/); every other request goes out unchanged.
* Render workers: the DPO resume tests build `dpo_loop.Config` with its default `render_workers=16`
  (`training.utils.streaming.DEFAULT_RENDER_WORKERS`, "sized to keep a 16 vCPU orchestrator pod feeding the
  trainer"), and the test cannot pass another value. Each of those 16 spawned workers imports torch,
  transformers and datasets before rendering its first row; on a 2-core machine that took more than 300 s
  before the first batch of 8 rows (measured: no batch after 300 s, every worker still inside imports).
  The plugin caps the workers `make_render_dataloader` starts at COOKBOOK_RENDER_WORKERS (default 0: the
  cookbook's own in-process path for `num_workers <= 1`). Rendering is client-side work that never reaches
  workbench; the rows, their order and what is sent are the same.
"""

from __future__ import annotations

import os
import sys
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
    _cap_render_workers(int(os.environ.get("COOKBOOK_RENDER_WORKERS", "0")))


def _cap_render_workers(cap: int) -> None:
    """Wrap `make_render_dataloader` (and the names the recipes import it under) to start at most `cap`
    workers."""
    import training.utils as utils
    import training.utils.streaming as streaming

    real = streaming.make_render_dataloader

    def capped(dataset, *args, num_workers: int = streaming.DEFAULT_RENDER_WORKERS, **kwargs):
        return real(dataset, *args, num_workers=min(num_workers, cap), **kwargs)

    streaming.make_render_dataloader = utils.make_render_dataloader = capped
    for name in ("training.recipes.dpo_loop", "training.recipes.sft_loop"):
        module = sys.modules.get(name)   # imported already: rebind its own name too
        if module is not None and getattr(module, "make_render_dataloader", None) is real:
            module.make_render_dataloader = capped


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
