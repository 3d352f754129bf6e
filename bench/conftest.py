"""fasttf's benchmark session: tiny shapes for CI, the device in the JSON, and each result's speedup
over the eager twin of its group (the implementation a user writes today), measured in the same run.

    pytest bench --benchmark-json bench/results/latest.json     # the full suite on this device
    pytest bench --tiny --benchmark-disable                      # CI: every entry runs once, tiny shapes

FASTTF_BENCH_THREADS=n sets torch's CPU threads, FASTTF_BENCH_MALLOC=default keeps glibc's malloc
thresholds (see steady_malloc), FASTTF_BENCH_BUDGET_S the seconds of timed calls
per entry, FASTTF_BENCH_INTERLEAVED_S those of fasttf's rows timed alternately with their eager
twin (harness.py; 0 turns that off). `--tiny` (or FASTTF_BENCH_TINY=1) selects the tiny shapes; it must be known before the suites are
collected, so it is turned into the environment variable here, before harness.py is imported.
"""

import os
import subprocess
import sys

import pytest

# benchmarks are a measurement, not a test of strictness: a fallback warns (once) instead of raising
os.environ.pop("FASTTF_STRICT", None)


def pytest_addoption(parser):
    parser.addoption("--tiny", action="store_true", default=False,
                     help="fasttf benchmarks: tiny shapes only (CI, with --benchmark-disable)")


def steady_malloc() -> str:
    """glibc only: serve every CPU tensor from the heap and never give it back to the system.

    By default glibc mmaps each block above a threshold that it moves as blocks are freed, so
    whether an op's fresh output costs page faults (here ~10 ms for 8 MiB, more than the op
    itself) depends on what ran before it, and every block >= 32 MiB pays them on every call. A
    fixed 1 GiB mmap and trim threshold measures the kernels on a warm allocator instead, the same
    for every implementation. FASTTF_BENCH_MALLOC=default keeps glibc's behaviour.
    """
    if os.environ.get("FASTTF_BENCH_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return "glibc defaults"
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "system defaults (no glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "glibc mallopt: mmap and trim thresholds 1 GiB (warm heap, no per-call page faults)"
    return "glibc defaults (mallopt refused)"


MALLOC = "not set"


def pytest_configure(config):
    global MALLOC
    if config.getoption("--tiny", default=False):
        os.environ["FASTTF_BENCH_TINY"] = "1"
    MALLOC = steady_malloc()
    sys.path.insert(0, os.path.dirname(__file__))
    threads = os.environ.get("FASTTF_BENCH_THREADS")
    if threads:  # e.g. 1 on a loaded shared machine, where threads wait on each other's time slices
        import torch
        torch.set_num_threads(int(threads))


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    import harness

    machine_info["fasttf"] = {
        "device": harness.DEVICE,
        "device_name": harness.device_name(),
        "torch": torch.__version__,
        "triton_interpreter": harness.interpreter_active(),
        "tiny": harness.TINY,
        "load_average_at_end": os.getloadavg(),
        "cpu_threads": torch.get_num_threads(),
        "malloc": MALLOC,
    }
    try:
        import triton
        machine_info["fasttf"]["triton"] = triton.__version__
    except ImportError:
        pass
    if harness.ON_GPU:  # clocks are not locked by the suite (that needs root): record what they were
        try:
            query = ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu",
                     "--format=csv,noheader", f"--id={torch.cuda.current_device()}"]
            machine_info["fasttf"]["gpu_clocks_at_end"] = subprocess.run(
                query, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass


SKIPPED = []  # (test id, reason) of every entry that did not run: the report lists them


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call") and "/bench/" in f"/{report.nodeid}":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SKIPPED.append({"test": report.nodeid.split("::", 1)[-1], "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from report import add_speedups

    add_speedups(output_json["benchmarks"])  # extra_info["speedup_vs_eager"], see report.py
    output_json["fasttf_skipped"] = SKIPPED
