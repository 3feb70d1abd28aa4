"""Build the optional compiled sparse kernel (``secateurs._sparse_kernel``); everything else is in pyproject.toml.

The extension is plain C++17 against the Python C API (no torch headers, so torch is not a build requirement).
Its AVX2 and AVX-512 code is compiled for those instructions by pragmas in their own files and chosen at run
time, so the build never uses ``-march=native`` and runs on any x86-64 CPU. If it cannot be compiled (no C++
compiler, no Python headers), installation goes on without it and ``secateurs.runtime`` uses its torch path.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "secateurs/runtime/csrc"


class BuildExt(build_ext):
    """Per-compiler flags: optimise, C++17, hide symbols; MSVC gets its own spelling."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2", "/std:c++17"]
        else:
            flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno", "-pthread"]
        for ext in self.extensions:
            ext.extra_compile_args = flags + ext.extra_compile_args
            if self.compiler.compiler_type != "msvc":
                ext.extra_link_args = ["-pthread", *ext.extra_link_args]
        super().build_extensions()


kernel = Extension(
    "secateurs._sparse_kernel",
    sources=[f"{CSRC}/{name}.cpp" for name in ("module", "kernel_scalar", "kernel_avx2", "kernel_avx512", "kernel_vnni")],
    depends=[f"{CSRC}/kernel.h"],
    language="c++",
    optional=True,
)

setup(ext_modules=[kernel], cmdclass={"build_ext": BuildExt})
