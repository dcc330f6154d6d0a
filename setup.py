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


def _pip_cuda_include_dirs(torch) -> list[str]:
    """Headers of the CUDA libraries torch's wheel depends on (``site-packages/nvidia/.../include``).

    A minimal CUDA toolkit (nvcc + cudart, as on these machines) lacks e.g. ``cusparse.h``, which
    ATen's CUDA headers include; the pip packages torch installed carry them.
    """
    root = Path(torch.__file__).resolve().parents[1] / "nvidia"
    return sorted({str(p.parent) for p in root.rglob("cusparse.h")}) if root.is_dir() else []


def _toolkit_library_dirs(cuda_home) -> list[str]:
    """``lib64`` of the CUDA toolkit, for ``-lcudart``.

    torch derives CUDA_HOME from nvcc's location; where ``nvcc`` on PATH is a wrapper or symlink
    such as ``/usr/local/bin/nvcc`` that gives ``/usr/local``, whose lib has no cudart. The first
    of CUDA_HOME, nvcc's real toolkit and ``/usr/local/cuda`` that has ``lib64/libcudart.so`` wins.
    """
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = [Path(cuda_home)] if cuda_home else []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parents[1])
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "lib64" / "libcudart.so").exists():
            return [str(home / "lib64")]
    return []


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
            include_dirs=_pip_cuda_include_dirs(torch), library_dirs=_toolkit_library_dirs(CUDA_HOME),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("kernels._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
