"""The trainer's optimizer: torch.optim.AdamW without the torch._dynamo import.

    optimizer = AdamW(params, lr=1e-4)     # a torch.optim.AdamW in every respect (param_groups, state_dict, DCP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

Why: torch.optim wraps `Optimizer.add_param_group` (called by __init__), `zero_grad` and `step` in
decorators that import torch._dynamo on their first call, for graph breaks under torch.compile. That
import cost a trainer ~71 MiB of resident memory and ~3 s at its first optim_step (measured: import torch,
then torch._dynamo). The trainer never compiles, so this subclass calls the undecorated functions (which
functools.wraps keeps as `__wrapped__`) and runs `step` under no_grad, as torch's decorator does for a
non-differentiable optimizer: the same code computes the same numbers (tests/test_trainer_local_torch.py
compares it with torch.optim.AdamW). On a torch without `__wrapped__` the decorated methods stay: correct,
only heavier.
"""

from __future__ import annotations

import torch


def _undecorated(fn):
    return getattr(fn, "__wrapped__", fn)


class AdamW(torch.optim.AdamW):
    add_param_group = _undecorated(torch.optim.Optimizer.add_param_group)
    zero_grad = _undecorated(torch.optim.Optimizer.zero_grad)
    _adamw_step = _undecorated(torch.optim.AdamW.step)

    def step(self, closure=None):
        if self.defaults.get("differentiable"):     # the decorator keeps grad on for these; so do we
            return super().step(closure)
        with torch.no_grad():
            return self._adamw_step(closure)
