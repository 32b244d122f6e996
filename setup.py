"""Installs ``vc_quant-autoload.pth`` into site-packages next to the package (see _vc_quant_autoload.py).

Also builds the rANS codec's native kernels (see NATIVE). Everything else is in setup.cfg. The .pth
file is added to the regular wheel (build_py) and to the editable one (``pip install -e``), so both put
it where Python reads it.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "vc_quant-autoload.pth"


class BuildWithAutoload(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PTH
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(PTH, str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWithAutoload(editable_wheel):
    # the files of this directory become the editable wheel's root (where setuptools puts its own .pth)
    def _install_namespaces(self, installation_dir, pth_prefix) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, Path(installation_dir) / PTH)


# The rANS codec's kernels: a plain C library loaded with ctypes (no Python API). No -ffast-math and
# no FMA contraction, so the encoder's float arithmetic, and its bitstreams, are the same on every
# machine; -O3 lets the compiler vectorise the rotation loops.
NATIVE = Extension(
    "vc_quant.codec.rans._native",
    sources=["vc_quant/codec/rans/_native.c"],
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"],
    libraries=["m"],
)

setup(
    cmdclass={"build_py": BuildWithAutoload, "editable_wheel": EditableWithAutoload},
    ext_modules=[NATIVE],
)
