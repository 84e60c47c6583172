"""Build hook: ships `workbench-tinker.pth` at the top of the installed wheel (everything else is pyproject.toml).

The .pth makes `import tinker` the Fireworks SDK's native Tinker surface even when PyPI `tinker` is installed
in the same environment (see workbench/_tinker.py). Editable installs do not carry it: there the repository's
`tinker/__init__.py` is found instead, unless a PyPI `tinker` shadows it; then copy the .pth into the
environment's site-packages by hand (the README's cookbook section shows the command).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).resolve().parent / "workbench" / "workbench-tinker.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / PTH.name))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
