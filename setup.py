"""Builds fasttf and its extension fasttf._C.

The extension is built with torch.utils.cpp_extension + ninja: the C++ sources in csrc/ and
csrc/cpu/ always, the CUDA sources in csrc/cuda/ when the installed torch is a CUDA build and
nvcc is found. FASTTF_CUDA=0 forces CUDA off, FASTTF_CUDA=1 forces it on (and fails clearly
when that is impossible). The C++ standard (g++ and nvcc) follows the installed torch
(csrc/cxx_standard.py). The build refuses, before compiling anything, a Python or a torch outside
what fasttf is tested with (FASTTF_ALLOW_UNTESTED_TORCH=1 builds against an untested torch anyway).
"""

import glob
import importlib.util
import os
import sys

# What fasttf supports, as tested: Python 3.11 here (torch 2.11 to 2.14 all run on 3.10+); torch
# 2.11 (the GPU image's CUDA build), 2.13 (CI, CPU build: make test) and 2.14 (make compat).
PYTHON_REQUIRES = ">=3.10"
TORCH_TESTED = ((2, 11), (2, 15))  # >= first, < second
TORCH_REQUIRES = "torch>={}.{},<{}.{}".format(*TORCH_TESTED[0], *TORCH_TESTED[1])


def load_cxx_standard():
    """csrc/cxx_standard.py, the C++ standard rule, loaded by path: fasttf is not importable yet."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cxx_standard.py")
    spec = importlib.util.spec_from_file_location("fasttf_cxx_standard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cxx_standard = load_cxx_standard()


def check_versions():
    """Stops the build early, with what to do, outside the supported Python and torch versions."""
    if sys.version_info < (3, 10):
        sys.exit(f"fasttf needs Python {PYTHON_REQUIRES}; this is Python {sys.version.split()[0]} ({sys.executable})")
    try:
        import torch
    except ImportError:
        sys.exit(f"fasttf builds against the torch installed in this Python ({sys.executable}), and there is "
                 f"none: install one first (pip install '{TORCH_REQUIRES}'), then build without build isolation "
                 "(pip install --no-build-isolation -e .), as `make install` does")
    low, high = TORCH_TESTED
    if not low <= cxx_standard.torch_release(torch.__version__) < high:
        message = (f"fasttf is tested with {TORCH_REQUIRES} (2.11, 2.13, 2.14); this Python has torch "
                   f"{torch.__version__} ({os.path.dirname(torch.__file__)}). Install a tested torch, "
                   f"e.g. pip install '{TORCH_REQUIRES}', or set FASTTF_ALLOW_UNTESTED_TORCH=1 to build anyway.")
        if os.environ.get("FASTTF_ALLOW_UNTESTED_TORCH", "").strip() != "1":
            sys.exit(message)
        print("warning: " + message, file=sys.stderr)


check_versions()

import torch  # noqa: E402  (after the version check, which says what to do when torch is missing)
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


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
    std = cxx_standard.std_flag()  # g++ and nvcc alike
    cxx_flags = ["-O3", std]
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
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", std]},
            extra_link_args=link_flags,
        )
    return CppExtension("fasttf._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    name="fasttf",
    version="0.1.0",
    description="Fused Transformer kernels for PyTorch: Triton attention, C++/CUDA positional encoding and residual add",
    python_requires=PYTHON_REQUIRES,
    packages=["fasttf", "fasttf.integrations", "fasttf.models", "fasttf.ops", "fasttf.kernels"],
    package_dir={"fasttf": "fasttf", "fasttf.kernels": "kernels"},
    package_data={"fasttf": ["data/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[TORCH_REQUIRES, "triton>=3.0", "numpy"],
    extras_require={"transformers": ["transformers>=5.17,<6"]},
)
