"""bench/gpu_tiles.py, the tile sweep for GPU leases, run here under the Triton interpreter on a tiny
shape: every tile pinned in turn gives a row with its errors, a wrong result is reported and fails
the exit status, and the autotuner gets its list back."""

import pytest
import torch

from harness import interpreter_active

gpu_tiles = pytest.importorskip("gpu_tiles")

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_active()),
                                reason="the Triton kernels need a GPU or the interpreter")

TINY = ["--dtype", "float32", "--head-dim", "16", "--length", "32", "--tokens", "32", "--width", "32",
        "--rounds", "1", "--seconds", "0.001"]
TILES = ["16x16x4x1", "32x16x4x1"] if not torch.cuda.is_available() else ["64x64x4x2", "128x64x8x3"]


@pytest.fixture(autouse=True)
def triton_on_the_cpu(monkeypatch):
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")
    monkeypatch.setenv("FASTTF_STRICT", "1")


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_each_tile_is_checked_and_timed(kernel, capsys):
    module = gpu_tiles.KERNELS[kernel][0]
    built_in = module.configs
    assert gpu_tiles.main(TINY + ["--kernel", kernel, "--causal", "--tiles", ",".join(TILES)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x" in line[2:6]]
    assert sorted(row.split(" | ")[0][2:] for row in rows) == sorted(TILES)
    errors = [float(e) for row in rows for e in row.split(" | ")[-1].rstrip(" |").split(", ")]
    assert len(errors) == len(TILES) * (1 if kernel == "fwd" else 4)
    bound = gpu_tiles.TOLERANCE[torch.float32] if torch.cuda.is_available() else 1e-5  # tf32 dots on a GPU
    assert all(0 < error < bound for error in errors)
    assert module.configs is built_in


def test_a_wrong_result_fails_the_sweep(monkeypatch, capsys):
    monkeypatch.setitem(gpu_tiles.TOLERANCE, torch.float32, 0.0)  # float32 rounding now counts as wrong
    assert gpu_tiles.main(TINY + ["--kernel", "fwd", "--tiles", TILES[0]]) == 1
    assert "WRONG" in capsys.readouterr().out


def test_tiles_are_parsed_like_fasttf_gpu_tiles():
    with pytest.raises(ValueError, match="FASTTF_GPU_TILES"):
        gpu_tiles.main(TINY + ["--tiles", "64x64x4"])
