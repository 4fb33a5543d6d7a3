"""Build the kernels' extension module with the package: the metadata is in pyproject.toml.

Why: a relay installed from a wheel then loads ``jitrelay/kernels/_compiled``
at once, with no C compiler, no cache folder and no numba import at run time.
``build_py`` compiles it from the same ``@njit`` loops with numba's ``pycc``
(numba and numpy are build requirements), for the architecture's generic CPU
so the wheel runs on any machine of its platform; the wheel is therefore
platform-specific. An editable install skips it (the relay then builds the
module at run time, with a warning). A failed compile leaves the module out
with a warning, unless ``JITRELAY_REQUIRE_KERNELS=1`` (for release wheels),
where it fails the build.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py


class BinaryDistribution(Distribution):
    """The package carries a compiled module: platform-specific wheel tags."""

    def has_ext_modules(self) -> bool:
        return True


class BuildWithKernels(build_py):
    """``build_py``, then the kernel module compiled into the build folder beside the copied sources."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        build_lib = Path(self.build_lib).resolve()
        sys.path.insert(0, str(build_lib))
        try:
            from jitrelay.kernels import build
        finally:
            sys.path.remove(str(build_lib))
        started = time.perf_counter()
        print("compiling the jitrelay kernels with numba's pycc (about 10 s)", file=sys.stderr)
        try:
            built = build.build_package(build_lib / "jitrelay" / "kernels", build_lib)
        except build.Unavailable as error:
            if os.environ.get("JITRELAY_REQUIRE_KERNELS", "0") not in ("", "0"):
                raise
            print(f"warning: the kernels were not compiled ({error}); the relay will build them at run time")
            return
        print(f"compiled {built.name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        built = Path(self.build_lib) / "jitrelay" / "kernels"
        return [*super().get_outputs(include_bytecode), *map(str, built.glob("_compiled.*"))]


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildWithKernels})
