"""The CPU kernels' x86 paths all give the answers the tests ask for: the exp and Philox on
AVX-512, on AVX2 and in plain C++, and the row passes of residual_add, add_layer_norm and
positional_encoding (csrc/cpu/row_math.cpp, norm_rows.cpp) at each vector width. A CPU runs only its best path, so
the lower ones are forced with FASTTF_CPU_ISA (csrc/cpu/simd.h, read once per process) in a fresh
process that runs the Philox known-answer tests, the native attention kernel's tests and those ops'
tests (dropout's too: its float pass multiplies in the Philox registers). Each run also streams every
elementwise call's outputs past the caches (FASTTF_CPU_STREAM_MIN_BYTES=0, csrc/cpu/row_math.h), a path
the suite's small shapes never take otherwise; "best" runs this CPU's own path so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FILES = ["test_philox.py", "test_attention_native.py", "test_residual.py", "test_dropout.py",
         "test_add_layer_norm.py", "test_positional_encoding.py"]


@pytest.mark.parametrize("isa", ["best", "avx2", "generic"])
def test_each_x86_path_streamed_passes_the_kernel_tests(isa):
    env = dict(os.environ, FASTTF_CPU_STREAM_MIN_BYTES="0")
    if isa != "best":
        env["FASTTF_CPU_ISA"] = isa
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + [str(TESTS / name) for name in FILES],
        env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
