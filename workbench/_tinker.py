"""What `import tinker` means wherever workbench is installed: the Fireworks SDK's own Tinker-compatible surface.

    import tinker                                   # = the SDK's native types, even with PyPI `tinker` installed
    from tinker import types                        # fireworks.training.sdk.types
    from tinker.lib._pydantic_conv import ...       # fireworks.training.sdk._core.lib._pydantic_conv
    tinker.AdamParams is fireworks.training.sdk.AdamParams    # True

The SDK vendors Tinker's layout as `fireworks.training.sdk._core` (+ `fireworks.training.sdk.types`) and calls
it "the equivalent native `tinker` name" (its TINKER_COMPATIBILITY.md); the Fireworks cookbook writes
`import tinker` and needs exactly those classes, because the SDK rejects PyPI `tinker` objects client-side
("Input should be a valid dictionary or instance of ModelInput"). The cookbook also installs
`tinker-cookbook`, which pulls PyPI `tinker` into the same environment: two distributions then own
`tinker/`, and which one a plain `import tinker` finds depends on install order and path order.

So the name is claimed by a meta-path finder instead of by a directory:
* `workbench-tinker.pth` (shipped in workbench's wheel) calls `activate()` at interpreter start, which puts
  `AliasFinder` at the front of `sys.meta_path`: `tinker` and every `tinker.X` resolve to the SDK whatever
  is installed under `site-packages/tinker/`;
* the repository's `tinker/__init__.py` (what an editable install or a source checkout on `sys.path` finds)
  calls the same `activate()` and becomes the same surface, so both routes give identical objects.
`tinker.X.Y` is the very module `fireworks.training.sdk._core.X.Y` (`tinker.types.Y`: `...sdk.types.Y`),
never a second copy, so class identity holds. Set `WORKBENCH_TINKER=pypi` to leave `tinker` to PyPI's
package (the .pth then does nothing).

The same hook registers the embedded models' Hugging Face-style names (`workbench/qwen3-tiny`) with
tinker_cookbook's model registry when that module is imported (`PostImportFinder`, see workbench/cookbook.py),
so the cookbook's renderer inference works for them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import importlib.machinery
import os
import sys
import types as _types

SDK = "fireworks.training.sdk"
CORE = "fireworks.training.sdk._core"
OPT_OUT = "WORKBENCH_TINKER"


def target_of(fullname: str) -> str | None:
    """`tinker.types.X` -> `fireworks.training.sdk.types.X`; `tinker.X` -> `fireworks.training.sdk._core.X`."""
    if fullname == "tinker":
        return None
    head, _, rest = fullname.partition(".")
    if head != "tinker":
        return None
    if rest == "types" or rest.startswith("types."):
        return f"{SDK}.{rest}"
    return f"{CORE}.{rest}"


def surface() -> dict:
    """Every name the SDK's native Tinker package exports (`_core`'s list), each the object the SDK's top
    level exports under that name where it has one (so `tinker.ServiceClient is sdk.ServiceClient`)."""
    sdk = importlib.import_module(SDK)
    core = importlib.import_module(CORE)
    names = set(getattr(core, "_EXPORTS", {})) | {"types"}
    out = {}
    for name in sorted(names):
        owner = sdk if name in getattr(sdk, "__all__", ()) else core
        out[name] = getattr(owner, name)
    return out


def populate(module: _types.ModuleType) -> None:
    """Fill `module` (the `tinker` module) with the surface and make it a package for the submodule aliases."""
    values = surface()
    module.__dict__.update(values)
    module.__all__ = sorted(values)
    if getattr(module, "__path__", None) is None:
        module.__path__ = []          # a package: `import tinker.types` asks the finders for submodules
    module.__doc__ = module.__doc__ or __doc__


class _AliasLoader(importlib.abc.Loader):
    """Loads `tinker` (populated with the surface) or makes `tinker.X.Y` the SDK's own module object."""

    def __init__(self, target: str | None):
        self.target = target

    def create_module(self, spec):
        return None                   # default module creation; exec_module decides what sys.modules holds

    def exec_module(self, module):
        if self.target is None:
            populate(module)
            return
        # The import system re-reads sys.modules after exec_module, so the SDK's module (not this empty one)
        # is what `import tinker.X` returns and what is bound as an attribute of the parent.
        sys.modules[module.__name__] = importlib.import_module(self.target)


class AliasFinder(importlib.abc.MetaPathFinder):
    """Claims `tinker` and `tinker.*` ahead of the path finders (see the module docstring)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "tinker" and not fullname.startswith("tinker."):
            return None
        dest = target_of(fullname)
        if dest is not None and importlib.util.find_spec(dest) is None:
            return None               # not part of the SDK: ModuleNotFoundError names `tinker.X` as usual
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(dest), is_package=True)


class _AfterExecLoader(importlib.abc.Loader):
    """Wraps a module's real loader and runs `after(module)` once the module has executed."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            self.after(module)
        except Exception as e:   # never break the library's import over an optional registration
            sys.stderr.write(f"workbench: registering with {module.__name__} failed: {e}\n")


def _register_workbench_renderers(module) -> None:
    from workbench.cookbook import register_renderers

    register_renderers(module)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """When `tinker_cookbook.model_info` is imported, adds the embedded models' Hugging Face-style names to
    its registry (workbench.cookbook.register_renderers), so the Fireworks cookbook infers their renderer."""

    HOOKS = {"tinker_cookbook.model_info": _register_workbench_renderers}

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        after = cls.HOOKS.get(fullname)
        if after is None:
            return None
        for finder in sys.meta_path:
            if finder is cls or finder is AliasFinder:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterExecLoader(spec.loader, after)
                return spec
        return None


def enabled() -> bool:
    return os.environ.get(OPT_OUT, "").strip().lower() not in ("pypi", "off", "0", "false")


def activate() -> None:
    """Put AliasFinder first on sys.meta_path (idempotent). Called by workbench-tinker.pth and tinker/__init__."""
    if not enabled():
        return
    for finder in (PostImportFinder, AliasFinder):
        if not any(f is finder for f in sys.meta_path):
            sys.meta_path.insert(0, finder)
