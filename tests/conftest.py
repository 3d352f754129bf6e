"""Every test runs strict (FASTTF_STRICT=1): a fallback away from a fasttf kernel raises.

Tests that check the fallback itself turn it off with monkeypatch.delenv("FASTTF_STRICT").
Triton kernels run under the interpreter on a machine without a GPU: `make test` sets
TRITON_INTERPRET=1 before Triton is imported. On a machine with a GPU it leaves the interpreter
off and the kernel tests run on CUDA (float16, bfloat16, float32).
"""

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

# One kernel per test instead of the autotuner's whole list (kernels/attention.py): the suite checks
# results, not speed. Set before any test module imports fasttf.
os.environ.setdefault("FASTTF_AUTOTUNE", "0")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("FASTTF_STRICT", "1")


def devices():
    """The devices a kernel test runs on: the CPU always, CUDA when there is a GPU."""
    return ["cpu"] + (["cuda"] if GPU else [])


def run_with_seed(fn, seed_value):
    """Runs fn under torch.manual_seed(seed_value) and returns (its result, the dropout seed it drew:
    fasttf's dropout ops draw theirs first, with fasttf.ops.residual.dropout_seed)."""
    from fasttf.ops.residual import dropout_seed

    torch.manual_seed(seed_value)
    seed = dropout_seed()
    torch.manual_seed(seed_value)
    return fn(), seed


# The attention kernels that fasttf.scaled_dot_product_attention can run here, each selected for a
# test by the attention_backend fixture through FASTTF_CPU_ATTENTION (read at call time by
# fasttf.ops.attention): "triton" is the Triton kernel (CUDA, or the CPU under the interpreter),
# "native" fasttf's C++ CPU kernel (where the tests run on the CPU).
ATTENTION_BACKENDS = ["triton"] + (["native"] if not (GPU and not INTERPRET) else [])


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of fasttf's attention kernel, which still runs (strict mode makes each call the
    kernel): per call a dict of the arguments it was given, by name (query, key, value, attn_mask,
    is_causal, ...), plus length_q, length_k, heads, heads_kv (from the query's and key's shapes) and
    weights (True for attention_with_weights, the path that also returns the weights). A call of
    fasttf.MultiheadAttention's one-op inference path (fasttf::native_multi_head_attention) is recorded
    with one_op=True, the module's query, key, value (before the projections) and key_padding_mask
    (torch's convention, not yet the kernel's mask), attn_mask None."""
    import inspect

    from fasttf.ops import attention as attention_op

    calls = []
    for name, weights in (("scaled_dot_product_attention", False), ("attention_with_weights", True)):
        kernel = getattr(attention_op, name)

        def spy(*args, kernel=kernel, weights=weights, **kwargs):
            call = dict(inspect.signature(kernel).bind(*args, **kwargs).arguments)
            query, key = call["query"], call["key"]
            call.update(length_q=query.size(-2), length_k=key.size(-2), heads=query.size(-3) if query.dim() > 2 else 1,
                        heads_kv=key.size(-3) if key.dim() > 2 else 1, weights=weights)
            calls.append(call)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(attention_op, name, spy)

    one_op = attention_op.native_multi_head_attention  # fasttf.MultiheadAttention's inference call, whole

    def spy_one_op(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
                   batch_first, key_padding_mask=None, need_weights=False, average_attn_weights=True):
        length = 1 if batch_first else 0
        calls.append(dict(query=query, key=key, value=value, attn_mask=None, key_padding_mask=key_padding_mask,
                          is_causal=False, dropout_p=0.0, length_q=query.size(length), length_k=key.size(length),
                          heads=num_heads, heads_kv=num_heads, weights=need_weights, one_op=True))
        return one_op(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
                      batch_first, key_padding_mask, need_weights, average_attn_weights)

    monkeypatch.setattr(attention_op, "native_multi_head_attention", spy_one_op)
    return calls


@pytest.fixture(params=ATTENTION_BACKENDS)
def attention_backend(request, monkeypatch):
    """Runs the test once per attention kernel; returns the backend's name."""
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", request.param)
    return request.param


def kernel_device() -> str:
    """Where the Triton attention kernel runs in this session: the GPU when there is one and the
    interpreter is off (`make test` on a GPU machine), else the CPU under the interpreter."""
    return "cuda" if GPU and not INTERPRET else "cpu"


class _FactoriesOnGPU(TorchFunctionMode):
    """torch.set_default_device("cuda"), except that a tensor drawn from a CPU generator is drawn
    on the CPU and then moved: the same numbers as on a machine without a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and kwargs.get("device") is None:
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type == "cpu":
                requires_grad = kwargs.pop("requires_grad", False)
                return func(*args, **kwargs).to("cuda").requires_grad_(requires_grad)
            kwargs["device"] = "cuda"
        return func(*args, **kwargs)


# Modules whose tests build models and tensors without naming a device: on a GPU machine (no
# interpreter) their tensors and modules are made on the GPU, where fasttf's attention kernel runs.
# A test marked explicit_device is left alone: it builds on the CPU and moves to kernel_device().
ON_KERNEL_DEVICE = {"test_attention", "test_multihead_attention", "test_multihead_attention_swap", "test_models"}


def pytest_configure(config):
    config.addinivalue_line("markers", "explicit_device: the test names kernel_device() itself; no default-device "
                                       "mode (torch's fused fast paths and torch.compile see through none)")


@pytest.fixture(autouse=True)
def _default_device(request):
    if (kernel_device() == "cuda" and request.module.__name__.rsplit(".", 1)[-1] in ON_KERNEL_DEVICE
            and request.node.get_closest_marker("explicit_device") is None):
        with _FactoriesOnGPU():
            yield
    else:
        yield
