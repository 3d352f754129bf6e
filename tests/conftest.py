"""Every test runs strict (FASTTF_STRICT=1): a fallback away from a fasttf kernel raises.

Tests that check the fallback itself turn it off with monkeypatch.delenv("FASTTF_STRICT").
Triton kernels run under the interpreter on a machine without a GPU: `make test` sets
TRITON_INTERPRET=1 before Triton is imported.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("FASTTF_STRICT", "1")


def devices():
    """The devices a kernel test runs on: the CPU always, CUDA when there is a GPU."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
