"""Builds af2_ext._C: the CPU sources always, the CUDA sources when the installed torch has CUDA and nvcc is
found (decided by torch.version.cuda and CUDA_HOME, not by whether a GPU is visible).

Knobs (environment): AF2_EXT_FORCE_CUDA=1, AF2_EXT_SKIP_CUDA=1, AF2_EXT_CUDA_ARCHS (parsed as CMakeLists.txt
does, by tools/cuda_archs.py; it wins over an inherited TORCH_CUDA_ARCH_LIST, which is used as is otherwise;
default "80;90"; PTX is added for the newest), MAX_JOBS (parallel compile jobs, read by torch's ninja build).
"""
import glob
import os
import sys

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_archs import resolve_arch_list  # noqa: E402  (tools/ is not a package that gets installed)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(*patterns: str) -> list:
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join("csrc", "**", pattern), recursive=True)
    return sorted(set(found))


def _want_cuda() -> bool:
    if _flag("AF2_EXT_SKIP_CUDA"):
        return False
    if _flag("AF2_EXT_FORCE_CUDA"):
        return True
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp"]  # -fopenmp: at::parallel_for is inline
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = _sources("ops.cpp", "*_cpu.cpp", "*_cpu_kernel.cpp")
    if not _want_cuda():
        return cpp_extension.CppExtension("af2_ext._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    arch_list, note = resolve_arch_list(os.environ)
    if note:
        print(note)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    cuda_sources = _sources("*_cuda.cpp", "*_kernel.cu")
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension("af2_ext._C", sources + cuda_sources, include_dirs=include_dirs,
                                       extra_compile_args={"cxx": cxx_flags + ["-DAF2_EXT_WITH_CUDA"],
                                                           "nvcc": nvcc_flags},
                                       extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
