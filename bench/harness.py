"""How every fasttf benchmark is measured: warm-up, timing, throughput, peak memory.

    measure(benchmark, fn, group=..., impl=..., eager_twin=..., flops=..., bytes_moved=..., **params)

One call times `fn` (a closure over prepared inputs) with pytest-benchmark and writes into the
result's `extra_info` everything the report needs:

    time         pytest-benchmark's own stats (median is what the report uses)
    throughput   attention: TFLOP/s = flops / median, flops = 4·N·H·L·S·E forward, 3.5x that
                 forward+backward (the backward is 2.5x the forward), half of both when causal;
                 elementwise ops: GB/s = bytes read + written (the op's minimum I/O) / median;
                 training step: tokens/s (source + target words)
    peak memory  bytes allocated at the peak of ONE call beyond what was allocated before it
                 (the inputs): CUDA: torch.cuda.max_memory_allocated() - memory_allocated();
                 CPU: the same quantity replayed from torch.profiler's allocation events
                 (profile_memory=True), i.e. torch's CPU allocator only: memory malloc'd outside it
                 (numpy inside the Triton interpreter, oneDNN scratch) is not counted
    speedup      vs the group's eager twin, computed at the end of the session (conftest.py)
    interleaved  entries given their twin's closure (`twin=`, fasttf's rows): the twin's median over
                 this entry's, the two timed alternately in one loop (the first of each pair flips),
                 so drift of the machine between two entries' rounds (10-20% here on a shared CPU)
                 falls on both alike: extra_info["speedup_interleaved"], and "interleaved_pairs"

GPU timing: pytest-benchmark's timer is replaced, for CUDA runs, by one that calls
torch.cuda.synchronize() before reading the clock, so a round of k calls is timed from an idle
GPU to the completion of the k-th call (launches are asynchronous, so k > 1 keeps the sync cost
out of small kernels). Warm-up calls before the timing cover Triton's autotuning and compilation
(the first call of each shape) and cuDNN/cuBLAS heuristics. Clocks are not locked (that needs
root, `nvidia-smi -lgc`); the report says so.
"""

import math
import os
import statistics
import time
import warnings

import pytest
import torch

DEVICE = os.environ.get("FASTTF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE == "cuda"
TINY = os.environ.get("FASTTF_BENCH_TINY", "0") not in ("", "0")
# Seconds of timed calls per benchmark (after warm-up and calibration), and the bounds on rounds.
BUDGET_S = float(os.environ.get("FASTTF_BENCH_BUDGET_S", "0.4" if ON_GPU else "0.3"))
MIN_ROUNDS, MAX_ROUNDS = 5, 200
# On a GPU a round lasts at least this long (k calls, one sync), so the sync is a small fraction.
MIN_ROUND_S = 1e-3 if ON_GPU else 0.0
WARMUP_CALLS = 3 if ON_GPU else 0  # beyond the first call (call_or_skip) and the calibration call
# On the CPU, warm-up calls go on for this long (at most MAX_WARMUP_CALLS): glibc's heap takes ~20
# calls to settle around fresh 64 MiB outputs (each call page-faulting until then, 2.5x slower),
# and 0 warm-up calls timed positional_encoding at (8, 512, 4096) at 29 ms median against 12 ms.
WARMUP_S = 0.0 if ON_GPU else float(os.environ.get("FASTTF_BENCH_WARMUP_S", "0.5"))
MAX_WARMUP_CALLS = 50
# Interleaved speedup: seconds of alternating pairs per entry (0 turns it off), and bounds on the pairs.
INTERLEAVED_S = float(os.environ.get("FASTTF_BENCH_INTERLEAVED_S", "0.6"))
MIN_PAIRS, MAX_PAIRS = 5, 100


def interpreter_active() -> bool:
    """True when the Triton kernels run under the Triton interpreter (no speed path)."""
    try:
        from fasttf.kernels import attention as kernels
    except Exception:  # noqa: BLE001  (kernels not importable: no interpreter question)
        return False
    return bool(getattr(kernels, "INTERPRET", False))


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def synced_perf_counter() -> float:
    """time.perf_counter after the GPU has finished all queued work."""
    torch.cuda.synchronize()
    return time.perf_counter()


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def call_or_skip(fn, what: str):
    """Run fn once; an implementation that has not landed (NotImplementedError) or a torch backend
    that cannot take these inputs ("No available kernel", out of memory) skips with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
        synchronize()
        return result
    except NotImplementedError as error:
        pytest.skip(f"{what}: not implemented yet: {error}")
    except torch.OutOfMemoryError as error:
        pytest.skip(f"{what}: out of memory: {str(error).splitlines()[0]}")
    except RuntimeError as error:
        message = str(error)
        if "No available kernel" in message or "not supported" in message.lower() or "not compiled" in message:
            pytest.skip(f"{what}: unavailable here: {message.splitlines()[0][:200]}")
        raise


def peak_memory_bytes(fn) -> int:
    """Bytes allocated at the peak of one call of fn beyond those allocated before it."""
    if ON_GPU:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(allocations):  # size < 0 is a free
        live += size
        peak = max(peak, live)
    return peak


def attention_flops(batch, heads, length_q, length_k, head_dim, causal, backward):
    """4·N·H·L·S·E for the forward (two matmuls of 2·L·S·E each), x3.5 with the backward, /2 causal."""
    flops = 4.0 * batch * heads * length_q * length_k * head_dim
    if backward:
        flops *= 3.5
    return flops / 2 if causal else flops


def warm_up(fn):
    """WARMUP_CALLS calls, and on the CPU calls for WARMUP_S seconds (at most MAX_WARMUP_CALLS)."""
    warm_until, calls = time.perf_counter() + WARMUP_S, 0
    while calls < WARMUP_CALLS or (time.perf_counter() < warm_until and calls < MAX_WARMUP_CALLS):
        fn()
        calls += 1
    synchronize()


def timed(fn, iterations: int) -> float:
    """Seconds for `iterations` calls of fn, from an idle device to the last call's completion."""
    synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize()
    return time.perf_counter() - start


def interleaved_speedup(fn, twin, iterations: int, one_call: float):
    """(twin's median / fn's median, pairs): fn and its eager twin timed alternately, the first of
    each pair flipping, for INTERLEAVED_S seconds (MIN_PAIRS to MAX_PAIRS; 3 for calls of > 0.5 s).
    None where the twin cannot run here (its own row then says why: it skips)."""
    try:
        twin()
    except (NotImplementedError, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError too
        return None
    warm_up(twin)
    fn_times, twin_times = [], []
    min_pairs = MIN_PAIRS if one_call < 0.5 else 3
    stop_at = time.perf_counter() + INTERLEAVED_S
    while len(fn_times) < min_pairs or (time.perf_counter() < stop_at and len(fn_times) < MAX_PAIRS):
        if len(fn_times) % 2 == 0:
            fn_times.append(timed(fn, iterations))
            twin_times.append(timed(twin, iterations))
        else:
            twin_times.append(timed(twin, iterations))
            fn_times.append(timed(fn, iterations))
    return statistics.median(twin_times) / statistics.median(fn_times), len(fn_times)


def measure(benchmark, fn, *, group: str, impl: str, eager_twin: bool = False, flops: float | None = None,
            bytes_moved: float | None = None, twin=None, **params):
    """Time fn under pytest-benchmark in `group` and fill its extra_info (see the module docstring).

    `twin`: the group's eager twin as a closure over the same inputs, for the interleaved speedup.
    `params` (op, mode, seq_len, dtype, shape, ...) go into extra_info as they are, for the report.
    """
    benchmark.group = group
    info = benchmark.extra_info
    info.update(params)
    info.update(impl=impl, eager_twin=eager_twin, device=DEVICE)
    if flops is not None:
        info["flops"] = flops
    if bytes_moved is not None:
        info["bytes"] = bytes_moved

    if benchmark.disabled:  # CI's --benchmark-disable: one call, as a check that it still runs
        call_or_skip(lambda: benchmark.pedantic(fn, rounds=1, iterations=1), impl)
        return
    call_or_skip(fn, impl)  # the first call: compile, autotune, or skip when unavailable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning, once per process, is not a result
        warm_up(fn)
        one_call = max(timed(fn, 1), 1e-7)
        info["peak_memory_bytes"] = peak_memory_bytes(fn)
        if ON_GPU:
            torch.cuda.empty_cache()
            # pytest-benchmark reads this timer before and after each round of `iterations` calls.
            benchmark._timer = synced_perf_counter
        iterations = max(1, math.ceil(MIN_ROUND_S / one_call))
        min_rounds = MIN_ROUNDS if one_call < 0.5 else 3  # the Triton interpreter: seconds a call
        rounds = int(min(MAX_ROUNDS, max(min_rounds, BUDGET_S / (one_call * iterations))))
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
        interleaved = interleaved_speedup(fn, twin, iterations, one_call) if twin and INTERLEAVED_S > 0 else None
        if interleaved is not None:
            info["speedup_interleaved"], info["interleaved_pairs"] = interleaved

    median = benchmark.stats.stats.median
    if flops is not None:
        info["tflops"] = flops / median / 1e12
    if bytes_moved is not None:
        info["gbps"] = bytes_moved / median / 1e9
    if "tokens" in params:
        info["tokens_per_s"] = params["tokens"] / median


def forward_backward(forward, inputs, grad_out):
    """A closure: run forward, then backward with grad_out into `inputs` (no .grad accumulation)."""
    def step():
        out = forward()
        return torch.autograd.grad(out, inputs, grad_out)
    return step


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
