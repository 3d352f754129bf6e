"""Time each tile of the Triton attention kernels alone, at one shape, in one process.

    python bench/gpu_tiles.py --dtype bfloat16 --head-dim 128 --length 1024 --causal --kernel fwd
    python bench/gpu_tiles.py --head-dim 64 --length 1024 --causal --kernel dkdv --tiles 64x64x4x3,64x128x8x3

The autotuner keeps, per key, the tile it timed fastest; two leases showed its pick and the
benchmark suite's ranking disagreeing by 5-10% (its timer flushes L2 before every call, the suite's
calls run back to back) and the pick moving between runs. Here each tile is pinned in turn (the
autotuner is given a list of that one tile: no pruning, no tuning), its result checked against
torch's SDPA on float32 copies of the inputs, then timed in rounds that go through every tile before
the next round starts, so that a drift of the clock or the card reaches all tiles alike; the table
gives each tile's median over the rounds, its TFLOP/s, and the ratio to torch's FLASH and CUDNN
backends timed in the same rounds.

--kernel fwd times the forward; dkdv or dq times forward+backward with that backward kernel pinned
and the other two left to the autotuner (they are tuned once, before the first round), so that the
differences between rows are that kernel's. Tiles: --tiles, else the built-in list of that kernel's
kind (kernels/attention_common.py GPU_TILES), unpruned. A tile that does not compile (out of shared
memory) is reported and skipped. Exit status 1 if a tile's result was wrong.

Off the GPU (TRITON_INTERPRET=1, FASTTF_CPU_ATTENTION=triton) it runs the same way on tiny shapes:
that is how its test checks it; the times then mean nothing.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

import fasttf
from fasttf.kernels import attention_backward, attention_common, attention_forward
from harness import attention_flops  # bench/ is the script's directory, so on its path

KERNELS = {  # --kernel: (the autotuned kernel, the GPU_TILES kind its list comes from, backward?)
    "fwd": (attention_forward._attention_fwd_kernel, "fwd", False),
    "dkdv": (attention_backward._attention_bwd_dkdv_kernel, "bwd", True),
    "dq": (attention_backward._attention_bwd_dq_kernel, "bwd", True),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# ‖out - ref‖ / ‖ref‖ allowed against float32 SDPA (tf32 dots for float32 inputs on a GPU)
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 5e-3}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=sorted(KERNELS), default="fwd")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=1024, help="L = S")
    parser.add_argument("--tokens", type=int, default=16384, help="N·L (the benchmark suite's 16384)")
    parser.add_argument("--width", type=int, default=2048, help="H·E (the benchmark suite's 2048)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--tiles", default="", help="MxNxWARPSxSTAGES,... (default: the built-in list)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.05, help="timed calls per tile and round")
    return parser.parse_args(argv)


def tile_list(args):
    kind = KERNELS[args.kernel][1]
    if not args.tiles:
        return list(attention_common.GPU_TILES[kind])
    return attention_common.tiles_from_env(f"{kind}={args.tiles}", attention_common.GPU_TILES)[0][kind]


def tile_config(tile):
    block_m, block_n, num_warps, num_stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, seconds):
    """Back-to-back calls for about `seconds` (L2 as a model leaves it), after one call to size the loop."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    calls = max(1, min(1000, int(seconds / max(time.perf_counter() - start, 1e-6))))
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def relative_error(value, reference):
    return ((value.float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def main(argv=None):
    args = parse_args(argv)
    kernel, _, backward = KERNELS[args.kernel]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    heads, batch = max(1, args.width // args.head_dim), max(1, args.tokens // args.length)
    shape = (batch, heads, args.length, args.head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)

    def attend(impl):
        def call():
            out = impl(q, k, v)
            if backward:
                q.grad = k.grad = v.grad = None
                out.backward(grad_out)
            return out
        return call

    fasttf_call = attend(lambda q, k, v: fasttf.scaled_dot_product_attention(q, k, v, is_causal=args.causal))
    q32, k32, v32 = (t.detach().float().requires_grad_(backward) for t in (q, k, v))
    reference = F.scaled_dot_product_attention(q32, k32, v32, is_causal=args.causal)
    if backward:
        reference.backward(grad_out.float())
    expected = [reference.detach()] + ([q32.grad, k32.grad, v32.grad] if backward else [])

    contenders = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, backend in (("torch FLASH", SDPBackend.FLASH_ATTENTION), ("torch CUDNN", SDPBackend.CUDNN_ATTENTION)):
            def with_backend(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
            contenders[name] = attend(with_backend)

    built_in = kernel.configs
    fasttf_call()  # the kernels not pinned are tuned here, once, with the built-in lists
    runs, failed = {}, False
    for tile in tile_list(args):
        kernel.configs = [tile_config(tile)]
        try:
            out = fasttf_call()
            synchronize(device)
        except Exception as error:  # a tile that does not fit (shared memory, registers) is skipped
            print(f"{'x'.join(map(str, tile))}: skipped ({type(error).__name__}: {str(error)[:120]})")
            continue
        errors = [relative_error(value, ref) for value, ref in
                  zip([out] + ([q.grad, k.grad, v.grad] if backward else []), expected)]
        wrong = not all(error <= TOLERANCE[dtype] for error in errors)  # NaN is wrong too
        failed |= wrong
        runs["x".join(map(str, tile))] = (tile, errors, wrong)

    times = {name: [] for name in list(runs) + list(contenders)}
    for _ in range(args.rounds):
        for name, (tile, _, _) in runs.items():
            kernel.configs = [tile_config(tile)]
            times[name].append(seconds_per_call(fasttf_call, device, args.seconds))
        for name, call in contenders.items():
            times[name].append(seconds_per_call(call, device, args.seconds))
    kernel.configs = built_in

    flops = attention_flops(batch, heads, args.length, args.length, args.head_dim, args.causal, backward)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.kernel} tiles, {args.dtype} (N, H, L, E) = {shape}{' causal' if args.causal else ''}, "
          f"{'forward+backward' if backward else 'forward'}, median of {args.rounds} rounds on {device.type}")
    columns = ["tile (MxNxWARPSxSTAGES)", "ms", "TFLOP/s"] + [f"vs {name}" for name in contenders] + \
        ["rel. error (out, dq, dk, dv)" if backward else "rel. error (out)"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for name in sorted(medians, key=medians.get):
        seconds = medians[name]
        ratios = [f"{medians[other] / seconds:.3f}x" for other in contenders]
        errors = ", ".join(f"{e:.1e}" for e in runs[name][1]) + (" WRONG" if runs[name][2] else "") \
            if name in runs else "–"
        cells = [name, f"{seconds * 1e3:.4f}", f"{flops / seconds / 1e12:.1f}"] + ratios + [errors]
        print("| " + " | ".join(cells) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
