"""The report and the bookkeeping of the benchmarks, on a made-up pytest-benchmark JSON (no timing)."""

import json

import pytest

import report
from harness import attention_flops


def entry(group, impl, median, eager_twin=False, **extra):
    return {"group": group, "name": f"test[{impl}]", "stats": {"median": median},
            "extra_info": {"impl": impl, "eager_twin": eager_twin, **extra}}


def made_up_results():
    benchmarks = []
    for length, twin_median, fasttf_median in ((128, 2e-3, 1e-3), (256, 8e-3, 2e-3)):
        group = f"attention fwd float16 E=64 full: L=S={length}"
        flops = attention_flops(1, 2, length, length, 64, False, False)
        common = dict(op="attention", mode="fwd", seq_len=length, series="attention fwd float16 E=64 full",
                      flops=flops)
        benchmarks.append(entry(group, "torch sdpa", twin_median, True, tflops=flops / twin_median / 1e12,
                                peak_memory_bytes=3 * 2**20, **common))
        benchmarks.append(entry(group, "fasttf", fasttf_median, tflops=flops / fasttf_median / 1e12,
                                peak_memory_bytes=2**20, speedup_interleaved=twin_median / fasttf_median * 0.9,
                                interleaved_pairs=12, **common))
    elementwise = "residual_add fwd float32 p=0.0: N=8 T=512 D=512"
    benchmarks.append(entry(elementwise, "fasttf", 1e-4, op="residual_add", mode="fwd", seq_len=512, gbps=12.5))
    benchmarks.append(entry(elementwise, "device copy", 0.5e-4, bandwidth_reference=True, op="residual_add",
                            mode="fwd", seq_len=512, gbps=50.0))
    return {"datetime": "2026-11-24T00:00:00", "benchmarks": benchmarks,
            "machine_info": {"fasttf": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.13.0",
                                        "triton_interpreter": False, "load_average_at_end": [0.5, 0.5, 0.5]}}}


def test_attention_flops_follow_the_issue():
    assert attention_flops(2, 3, 5, 7, 11, causal=False, backward=False) == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=False, backward=True) == 3.5 * 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=True, backward=True) == 3.5 * 2 * 2 * 3 * 5 * 7 * 11


def test_speedup_is_the_twins_median_over_the_entrys():
    data = made_up_results()
    report.add_speedups(data["benchmarks"])
    by_key = {(b["group"], b["extra_info"]["impl"]): b["extra_info"] for b in data["benchmarks"]}
    assert by_key[("attention fwd float16 E=64 full: L=S=128", "fasttf")]["speedup_vs_eager"] == pytest.approx(2.0)
    assert by_key[("attention fwd float16 E=64 full: L=S=256", "fasttf")]["speedup_vs_eager"] == pytest.approx(4.0)
    assert by_key[("attention fwd float16 E=64 full: L=S=256", "torch sdpa")]["speedup_vs_eager"] == 1.0
    assert "speedup_vs_eager" not in by_key[("residual_add fwd float32 p=0.0: N=8 T=512 D=512", "fasttf")]


def test_report_writes_table_plot_and_raw_json(tmp_path):
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(made_up_results()))
    assert report.main([str(results), "--out", str(tmp_path / "out")]) == 0
    stem = "cuda-nvidia-h100-80gb-hbm3"
    table = (tmp_path / "out" / f"{stem}.md").read_text()
    # 4·1·2·256·256·64 = 33.6e6 flops in 2 ms = 16.8 GFLOP/s; 4x the twin (3.6x interleaved, 12 pairs); 1 MiB peak
    assert ("| attention fwd float16 E=64 full: L=S=256 | fasttf | 2 ms | 16.8 GFLOP/s | 4x | 3.6x (12) | 1 MiB |"
            in table)
    assert "| **torch sdpa** | 8 ms |" in table
    assert "| fasttf | 100 µs | 12.5 GB/s (25% of copy) | – | – | – |" in table
    assert "| device copy | 50 µs | 50 GB/s | – | – | – |" in table
    assert (tmp_path / "out" / f"{stem}-attention-fwd.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / f"{stem}.json").read_text())["benchmarks"]
    assert not (tmp_path / "out" / f"{stem}-residual-add-fwd.png").exists()  # one length: no plot


def test_report_merges_the_runs_of_one_device(tmp_path):
    attention, elementwise = made_up_results(), made_up_results()
    attention["benchmarks"] = [b for b in attention["benchmarks"] if b["extra_info"].get("op") == "attention"]
    elementwise["benchmarks"] = [b for b in elementwise["benchmarks"] if b["extra_info"].get("op") != "attention"]
    elementwise["datetime"] = "2026-11-24T00:05:00"
    paths = []
    for name, run in (("attention", attention), ("elementwise", elementwise)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    assert report.main([*map(str, paths), "--out", str(tmp_path / "out")]) == 0
    stem = "cuda-nvidia-h100-80gb-hbm3"
    table = (tmp_path / "out" / f"{stem}.md").read_text()
    assert "| attention fwd float16 E=64 full: L=S=256 | fasttf | 2 ms | 16.8 GFLOP/s | 4x |" in table
    assert "| fasttf | 100 µs | 12.5 GB/s (25% of copy) |" in table
    assert "2026-11-24T00:00:00 + 2026-11-24T00:05:00" in table
    assert len(json.loads((tmp_path / "out" / f"{stem}.json").read_text())["benchmarks"]) == 6


def test_report_refuses_a_group_timed_in_two_runs_or_two_devices(tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(made_up_results()))
    second.write_text(json.dumps(made_up_results()))
    assert report.main([str(first), str(second), "--out", str(tmp_path / "out")]) == 1
    assert "was timed in two runs" in capsys.readouterr().err
    other = made_up_results()
    other["machine_info"]["fasttf"]["device_name"] = "NVIDIA H200"
    other["benchmarks"] = other["benchmarks"][-2:]
    second.write_text(json.dumps(other))
    first_only = made_up_results()
    first_only["benchmarks"] = first_only["benchmarks"][:4]
    first.write_text(json.dumps(first_only))
    assert report.main([str(first), str(second), "--out", str(tmp_path / "out")]) == 1
    assert "different devices" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cpu_runs_on_glibcs_default_malloc_are_a_report_of_their_own():
    run = made_up_results()
    run["machine_info"]["fasttf"].update(device="cpu", device_name="AMD EPYC 2 cores", cpu_threads=1)
    run["machine_info"]["fasttf"]["malloc"] = "glibc mallopt: mmap and trim thresholds 1 GiB (warm heap)"
    assert report.device_slug(run) == "cpu-amd-epyc-2-cores-1-thread"
    run["machine_info"]["fasttf"]["malloc"] = "glibc defaults"
    assert report.device_slug(run) == "cpu-amd-epyc-2-cores-1-thread-glibc-malloc"
    warm = made_up_results()
    warm["machine_info"]["fasttf"].update(device="cpu", device_name="AMD EPYC 2 cores", cpu_threads=1)
    run["benchmarks"], warm["benchmarks"] = run["benchmarks"][:2], warm["benchmarks"][2:]
    with pytest.raises(ValueError, match="different devices"):
        report.merge([warm, run])


def test_interleaved_speedup_alternates_the_pair(monkeypatch):
    import harness

    clock, calls = [0.0], []

    class FakeTime:  # a call of fn takes 1 s, its twin 3 s (the harness reads nothing else of `time`)
        @staticmethod
        def perf_counter():
            return clock[0]

    def call(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds
        return run

    monkeypatch.setattr(harness, "time", FakeTime)
    monkeypatch.setattr(harness, "WARMUP_S", 0.0)
    monkeypatch.setattr(harness, "WARMUP_CALLS", 0)
    speedup, pairs = harness.interleaved_speedup(call("fn", 1.0), call("twin", 3.0), iterations=2, one_call=1.0)
    assert speedup == pytest.approx(3.0)
    assert pairs == 3  # calls of more than 0.5 s: 3 pairs, here already past INTERLEAVED_S after the first
    assert calls == ["twin"] + ["fn"] * 2 + ["twin"] * 2 + ["twin"] * 2 + ["fn"] * 2 + ["fn"] * 2 + ["twin"] * 2


def test_interleaved_speedup_is_none_where_the_twin_cannot_run():
    import harness

    def twin():
        raise RuntimeError("No available kernel. Aborting execution.")

    assert harness.interleaved_speedup(lambda: None, twin, iterations=1, one_call=1e-3) is None
