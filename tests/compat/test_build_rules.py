"""The version-dependent parts of the build: the C++ standard rule (csrc/cxx_standard.py) for the
torch versions fasttf supports, and setup.py stopping early, saying what to do, on a torch outside
the tested range or without torch (run against a stand-in torch package, in a subprocess)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_rule():
    spec = importlib.util.spec_from_file_location("fasttf_cxx_standard", ROOT / "csrc" / "cxx_standard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rule = load_rule()


@pytest.mark.parametrize("version, standard", [("2.11.0+cu128", 17), ("2.12.1", 17), ("2.13.0+cpu", 20),
                                               ("2.14.1+cu130", 20), ("3.0.0a0+git1234", 20)])
def test_cpp_extension_default_by_torch_version(version, standard):
    assert rule.cpp_extension_default(version) == standard


def test_torch_release_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="cannot read a torch version"):
        rule.torch_release("nightly")


@pytest.mark.parametrize("guard, standard", [("201703L", 17), ("202002L", 20), ("202302L", 23)])
def test_the_headers_minimum_raises_the_standard(tmp_path, guard, standard):
    (tmp_path / "ATen").mkdir()
    (tmp_path / "ATen" / "ATen.h").write_text(
        f"#pragma once\n\n#if !defined(_MSC_VER) && __cplusplus < {guard}\n"
        "#error C++ later compatible compiler is required to use ATen.\n#endif\n")
    assert rule.header_minimum([tmp_path / "missing", tmp_path]) == standard
    assert rule.header_minimum([tmp_path / "missing"]) == 0


def test_the_installed_torch_gets_at_least_what_its_headers_and_cpp_extension_use():
    from torch.utils.cpp_extension import include_paths

    standard = rule.cxx_standard()
    assert standard >= rule.header_minimum(include_paths()) and standard >= 17
    assert rule.std_flag() == f"-std=c++{standard}"
    if rule.torch_release(torch.__version__) >= (2, 14):
        assert standard >= 20  # torch 2.14's headers #error below C++20


def run_setup(tmp_path, torch_init, **env):
    """setup.py --name with a stand-in `torch` package (torch_init: its __init__.py) first on the path."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(torch_init)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), **env}
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", ["2.10.0", "2.15.0", "3.1.0"])
def test_setup_refuses_an_untested_torch_before_building(tmp_path, version):
    result = run_setup(tmp_path, f"__version__ = {version!r}\n")
    assert result.returncode != 0
    assert "fasttf is tested with torch>=2.11,<2.15" in result.stderr, result.stderr
    assert f"this Python has torch {version}" in result.stderr and "FASTTF_ALLOW_UNTESTED_TORCH=1" in result.stderr


def test_setup_builds_anyway_when_told_to(tmp_path):
    # gets past the check with a warning, then fails on the stand-in torch's missing cpp_extension
    result = run_setup(tmp_path, "__version__ = '2.15.0'\n", FASTTF_ALLOW_UNTESTED_TORCH="1")
    assert "warning: fasttf is tested with" in result.stderr
    assert "torch.utils" in result.stderr


def test_setup_without_torch_says_to_install_it_first(tmp_path):
    result = run_setup(tmp_path, "raise ImportError('no torch here')\n")
    assert result.returncode != 0
    assert "fasttf builds against the torch installed in this Python" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr, result.stderr
