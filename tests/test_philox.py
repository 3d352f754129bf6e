"""The CPU dropout bits against Philox4x32-10 written out in Python (csrc/philox.h's definition):
every x86 path of csrc/cpu/dropout.cpp (AVX-512 registers where this CPU has them, else the
vectorised loops) at starts inside a block, across batches of blocks, and where a block's low
counter word wraps (element index near 2^34)."""

import pytest
import torch

from fasttf import _C

MASK32 = 0xFFFFFFFF


def philox_words(seed, block):
    """The four 32-bit words of one counter block (key = seed halves, counter = (block, 0, 0))."""
    c0, c1, c2, c3 = block & MASK32, (block >> 32) & MASK32, 0, 0
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def expected_multipliers(seed, start, n, dropout_p):
    threshold = min(int(dropout_p * 2**32), MASK32)
    scale = 1.0 / (1.0 - dropout_p)
    return torch.tensor([scale if philox_words(seed, index >> 2)[index & 3] >= threshold else 0.0
                         for index in range(start, start + n)], dtype=torch.float32)


def test_known_answer():
    # Random123's published Philox4x32-10 answer for counter 0 and key 0
    assert philox_words(0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@pytest.mark.parametrize("start", [0, 1, 3, 64, 67, 1000, 2**34 - 4 * 16 - 3, 2**34 - 5, 2**34, 2**40 + 2])
@pytest.mark.parametrize("n", [1, 5, 64, 200])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_multipliers_match_philox(start, n, dropout_p):
    seed = 0x1234_5678_9ABC_DEF0
    got = _C._dropout_multipliers(seed, start, n, dropout_p)
    torch.testing.assert_close(got, expected_multipliers(seed, start, n, dropout_p), rtol=0, atol=0)
