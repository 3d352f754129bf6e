"""The extension is built and its ops are registered; without it, ops say what is missing."""

import pytest
import torch

import fasttf
from fasttf import _extension


def test_extension_is_built_and_registers_its_ops():
    assert _extension.is_available(), "fasttf._C did not import; run `make install`"
    assert hasattr(torch.ops.fasttf, "residual_add")
    assert _extension.with_cuda() == (torch.version.cuda is not None and _extension.with_cuda())


def test_missing_extension_names_the_op_and_the_fix(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_import_error", ImportError("no module named fasttf._C"))
    with pytest.raises(RuntimeError, match=r"fasttf.residual_add needs the C\+\+ extension .*make install"):
        fasttf.residual_add(torch.zeros(2), torch.zeros(2))


def test_two_devices_are_refused():
    with pytest.raises(RuntimeError, match="residual is on meta"):
        fasttf.residual_add(torch.zeros(2), torch.zeros(2, device="meta"))


def test_residual_add_through_the_extension():
    x, residual = torch.randn(3, 33), torch.randn(3, 33, requires_grad=True)
    torch.testing.assert_close(fasttf.residual_add(x, residual), residual + x)
    torch.library.opcheck(torch.ops.fasttf.residual_add.default, (x, residual))
