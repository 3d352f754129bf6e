"""Loads the compiled extension fasttf._C and says clearly what is missing when it is not built."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from fasttf import _C
    _import_error: Exception | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _import_error = error

BUILD_HINT = "build it with `make install` (or `pip install --no-build-isolation -e .` in the repo)"


def direct(*tensors):
    """fasttf._C when a call may skip the Python checks and go straight to its pybind11 entry, else None.

    That is in eager mode (torch.compile traces the torch.ops entry instead) with every argument a
    tensor or None: the C++ op then checks devices, dtypes and shapes itself, with the messages of
    the Python checks. A call of a few hundred KiB costs ~10 us, and those checks cost 2-7 us of it
    (more when the data evicted the interpreter from the cache).
    """
    if _C is None or torch.compiler.is_compiling():
        return None
    for tensor in tensors:
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            return None
    return _C


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
