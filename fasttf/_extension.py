"""Loads the compiled extension fasttf._C and says clearly what is missing when it is not built."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from fasttf import _C
    _import_error: Exception | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _import_error = error

BUILD_HINT = "build it with `make install` (or `pip install --no-build-isolation -e .` in the repo)"


def is_available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def require(op: str):
    """Returns the extension module, or raises naming the op and how to build the extension."""
    if _C is None:
        raise RuntimeError(f"fasttf.{op} needs the C++ extension fasttf._C, which is not built "
                           f"({_import_error}); {BUILD_HINT}")
    return _C
