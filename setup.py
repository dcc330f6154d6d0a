"""Builds the compiled kernels (``kernels._C``) next to the pure-Python package.

``pip install -e .`` always builds the C++ CPU kernels (ATen + OpenMP). The CUDA kernels are
added when a GPU is visible and nvcc is found (``CUDA_HOME``), or when ``FORCE_CUDA=1``
(detectron2's pattern: build on a machine without a GPU), for the architectures in
``TORCH_CUDA_ARCH_LIST`` (default: the visible GPU's, or a list of current ones when forced).
``MFDETR_NO_EXT=1`` skips the extension entirely (reference implementations only).
Metadata lives in pyproject.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "kernels" / "csrc"
DEFAULT_FORCED_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob(pattern))


def _want_cuda(torch, cuda_home) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return bool(torch.cuda.is_available() and cuda_home is not None and torch.version.cuda)


def extensions():
    """The ``kernels._C`` extension (C++ always, CUDA when wanted) and its build command."""
    if os.environ.get("MFDETR_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"]  # torch adds its own -std (C++20 for torch 2.14)
    macros = []
    sources = _sources("*.cpp")
    if _want_cuda(torch, CUDA_HOME):
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_FORCED_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if archs is None:  # the visible GPUs' own architectures (what torch would pick)
            archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        macros += [("MFDETR_WITH_CUDA", None), ("MFDETR_CUDA_ARCHS", '"%s"' % archs.replace(" ", ";"))]
        ext = CUDAExtension(
            "kernels._C", sources + _sources("*.cu"), define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("kernels._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
