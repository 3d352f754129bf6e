"""The CPU kernels' hand-written x86 paths all give the answers the tests ask for: the exp and
Philox on AVX-512, on AVX2 and in plain C++. A CPU runs only its best path, so the lower ones are
forced with FASTTF_CPU_ISA (csrc/cpu/simd.h, read once per process) in a fresh process that runs the
Philox known-answer tests and the native attention kernel's tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_isa_paths_pass_the_kernel_tests(isa):
    env = dict(os.environ, FASTTF_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_philox.py"),
         str(TESTS / "test_attention_native.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
