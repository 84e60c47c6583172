"""The control plane stays free of torch: it reads checkpoints by their files and manifests only.

Importing torch (and torch.distributed.checkpoint) there cost ~230 MiB of RSS and ~4.5 s of start-up
(bench/cold_start.py: 303.6 -> 74.0 MiB, 6.03 -> 1.47 s). This pins the reason it is gone: the
checkpoint package and its codec/format/sampler modules import torch and numpy only on first use.
numpy too: the delta codec's lookup tables were built at import, so the control plane's first trainer
create (which reads the job's delta format) imported numpy on the request path (~0.3 s at load 6).
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = """
import sys
import workbench.backend.control_plane.app
from workbench import checkpoints as ck
from workbench.checkpoints import detect, formats, sampler, delta_codec
ck.list_checkpoints, ck.DeltaError, formats.choose_job_format, sampler.snapshot_kind
heavy = sorted(m for m in ("torch", "transformers", "torch.distributed.checkpoint", "numpy") if m in sys.modules)
print(",".join(heavy))
"""


def test_control_plane_and_checkpoint_detection_do_not_import_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at control-plane start: {out.stdout.strip()}"


def test_lazy_checkpoint_names_resolve_to_the_real_objects():
    from workbench import checkpoints as ck
    from workbench.checkpoints import delta_codec, detect

    assert ck.DeltaError is delta_codec.DeltaError and ck.list_checkpoints is detect.list_checkpoints
    with pytest.raises(AttributeError):
        ck.no_such_name  # noqa: B018
