"""`import tinker`: the Fireworks SDK's native Tinker-compatible surface (see `workbench/_tinker.py`).

    import tinker
    from tinker import types
    tinker.AdamParams is fireworks.training.sdk.AdamParams     # True
    tinker.SamplingClient, tinker.StopReason, tinker.APIError  # the SDK's own classes

This file is what a source checkout or an editable install finds. An installed workbench claims the name
with `workbench-tinker.pth` instead, ahead of any PyPI `tinker` installed beside it (the Fireworks cookbook
pulls one in through `tinker-cookbook`); both routes give the same objects.
"""

import sys as _sys

from workbench import _tinker as _alias

_alias.activate()                      # `tinker.X` submodules are the SDK's own modules
_alias.populate(_sys.modules[__name__])
