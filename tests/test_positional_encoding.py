"""fasttf.positional_encoding (the extension's kernel) against fasttf.reference in float64 and the
eager `x * scale + pe` a user writes, forward and backward, on many shapes and every dtype."""

import math

import pytest
import torch

import fasttf
from fasttf import reference
from fasttf.testing import assert_close_to_reference
from conftest import devices

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def eager_twin(x, offset, scale, base, batch_first):
    """x * scale + a float64 table cast to x's dtype: the eager code a user writes."""
    table = reference.positional_encoding(torch.zeros(x.shape, dtype=torch.float64, device=x.device), offset,
                                          base=base, batch_first=batch_first)
    return x * scale + table.to(x.dtype)


def check_against_reference(x, offset=0, scale=1.0, base=10000.0, batch_first=True):
    x = x.detach().requires_grad_()
    y = fasttf.positional_encoding(x, offset, scale=scale, base=base, batch_first=batch_first)
    x64 = x.detach().double().requires_grad_()
    y64 = reference.positional_encoding(x64, offset, scale=scale, base=base, batch_first=batch_first)
    xe = x.detach().requires_grad_()
    ye = eager_twin(xe, offset, scale, base, batch_first)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_to_reference(y, y64, ye, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    ye.backward(dy)
    assert_close_to_reference(x.grad, x64.grad, xe.grad, "dx")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 17, 1), (1, 9, 33), (2, 40, 130)])
def test_batch_first_int_offset(device, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    check_against_reference(x, offset=0, scale=math.sqrt(shape[-1]))
    check_against_reference(x, offset=7, scale=0.5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_first_and_per_sequence_offsets(device, dtype):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 21, device=device, dtype=dtype)  # (T, N, D)
    offsets = torch.tensor([0, 5, 300], device=device)
    check_against_reference(x, offsets, scale=2.0, batch_first=False)
    check_against_reference(x, 11, batch_first=False)
    xb = torch.randn(3, 6, 21, device=device, dtype=dtype)
    check_against_reference(xb, offsets, scale=1.5, base=500.0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_dim_input_odd_dim_and_far_positions(device, dtype):
    torch.manual_seed(2)
    check_against_reference(torch.randn(13, 5, device=device, dtype=dtype), 3)
    # positions past the CPU's cached table size and a negative offset: computed directly
    check_against_reference(torch.randn(2, 3, 6, device=device, dtype=dtype), 5_000_000)
    check_against_reference(torch.randn(4, 6, device=device, dtype=dtype), -3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype, rows_that_fit", [(torch.float32, 256), (torch.float64, 128)])
def test_cached_table_and_computed_positions_give_the_same_bits(device, dtype, rows_that_fit):
    """Both ops read PE from a table cached per (D, base, compute type), at most 64 MiB, and compute
    the positions it does not hold in float64 by the same expression. D = 65536: the table holds
    `rows_that_fit` positions, so T = rows_that_fit + 4 is computed without one, and one position
    with an offset comes from a table: the two must agree bit for bit."""
    dim = 65536
    torch.manual_seed(4)
    x = torch.randn(1, rows_that_fit + 4, dim, device=device, dtype=dtype)
    computed = fasttf.positional_encoding(x, 0)
    position = rows_that_fit // 2
    from_table = fasttf.positional_encoding(x[:, position:position + 1].contiguous(), position)
    assert torch.equal(computed[:, position], from_table[:, 0])
    expected = x.double() + reference.sinusoid_table(torch.arange(rows_that_fit + 4, device=device), dim)
    assert (computed.double() - expected).abs().max().item() < (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("offset", [0, "per sequence"])
def test_cpu_runs_of_a_sequence_split_between_threads(offset):
    """The CPU op takes a sequence's consecutive positions in one call (csrc/cpu/positional_encoding.cpp);
    with 2 threads each takes 2250 of these 4500 rows, so one thread's run ends and the other's starts
    in the middle of the second sequence: every value as eager's, bit for bit."""
    torch.manual_seed(6)
    x = torch.randn(3, 1500, 8)
    offset = torch.tensor([0, 7, 300]) if offset == "per sequence" else offset
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = fasttf.positional_encoding(x, offset, scale=1.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, eager_twin(x, offset, 1.5, 10000.0, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel's multi-sequence threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gpu_thread_that_takes_several_sequences(dtype):
    """On the GPU a thread takes n_per_thread = rows * D / VEC / 2^18 sequences of one time step
    (csrc/cuda/positional_encoding.cu) and loads them kSeqBatch = 4 at a time: the small shapes above
    give it one. Here 9 sequences (batches of 4, 4, 1), 7 (3 a thread: one batch short, a chunk of
    one), sequence-first with per-sequence offsets."""
    torch.manual_seed(5)
    check_against_reference(torch.randn(9, 8192, 128, device="cuda", dtype=dtype), 3, scale=2.0)
    check_against_reference(torch.randn(7, 4096, 128, device="cuda", dtype=dtype), 0)
    offsets = torch.tensor([0, 9, 4000, 2, 70000, 1, 5], device="cuda")
    check_against_reference(torch.randn(4096, 7, 128, device="cuda", dtype=dtype), offsets, batch_first=False)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_input(device):
    torch.manual_seed(3)
    base = torch.randn(9, 4, 24, device=device)
    check_against_reference(base.transpose(0, 1), 2)  # (4, 9, 24) strided
    check_against_reference(base[:, :, ::2], torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9], device=device))


def test_matches_the_notes_table_exactly_in_float64():
    x = torch.zeros(1, 50, 16, dtype=torch.float64)
    pe = fasttf.positional_encoding(x)[0]
    position = torch.arange(50, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(8, dtype=torch.float64)
    angle = position / 10000.0 ** (2 * i / 16)
    torch.testing.assert_close(pe[:, 0::2], torch.sin(angle), rtol=0, atol=1e-13)
    torch.testing.assert_close(pe[:, 1::2], torch.cos(angle), rtol=0, atol=1e-13)


def test_gradcheck_float64():
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([3, 0])
    assert torch.autograd.gradcheck(lambda t: fasttf.positional_encoding(t, offsets, scale=1.7), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fasttf.positional_encoding(t, 2, scale=0.3), (x,))


def test_opcheck():
    x = torch.randn(2, 4, 6, requires_grad=True)
    op = torch.ops.fasttf
    torch.library.opcheck(op.positional_encoding.default, (x, None, 3, 2.0, 10000.0, True))
    torch.library.opcheck(op.positional_encoding.default, (x, torch.tensor([1, 4]), 0, 1.0, 100.0, True))
    torch.library.opcheck(op.positional_encoding.default, (x, torch.tensor([1, 4, 0, 2]), 0, 1.0, 1e4, False))
    torch.library.opcheck(op.positional_encoding_backward.default, (torch.randn(3, 5), 0.5))


@pytest.mark.parametrize("bad, error, match", [
    (dict(offset=torch.tensor([1, 2, 3])), ValueError, r"offset of shape \(N,\) = \(2,\)"),
    (dict(offset=torch.tensor([1.0, 2.0])), ValueError, "offset to be an int or an int64 tensor"),
    (dict(offset=1.5), TypeError, "offset to be an int"),
    (dict(x=torch.ones(2, 3, 4, dtype=torch.int32)), RuntimeError, "x to be float32"),
    (dict(x=torch.ones(2, 2, 3, 4)), ValueError, r"x of shape \(N, T, D\)"),
    (dict(offset=torch.tensor([1, 2], device="meta")), RuntimeError, "offset is on meta"),
])
def test_bad_input_names_the_argument(bad, error, match):
    args = dict(x=torch.ones(2, 3, 4), offset=0) | bad
    with pytest.raises(error, match=match):
        fasttf.positional_encoding(args["x"], args["offset"])


def test_cpp_checks_the_offset_tensor_too():
    with pytest.raises(ValueError, match="offset of shape"):
        torch.ops.fasttf.positional_encoding(torch.ones(2, 3, 4), torch.tensor([1]), 0, 1.0, 1e4, True)
    with pytest.raises(ValueError, match="int64"):
        torch.ops.fasttf.positional_encoding(torch.ones(2, 3, 4), torch.tensor([1, 2], dtype=torch.int32), 0, 1.0,
                                             1e4, True)
