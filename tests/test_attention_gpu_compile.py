"""Every Triton attention kernel compiles for a GPU (sm_90, down to a cubin with Triton's ptxas),
on a machine without one: what the interpreter forgives (a Python int where a tensor is needed,
branches of different types, unsupported pointer arithmetic) fails here, not on the first GPU.

Written against triton 3.9's ASTSource (this CPU machine's); skipped where a GPU runs the kernels.
Runs in a subprocess without TRITON_INTERPRET (under the interpreter the kernels are not
compilable JITFunctions): `python tests/test_attention_gpu_compile.py` does the same by hand.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch

POINTERS = {"Q": None, "K": None, "V": None, "Out": None, "dOut": None, "dW": None, "dK": None, "dV": None,
            "dQ": None, "W": None, "Mask": None, "Seed": "*i64", "Lse": "*fp32", "Delta": "*fp32", "dMask": "*fp32",
            "Keep": "*u8"}
FLOATS = {"qk_scale", "scale", "dropout_p", "dropout_scale", "dw_scale"}
VARIANTS = [  # (dtype, constexprs that differ from the base)
    ("fp16", dict(MASK_KIND=2, CAUSAL=True, DROPOUT=True, HAS_DW=True, AVERAGE=True)),
    ("bf16", dict(MASK_KIND=1, CAUSAL=False, DROPOUT=False, HAS_DW=False, AVERAGE=False, EVEN_E=False)),
    ("fp32", dict(MASK_KIND=0, CAUSAL=True, DROPOUT=False, HAS_DW=True, AVERAGE=True, INPUT_PRECISION="tf32",
                  BLOCK_M=32, BLOCK_N=32)),
]


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasttf.kernels import attention_backward, attention_common, attention_forward, attention_mask_grad
    from fasttf.kernels import attention_weights

    kernels = [attention_forward._attention_fwd_kernel, attention_backward._attention_bwd_rowdot_kernel,
               attention_backward._attention_bwd_dkdv_kernel, attention_backward._attention_bwd_dq_kernel,
               attention_weights._attention_weights_kernel, attention_weights._attention_weights_delta_kernel,
               attention_mask_grad._attention_mask_grad_kernel, attention_common._dropout_keep_mask_kernel]
    base = dict(BLOCK_E=64, BLOCK_EV=64, EVEN_E=True, EVEN_EV=True, INPUT_PRECISION="ieee", EMULATE_BF16=False,
                BLOCK_M=64, BLOCK_N=64)
    for dtype, variant in VARIANTS:
        values = {**base, **variant}
        for kernel in kernels:
            jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            params = list(inspect.signature(jit.fn).parameters)
            signature, constexprs = {}, {}
            for index, name in enumerate(params):
                if name in values:
                    signature[name], constexprs[(index,)] = "constexpr", values[name]
                elif name in POINTERS:
                    signature[name] = POINTERS[name] or "*" + dtype
                else:
                    signature[name] = "fp32" if name in FLOATS else "i32"
            triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32))
            print("compiled", jit.fn.__name__, dtype, flush=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the kernel tests compile and run them for real")
def test_every_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("compiled") == 8 * len(VARIANTS)


if __name__ == "__main__":
    compile_all()
