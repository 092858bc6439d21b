"""Builds af2_ext._C: the CPU sources always, the CUDA sources when the installed torch has CUDA and nvcc is
found (decided by torch.version.cuda and CUDA_HOME, not by whether a GPU is visible).

Knobs (environment): AF2_EXT_FORCE_CUDA=1, AF2_EXT_SKIP_CUDA=1, AF2_EXT_CUDA_ARCHS (default "80;90"; PTX is
added for the newest), MAX_JOBS (parallel compile jobs, read by torch's ninja build).
"""
import glob
import os

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _torch_arch_list(archs: str) -> str:
    """'80;90' or '8.0 9.0' -> '8.0;9.0+PTX' (TORCH_CUDA_ARCH_LIST form)."""
    items = [a for a in archs.replace(",", " ").replace(";", " ").split() if a]
    out = []
    for a in items:
        a = a.removeprefix("sm_").removesuffix("+PTX")
        out.append(a if "." in a else f"{a[:-1]}.{a[-1]}")
    out[-1] += "+PTX"
    return ";".join(out)


def _extension():
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp"]  # -fopenmp: at::parallel_for is inline
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = _sources("ops.cpp", "*_cpu.cpp", "*_cpu_kernel.cpp")
    if not _want_cuda():
        return cpp_extension.CppExtension("af2_ext._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _torch_arch_list(os.environ.get("AF2_EXT_CUDA_ARCHS", "80;90")))
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
