"""Turn a pytest-benchmark JSON of fasttf's suites into a report a person reads at a glance.

    python bench/report.py RESULTS.json [MORE.json ...] [--out DIR]

writes, into DIR (default: bench/results/), files named after the device the run measured
(e.g. `cpu-amd-epyc-2-cores-1-thread`, `cuda-nvidia-h100-80gb-hbm3`):

    <device>.md                 one Markdown table: group, implementation, median time, throughput,
                                speedup vs the group's eager twin, peak memory
    <device>-<op>-<mode>.png    throughput vs sequence length, one line per implementation, one
                                panel per dtype / head dim / masking variant
    <device>.json               the pytest-benchmark JSON the report was made from, speedups included,
                                without the per-round times (stats.data) to keep it small

and prints the Markdown. Several JSONs (runs of one device, e.g. the suites of a GPU lease run one by
one by .ci/gpu) make one report: their entries together, the first run's machine information; the
runs must measure the same device, and a group timed in two of them is refused (its ratios would mix
two runs). The speedup is the eager twin's median over the entry's median, both from
the same run (conftest.py stores it in the JSON with `add_speedups`; it is recomputed here the same way).
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# extra_info key -> unit, for each kind of throughput
THROUGHPUTS = (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(data: dict) -> str:
    """e.g. cuda-nvidia-h100-80gb-hbm3, or cpu-amd-epyc-2-cores-1-thread (CPU: torch's thread count too,
    and "glibc-malloc" for a run on glibc's default malloc thresholds, FASTTF_BENCH_MALLOC=default: its
    fresh tensors cost page faults that the default warm heap does not, so its ratios are a report of
    their own, never merged with a warm-heap run's)."""
    info = data.get("machine_info", {}).get("fasttf", {})
    device, name = info.get("device", "cpu"), info.get("device_name", "unknown")
    stem = name if name.lower().startswith(device) else f"{device} {name}"
    if device == "cpu" and info.get("cpu_threads"):
        threads = info["cpu_threads"]
        stem += f" {threads} thread" + ("s" if threads > 1 else "")
    if device == "cpu" and info.get("malloc", "").startswith("glibc defaults"):
        stem += " glibc malloc"
    return slug(stem)


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(count) -> str:
    if count is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{int(count)} B"


def throughput(info: dict):
    """(value, unit) of the entry's throughput, or (None, None). TFLOP/s below 1 read as GFLOP/s."""
    for key, unit in THROUGHPUTS:
        if key in info:
            value = info[key]
            if unit == "TFLOP/s" and value < 1.0:
                return value * 1e3, "GFLOP/s"
            if unit == "tokens/s" and value >= 1e3:
                return value / 1e3, "k tokens/s"
            return value, unit
    return None, None


def add_speedups(benchmarks: list) -> None:
    """extra_info["speedup_vs_eager"] = the eager twin's median / this entry's median, per group (the
    twin: the group's entry with extra_info["eager_twin"]; a group without one gets no speedup)."""
    twins = {entry["group"]: entry for entry in benchmarks if entry["extra_info"].get("eager_twin")}
    for entry in benchmarks:
        twin = twins.get(entry["group"])
        if twin is not None and not entry["extra_info"].get("bandwidth_reference"):
            entry["extra_info"]["eager_twin_impl"] = twin["extra_info"]["impl"]
            entry["extra_info"]["speedup_vs_eager"] = twin["stats"]["median"] / entry["stats"]["median"]
    # elementwise groups: GB/s as a fraction of the device copy's GB/s in the same group
    copies = {entry["group"]: entry for entry in benchmarks
              if entry["extra_info"].get("bandwidth_reference") and "gbps" in entry["extra_info"]}
    for entry in benchmarks:
        copy = copies.get(entry["group"])
        if copy is not None and "gbps" in entry["extra_info"]:
            entry["extra_info"]["fraction_of_copy_bandwidth"] = entry["extra_info"]["gbps"] / copy["extra_info"]["gbps"]


OP_ORDER = ("attention", "MultiheadAttention", "positional_encoding", "residual_add", "add_layer_norm",
            "training step")


def group_sort_key(entries: list):
    info = entries[0]["extra_info"]
    op = info.get("op", "")
    return (OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER), info.get("series", ""),
            info.get("seq_len", 0), entries[0]["group"])


def markdown(data: dict) -> str:
    benchmarks = data["benchmarks"]
    info = data.get("machine_info", {}).get("fasttf", {})
    groups = defaultdict(list)
    for entry in benchmarks:
        groups[entry["group"]].append(entry)
    interpreter = ("on (fasttf attention rows marked 'interpreter' are not a speed path)"
                   if info.get("triton_interpreter") else "off")
    lines = [
        f"# fasttf benchmarks: {info.get('device_name', 'unknown device')}",
        "",
        f"- run: {data.get('datetime', '?')}, torch {info.get('torch', '?')}, triton {info.get('triton', '?')}, "
        f"{info.get('cpu_threads', '?')} torch thread(s); Triton interpreter: "
        f"{interpreter}; CPU memory: {info.get('malloc', '?')}",
        *([f"- GPU clocks at the end (SM, max SM, memory, power limit, temperature; not locked): "
           f"{info['gpu_clocks_at_end']}"] if info.get("gpu_clocks_at_end") else []),
        f"- load average at the end of the run: {', '.join(f'{x:.2f}' for x in info.get('load_average_at_end', []))}"
        + (" (a shared machine: timings are noisy)" if info.get("device") == "cpu" else ""),
        "- time: the median over the rounds; throughput: attention FLOP/s (4·N·H·L·S·E forward, x3.5 "
        "forward+backward, /2 causal), elementwise GB/s (bytes read + written; \"% of copy\": of `out.copy_(x)`'s "
        "GB/s in the same group), training step tokens/s; "
        "speedup: the eager twin's median / this median, same run (**bold** = the twin); interleaved: the same "
        "ratio with the two timed alternately in one loop (n pairs), which the machine's drift between rows "
        "does not move; peak memory: bytes "
        "allocated at the peak of one call beyond the inputs (CUDA: max_memory_allocated; CPU: torch's CPU "
        "allocator, replayed from torch.profiler's allocation events).",
        "",
        "| group | implementation | median | throughput | speedup vs eager twin | interleaved | peak memory |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entries in sorted(groups.values(), key=group_sort_key):
        for entry in sorted(entries, key=lambda e: e["stats"]["median"]):
            extra = entry["extra_info"]
            value, unit = throughput(extra)
            speedup = extra.get("speedup_vs_eager")
            impl = f"**{extra.get('impl', entry['name'])}**" if extra.get("eager_twin") else extra.get("impl",
                                                                                                       entry["name"])
            lines.append(" | ".join([
                "| " + entry["group"].replace("|", "\\|"), impl, format_time(entry["stats"]["median"]),
                ("–" if value is None else f"{value:.3g} {unit}")
                + (f" ({extra['fraction_of_copy_bandwidth']:.0%} of copy)"
                   if "fraction_of_copy_bandwidth" in extra and not extra.get("bandwidth_reference") else ""),
                "–" if speedup is None else f"{speedup:.3g}x",
                (f"{extra['speedup_interleaved']:.3g}x ({extra['interleaved_pairs']})"
                 if "speedup_interleaved" in extra else "–"),
                f"{format_bytes(extra.get('peak_memory_bytes'))} |",
            ]))
    skipped = data.get("fasttf_skipped", [])
    if skipped:
        lines += ["", f"Not measured in this run ({len(skipped)}):", ""]
        reasons = defaultdict(list)
        for item in skipped:
            reasons[item["reason"]].append(item["test"])
        for reason, tests in sorted(reasons.items(), key=lambda item: -len(item[1])):
            lines.append(f"- {len(tests)} x {reason} (e.g. `{tests[0]}`)")
    return "\n".join(lines) + "\n"


def plot(data: dict, out_dir: Path, stem: str) -> list[Path]:
    """One PNG per (op, mode): a panel per series, throughput vs sequence length, a line per impl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # (op, mode) -> series -> impl -> pts
    for entry in data["benchmarks"]:
        extra = entry["extra_info"]
        value, unit = throughput(extra)
        if value is None or "seq_len" not in extra:
            continue
        key = (extra.get("op", "?"), extra.get("mode", "?"))
        families[key][extra.get("series", entry["group"])][extra.get("impl", entry["name"])].append(
            (extra["seq_len"], value, unit))
    all_impls = sorted({impl for series in families.values() for impls in series.values() for impl in impls})
    palette = plt.get_cmap("tab10")
    colours = {impl: palette(index % 10) for index, impl in enumerate(all_impls)}  # one colour per impl
    written = []
    for (op, mode), series in sorted(families.items()):
        panels = {name: impls for name, impls in series.items()
                  if len({point[0] for points in impls.values() for point in points}) >= 2}
        if not panels:
            continue  # one sequence length only: the table says it all
        columns = min(4, len(panels))
        rows = -(-len(panels) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
        for axis in axes.flat[len(panels):]:
            axis.set_visible(False)
        for axis, (name, impls) in zip(axes.flat, sorted(panels.items())):
            units = set()
            for impl, points in sorted(impls.items()):
                points.sort()
                units.update(point[2] for point in points)
                fasttf_row = impl.startswith("fasttf") and not impl.startswith("fasttf.reference")
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl,
                          color=colours[impl], linewidth=2.5 if fasttf_row else 1.2)
            axis.set_xscale("log", base=2)
            values = [point[1] for points in impls.values() for point in points]
            if min(values) > 0 and max(values) / min(values) > 20:  # e.g. the interpreter, the copy
                axis.set_yscale("log")
            axis.set_xlabel("sequence length")
            axis.set_ylabel(" / ".join(sorted(units)))
            axis.set_title(name, fontsize=9)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
        figure.suptitle(f"{op} {mode}: throughput vs sequence length ({stem})", fontsize=10)
        figure.tight_layout()
        path = out_dir / f"{stem}-{slug(op)}-{slug(mode)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def merge(runs: list) -> dict:
    """One report's data from several runs of one device: the first run's machine information and
    every run's entries, with the runs' start times listed."""
    devices = {device_slug(run) for run in runs}
    if len(devices) > 1:
        raise ValueError(f"the runs measured different devices: {', '.join(sorted(devices))}")
    groups = [{entry["group"] for entry in run["benchmarks"]} for run in runs]
    for index, later in enumerate(groups[1:], start=1):
        shared = later & set().union(*groups[:index])
        if shared:
            raise ValueError(f"group {sorted(shared)[0]!r} was timed in two runs: a group's ratios come from one run")
    data = dict(runs[0], benchmarks=[entry for run in runs for entry in run["benchmarks"]])
    data["datetime"] = " + ".join(str(run.get("datetime", "?")) for run in runs)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="pytest-benchmark JSON (pytest bench --benchmark-json FILE); several: one device's runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the report goes (bench/results/)")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    for path, run in zip(args.results, runs):
        if not run.get("benchmarks"):
            print(f"{path}: no benchmark results (was the run made with --benchmark-disable?)", file=sys.stderr)
            return 1
    try:
        data = merge(runs)
    except ValueError as error:
        print(f"{' '.join(map(str, args.results))}: {error}", file=sys.stderr)
        return 1
    add_speedups(data["benchmarks"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = device_slug(data)
    raw = args.out / f"{stem}.json"
    if len(args.results) > 1 or raw.resolve() != args.results[0].resolve():  # the run's JSON without each round's time (kept small)
        slim = json.loads(json.dumps(data))
        for entry in slim["benchmarks"]:
            entry["stats"].pop("data", None)
        raw.write_text(json.dumps(slim, indent=1))
    table = markdown(data)
    (args.out / f"{stem}.md").write_text(table)
    plots = plot(data, args.out, stem)
    print(table)
    print(f"wrote {args.out / (stem + '.md')}, {raw} and {len(plots)} plots: "
          + ", ".join(path.name for path in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
