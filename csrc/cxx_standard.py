"""The C++ standard fasttf._C is compiled with, for g++ and nvcc alike: one rule, read by setup.py
(the build) and by tests/test_cuda_sources.py (nvcc alone on the .cu files).

The rule: the standard the installed torch compiles its own extensions with, and never less than
its headers demand.
- torch.utils.cpp_extension adds `-std=c++20` (g++ and nvcc) from torch 2.13 on (read in the code
  of 2.13 and 2.14; pytorch#176659 changed its default from c++17), `-std=c++17` before: the CUDA
  torch 2.11 of the GPU image builds fasttf with c++17, as it always has.
- torch's headers stop with `#error C++NN or later compatible compiler is required` under an older
  `__cplusplus` (ATen/ATen.h and torch/all.h: C++17 in 2.13, C++20 in 2.14): the standard is raised
  to that, so a torch that one day demands C++23 gets C++23 without an edit here.

Plain Python, no import of fasttf: setup.py runs before fasttf is built.
"""

import pathlib
import re

# (torch major, minor) from which torch.utils.cpp_extension's default standard applies
CPP_EXTENSION_DEFAULTS = (((2, 13), 20), ((0, 0), 17))
# The headers whose `#if __cplusplus < ...` / `#error` pair states torch's minimum
GUARDED_HEADERS = ("ATen/ATen.h", "torch/all.h", "torch/extension.h")
_GUARD = re.compile(r"__cplusplus\s*<\s*(\d{4})\d{2}L\s*\n\s*#\s*error")


def torch_release(version: str) -> tuple:
    """(major, minor) of a torch version string: '2.14.1+cu130' -> (2, 14)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(found.group(1)), int(found.group(2))


def cpp_extension_default(version: str) -> int:
    """The standard torch.utils.cpp_extension of this torch version uses when given none."""
    release = torch_release(version)
    return next(standard for since, standard in CPP_EXTENSION_DEFAULTS if release >= since)


def header_minimum(include_dirs) -> int:
    """The newest standard that torch's own headers demand (0 when they state none)."""
    years = []
    for directory in include_dirs:
        for header in GUARDED_HEADERS:
            path = pathlib.Path(directory) / header
            if path.is_file():
                years += [int(year) for year in _GUARD.findall(path.read_text(errors="replace")[:4000])]
    return max((year % 100 for year in years), default=0)  # 201703 -> 17, 202002 -> 20, 202302 -> 23


def cxx_standard() -> int:
    """The C++ standard for the installed torch: 17, 20, ..."""
    import torch
    from torch.utils.cpp_extension import include_paths

    return max(cpp_extension_default(torch.__version__), header_minimum(include_paths()))


def std_flag() -> str:
    """`-std=c++NN`, the flag g++ and nvcc both take."""
    return f"-std=c++{cxx_standard()}"


if __name__ == "__main__":
    print(std_flag())
