"""The extension is built and its ops are registered; without it, ops say what is missing."""

import pytest
import torch

import fasttf
from fasttf import _extension


def test_extension_is_built_and_registers_its_ops():
    assert _extension.is_available(), "fasttf._C did not import; run `make install`"
    for op in ("positional_encoding", "positional_encoding_backward", "residual_add", "residual_add_backward",
               "dropout_keep_mask", "add_layer_norm", "add_layer_norm_backward"):
        assert hasattr(torch.ops.fasttf, op), op
    assert _extension.with_cuda() == (torch.version.cuda is not None and _extension.with_cuda())


def test_missing_extension_names_the_op_and_the_fix(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_import_error", ImportError("no module named fasttf._C"))
    with pytest.raises(RuntimeError, match=r"fasttf.residual_add needs the C\+\+ extension .*make install"):
        fasttf.residual_add(torch.zeros(2), torch.zeros(2))
    for call, op in ((lambda: fasttf.positional_encoding(torch.zeros(2, 3)), "positional_encoding"),
                     (lambda: fasttf.add_layer_norm(torch.zeros(2), torch.zeros(2), None, None), "add_layer_norm")):
        with pytest.raises(RuntimeError, match=rf"fasttf.{op} needs the C\+\+ extension"):
            call()


def test_two_devices_are_refused():
    with pytest.raises(RuntimeError, match="residual is on meta"):
        fasttf.residual_add(torch.zeros(2), torch.zeros(2, device="meta"))


def test_residual_add_through_the_extension():
    x, residual = torch.randn(3, 33), torch.randn(3, 33, requires_grad=True)
    torch.testing.assert_close(fasttf.residual_add(x, residual), residual + x)
    torch.library.opcheck(torch.ops.fasttf.residual_add.default, (x, residual))


def test_pybind11_bindings_run_the_same_ops():
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    C = _extension.require("test")
    torch.testing.assert_close(C.residual_add(x, residual), residual + x)
    seed = torch.tensor(3)
    torch.testing.assert_close(C.dropout_keep_mask(x, 0.5, seed), torch.ops.fasttf.dropout_keep_mask(x, 0.5, seed))
    torch.testing.assert_close(C.positional_encoding(x, None, 1, 2.0, 1e4, True),
                               fasttf.positional_encoding(x, 1, scale=2.0))
    torch.testing.assert_close(C.add_layer_norm(x, residual, None, None, 1e-5, 0.0, None)[0],
                               fasttf.add_layer_norm(x, residual, None, None)[0])
