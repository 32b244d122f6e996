"""Installs ``vc_quant-autoload.pth`` into site-packages next to the package (see _vc_quant_autoload.py).

Everything else is in setup.cfg. The .pth file is added to the build (wheel or editable
wheel), so ``pip install`` and ``pip install -e`` both put it where Python reads it.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "vc_quant-autoload.pth"


class BuildWithAutoload(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PTH
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(PTH, str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithAutoload})
