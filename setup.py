"""Build script: CMake builds the C++ rANS core and the ``pqmim_kernels._rans`` extension, and the
integer entropy-model engine ``pqmim_kernels._intmim``.

``pip install -e .`` (or ``pip install .``) runs CMake through the ``build_ext`` command below.
No torch is needed at build time: the extension takes numpy buffers. Environment knobs:

- ``PQMIM_CMAKE_BUILD_TYPE`` (default ``Release``)
- ``PQMIM_CMAKE_ARGS``: extra arguments passed to the CMake configure step
- ``CMAKE_BUILD_PARALLEL_LEVEL``: parallel build jobs (default: number of CPUs)
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "CMake >= 3.18 is required to build pqmim_kernels._rans; install it "
                "(apt-get install cmake, or pip install cmake) and retry `pip install -e .`."
            )
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("PQMIM_CMAKE_BUILD_TYPE", "Release")
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DPQMIM_BUILD_PYTHON=ON",
            "-DPQMIM_BUILD_TESTS=OFF",
        ]
        configure += shlex.split(os.environ.get("PQMIM_CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_temp, check=True)
        subprocess.run(
            [cmake, "--build", ".", "--target", ext.target, "--config", build_type, "-j", jobs],
            cwd=build_temp,
            check=True,
        )


setup(
    ext_modules=[
        CMakeExtension("pqmim_kernels._rans", target="_rans"),
        CMakeExtension("pqmim_kernels._intmim", target="_intmim"),
    ],
    cmdclass={"build_ext": CMakeBuild},
)
