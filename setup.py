"""Builds fasttf and its extension fasttf._C.

The extension is built with torch.utils.cpp_extension + ninja: the C++ sources in csrc/ and
csrc/cpu/ always, the CUDA sources in csrc/cuda/ when the installed torch is a CUDA build and
nvcc is found. FASTTF_CUDA=0 forces CUDA off, FASTTF_CUDA=1 forces it on (and fails clearly
when that is impossible).
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def build_with_cuda() -> bool:
    forced = os.environ.get("FASTTF_CUDA", "").strip()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append("nvcc was not found (set CUDA_HOME)")
    if forced == "0":
        return False
    if forced == "1" and problems:
        raise RuntimeError("FASTTF_CUDA=1 asks for the CUDA kernels, but " + " and ".join(problems))
    if forced not in ("", "0", "1"):
        raise RuntimeError(f"FASTTF_CUDA must be 0 or 1, got {forced!r}")
    return not problems


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's builds: without -fopenmp it runs on one thread
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if build_with_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension(
            "fasttf._C",
            cpp_sources + cuda_sources,
            define_macros=[("FASTTF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    return CppExtension("fasttf._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    name="fasttf",
    version="0.1.0",
    description="Fused Transformer kernels for PyTorch: Triton attention, C++/CUDA positional encoding and residual add",
    python_requires=">=3.10",
    packages=["fasttf", "fasttf.integrations", "fasttf.models", "fasttf.ops", "fasttf.kernels"],
    package_dir={"fasttf": "fasttf", "fasttf.kernels": "kernels"},
    package_data={"fasttf": ["data/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.5", "triton>=3.0", "numpy"],
    extras_require={"transformers": ["transformers>=5.17,<6"]},
)
