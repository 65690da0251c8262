"""Build shim: ``build_ext`` runs CMake (``CMakeLists.txt`` is the build) and writes
``ahn_kernels/_C*.so``. Package metadata lives in ``pyproject.toml``.

Without a working toolchain (no C++ compiler, no CMake, no pybind11) the package
still installs, without ``ahn_kernels._C``; every op then runs its PyTorch
reference. Build switches (``AHN_CUDA``, ``AHN_CUDA_ARCHS``, ``AHN_NATIVE``,
``AHN_SANITIZE``) are environment variables read by ``CMakeLists.txt``.
"""

import hashlib
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        if os.path.exists(target):  # a failed build must not ship an earlier one
            os.remove(target)
        try:
            self._cmake(os.path.dirname(target))
        except (ImportError, OSError, subprocess.CalledProcessError) as exc:
            self._warn(f"{type(exc).__name__}: {exc}")
            return
        if not os.path.exists(target):
            self._warn(f"CMake did not write {target}")

    def _cmake(self, out_dir):
        import pybind11

        cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
        if cmake is None:
            raise OSError("cmake not found on PATH")
        # One build tree per toolchain: each isolated `pip install` brings its own cmake
        # and ninja, and a cached tree that names a deleted one fails to configure.
        key = hashlib.sha1("\0".join([cmake, ninja or "", sys.executable, pybind11.get_cmake_dir()]).encode())
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake-" + key.hexdigest()[:10])
        args = [
            f"-DAHN_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ninja:
            args += ["-G", "Ninja"]
        subprocess.run([cmake, "-S", ROOT, "-B", build_dir, *args], check=True)
        subprocess.run([cmake, "--build", build_dir, "--parallel"], check=True)

    @staticmethod
    def _warn(reason):
        bar = "!" * 78
        sys.stderr.write(
            f"\n{bar}\n ahn_kernels: the compiled extension ahn_kernels._C was NOT built.\n"
            f" Reason: {reason}\n"
            " The package installs without it: every op runs its PyTorch reference (slow).\n"
            " Install a C++17 compiler, CMake >= 3.24 and pybind11, then reinstall.\n"
            f"{bar}\n\n"
        )


# optional=True: a missing _C*.so is not an error when setuptools copies outputs around.
setup(ext_modules=[Extension("ahn_kernels._C", sources=[], optional=True)], cmdclass={"build_ext": CMakeBuild})
