"""The main job, `python -m fasttf.demo`, in a short run of a tiny model (in this process)."""

import re
import sys

import pytest

from fasttf import demo

from conftest import kernel_device

DEVICE = kernel_device()  # the GPU where there is one (no interpreter), else the CPU (fasttf's C++ kernels)
TINY = ["--device", DEVICE, "--d-model", "8", "--heads", "2", "--layers", "1", "--ffn", "8", "--steps", "4",
        "--batch-size", "4", "--dropout", "0.1", "--threads", "0"]


def test_a_short_demo_run_prints_translations_the_comparison_and_writes_figures(tmp_path, capsys):
    code = demo.main(TINY + ["--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert code in (0, 1)  # 1 when four steps did not teach "let's go" -> "vamos"
    assert re.search(r"step\s+4/4 loss", output), output
    assert re.search(r"let's go\s+-> ", output) and "held-out sentences translated exactly" in output
    where = "cpu (C++ kernels)" if DEVICE == "cpu" else "cuda:0"
    assert f"backend=fasttf on {where}" in output, output
    assert "training step with dropout 0.1" in output, output
    difference = float(re.search(r"largest logit difference: (\S+)", output).group(1))
    assert difference < 1e-4, output  # float32 logits of size ~1, same weights: rounding only
    assert re.search(r"training step \(median of 5, alternating\): fasttf [\d.]+ ms, torch [\d.]+ ms", output), output
    for name in ("positional_encoding.png", "attention_lets_go.png", "model.pt", "source_vocab.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "attention_lets_go.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--backend", "--d-model", "--heads", "--layers", "--steps", "--seed", "--out",
                   "--ddp", "--pre-ln"):
        assert option in text, option


@pytest.mark.parametrize("argv", [["--d-model", "10", "--heads", "3"], ["--steps", "-1"], ["--dropout", "1.5"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert "must" in capsys.readouterr().err


def test_ddp_without_torchrun_says_how_to_start_it(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert demo.main(["--ddp", "--device", "cpu"]) == 2
    assert "torchrun --nproc_per_node 2 -m fasttf.demo --ddp" in capsys.readouterr().err


def test_called_as_a_function_it_never_replaces_the_process(capsys, monkeypatch):
    """Run as a program, the demo restarts itself with TRITON_INTERPRET=1 for the Triton kernel on
    the CPU (FASTTF_CPU_ATTENTION=triton); called as demo.main(argv) after triton was imported
    without the interpreter, it says so instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTTF_CPU_ATTENTION", "triton")
    assert "triton" in sys.modules
    assert demo.main(["--device", "cpu", "--steps", "0"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
