"""What every Triton attention kernel shares: tiles and autotuning, the one-axis grid, the dot and
the cast that behave under the interpreter as on a GPU, dropout keep bits and mask tiles.

Conventions (kernels/attention.py has the math): scores run in base 2 (s2 = s * log2(e)), the
saved log-sum-exp is lse2, masks are MASK_NONE / MASK_BOOL (True = attend) / MASK_FLOAT (added).
"""

import os

import torch
import triton
import triton.language as tl

# Under the interpreter (TRITON_INTERPRET=1 before triton was imported) every program instance
# runs in numpy: one small fixed config, and small blocks so tiny tests still exercise the loops.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634
# The most negative finite float bias a kernel adds (its log2e multiple is still a finite float32).
FLOAT_BIAS_FLOOR = tl.constexpr(-2.0e38)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65535. Every launcher uses one axis (x).
MAX_GRID = (2**31 - 1, 65535, 65535)


# On a GPU the autotuner times a short list of tiles known to suit Hopper/Ampere (BLOCK_M, BLOCK_N,
# num_warps, num_stages) and keeps the fastest per key; FASTTF_AUTOTUNE=0 (the test suite) takes
# the first tile that fits instead, so a test compiles one kernel, not the whole list.
GPU_TILES = {
    "fwd": [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
            (64, 32, 4, 2), (32, 32, 4, 1)],
    "bwd": [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (128, 64, 8, 2),
            (64, 32, 4, 2), (32, 32, 4, 1)],
}


def tiles_from_env(value, default):
    """The tile lists with FASTTF_GPU_TILES applied: "fwd=128x128x8x3,128x64x8x4;bwd=64x64x4x2"
    replaces a kind's list by those (BLOCK_M, BLOCK_N, num_warps, num_stages), so that a GPU lease
    can time other tiles without editing this file. Returns (lists, the kinds replaced)."""
    tiles, replaced = dict(default), set()
    for part in filter(None, (piece.strip() for piece in (value or "").split(";"))):
        kind, _, listed = part.partition("=")
        kind = kind.strip()
        fields = [tile.strip().split("x") for tile in listed.split(",") if tile.strip()]
        if kind not in default or not fields or any(len(f) != 4 or not all(x.isdigit() for x in f) for f in fields):
            raise ValueError(f"FASTTF_GPU_TILES: expected 'kind=MxNxWARPSxSTAGES,...;...' with kind in "
                             f"{sorted(default)} and positive integers, got {part!r}")
        parsed = [tuple(int(x) for x in f) for f in fields]
        if any(block & (block - 1) or block < 16 for tile in parsed for block in tile[:2]) or \
                any(warps not in (1, 2, 4, 8, 16) or stages < 1 for _, _, warps, stages in parsed):
            raise ValueError(f"FASTTF_GPU_TILES: BLOCK_M and BLOCK_N must be powers of two >= 16, num_warps one "
                             f"of 1, 2, 4, 8, 16 and num_stages >= 1, got {part!r}")
        tiles[kind] = parsed
        replaced.add(kind)
    return tiles, replaced


GPU_TILES, GPU_TILES_FROM_ENV = tiles_from_env(os.environ.get("FASTTF_GPU_TILES"), GPU_TILES)
AUTOTUNE = not INTERPRET and os.environ.get("FASTTF_AUTOTUNE", "1") != "0"
INTERPRET_BLOCK = 16  # the interpreter's one tile (BLOCK_M = BLOCK_N), and the plain kernels' block there


def configs(kind):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
            for block_m, block_n, num_warps, num_stages in GPU_TILES[kind]]


def prune_for(kind):
    """The autotuner's pruning for one kind: tiles named in FASTTF_GPU_TILES are all timed (the
    autotuner skips those that run out of shared memory), the built-in lists are pruned by `prune`."""
    if kind in GPU_TILES_FROM_ENV and not INTERPRET:
        return lambda configs, named_args, **kwargs: configs if AUTOTUNE else configs[:1]
    return prune


def prune(configs, named_args, **kwargs):
    """Big head dims (and float32, twice the bytes) do not fit big tiles in shared memory and
    registers: keep the tiles that can; without autotuning, the first of them."""
    if INTERPRET:
        return configs
    head_dim = max(named_args.get("BLOCK_E", kwargs.get("BLOCK_E", 64)),
                   named_args.get("BLOCK_EV", kwargs.get("BLOCK_EV", 64)))
    width = head_dim * named_args["Q"].element_size() // 2  # in float16 columns
    if width <= 64:
        kept = configs
    elif width <= 128:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
    elif width <= 256:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_M"] <= 64]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_M"] <= 32]
    kept = kept or configs[-1:]
    return kept if AUTOTUNE else kept[:1]


AUTOTUNE_KEY = ["BLOCK_E", "BLOCK_EV", "CAUSAL", "MASK_KIND", "DROPOUT", "L_ROUNDED", "S_ROUNDED"]


def padded_dim(dim):
    """Head dims are padded (masked loads) to a power of two >= 16, the smallest tl.dot tile."""
    return max(16, triton.next_power_of_2(dim))


def grid(length, block, heads, batch):
    """The launch grid: one axis of cdiv(length, block) * heads * batch programs, blocks fastest
    (`program_coords` decodes it). One axis because CUDA's y and z axes stop at 65535, which a
    batch (or batch * heads) reaches; x goes to 2^31 - 1."""
    programs = triton.cdiv(length, block) * heads * batch
    if programs > MAX_GRID[0]:
        raise RuntimeError(f"fasttf attention: {programs} programs (length {length}, {heads} heads, batch {batch}) "
                           f"exceed CUDA's grid limit {MAX_GRID[0]}")
    return (programs,)


def tile_grid(length_q, length_k, block_m, block_n, outer):
    """The grid of the tile kernels (weights, mask gradient): one program per (query block, key
    block, `outer` more), on one axis like `grid`; `tile_coords` decodes it."""
    programs = triton.cdiv(length_q, block_m) * triton.cdiv(length_k, block_n) * outer
    if programs > MAX_GRID[0]:
        raise RuntimeError(f"fasttf attention: {programs} programs exceed CUDA's grid limit {MAX_GRID[0]}")
    return (programs,)


def tile_blocks(head_dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps) of the tile kernels, which hold a q tile and a k tile."""
    if INTERPRET:
        return INTERPRET_BLOCK, INTERPRET_BLOCK, 4
    width = padded_dim(head_dim) * torch.empty((), dtype=dtype).element_size() // 2
    return (64, 64, 4) if width <= 64 else (64, 32, 4) if width <= 128 else (32, 32, 4)


def input_precision(dtype):
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def emulate_bf16(dtype):
    """The interpreter has no bfloat16 arithmetic (numpy), and it converts float32 to bfloat16 by
    truncation: under it bfloat16 kernels multiply in float32 and round explicitly (`to_dtype`)."""
    return INTERPRET and dtype == torch.bfloat16


def mask_args(mask, query):
    if mask is None:
        return query, (0, 0, 0, 0), MASK_NONE  # never read: any pointer will do
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), MASK_BOOL
    return mask, mask.stride(), MASK_FLOAT


def dropout_args(dropout_p, seed, query):
    dropout = dropout_p > 0.0
    dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return (seed if dropout else query), dropout, dropout_scale


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def program_coords(length, BLOCK: tl.constexpr, H, DESCENDING: tl.constexpr):
    """(block start, head, batch) of this program in `grid`'s one axis, blocks fastest; DESCENDING:
    a head's last block first. The causal forward and dq give it CAUSAL: their last query block has
    the most keys, and the GPU starts programs in about pid order, so the heaviest start first and
    the grid's last wave ends on the lightest (dK/dV's heaviest, key block 0, comes first already)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(length, BLOCK)
    off_bh = pid // num_blocks
    block = pid % num_blocks
    if DESCENDING:
        block = num_blocks - 1 - block
    return block * BLOCK, off_bh % H, off_bh // H


@triton.jit
def tile_coords(L, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(query block start, key block start, outer index) of this program in `tile_grid`'s axis."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    num_n = tl.cdiv(S, BLOCK_N)
    rest = pid // num_m
    return (pid % num_m) * BLOCK_M, (rest % num_n) * BLOCK_N, rest // num_n


@triton.jit
def to_dtype(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (float32) converted to dtype, rounded to nearest even as a GPU does. EMULATE_BF16 (the
    interpreter, whose float32 -> bfloat16 conversion truncates): round the float32 bits to the
    nearest bfloat16 first (add 0x7FFF plus the lowest kept bit, clear the low 16 bits), so that
    the truncation that follows is exact. The result is the float32 holding that bfloat16 value
    (the interpreter's dots then multiply it in float32), or dtype itself for a store."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b. EMULATE_BF16: the interpreter's bfloat16 tl.dot is wrong (numpy has no
    bfloat16), so under it bfloat16 tiles are multiplied as the float32 values they hold."""
    if EMULATE_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p):
    """The keep bit of element (row offs_m, col offs_n) of the (batch, head) off_bh."""
    offsets = (off_bh.to(tl.int64) * L + offs_m[:, None].to(tl.int64)) * S + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def dropout_keep_transposed(seed, off_bh, offs_m, offs_n, L, S, dropout_p):
    """The same bits as dropout_keep, laid out (BLOCK_N, BLOCK_M) for the dK/dV kernel."""
    offsets = (off_bh.to(tl.int64) * L + offs_m[None, :].to(tl.int64)) * S + offs_n[:, None].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND: tl.constexpr):
    """The attention-mask tile (BLOCK_M, BLOCK_N): float values (log2 units) or the bool as int1.
    Called with (offs_n, offs_m, stride_mn, stride_mm, S, L) it loads the transposed tile."""
    in_range = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
    if MASK_KIND == 2:
        # finite values clamped to FLOAT_BIAS_FLOOR first, so that a very negative bias (torch's
        # finfo.min "masking") stays finite in log2 units instead of overflowing to -inf: a row
        # biased that way everywhere attends uniformly, as in torch; -inf stays -inf (masked) and
        # NaN stays NaN (its row comes out NaN, as in torch: a maximum would have hidden it)
        bias = tl.load(ptrs, mask=in_range, other=0.0).to(tl.float32)
        bias = tl.where((bias < FLOAT_BIAS_FLOOR) & (bias != float("-inf")), FLOAT_BIAS_FLOOR, bias)
        return bias * 1.4426950408889634
    else:
        return tl.load(ptrs, mask=in_range, other=0) != 0


@triton.jit
def masked_scores(s, mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND: tl.constexpr,
                  BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr):
    """The score tile s (BLOCK_M, BLOCK_N) with the mask applied: a float mask added (log2 units), a
    bool mask's False set to -inf; on a tile that straddles the end of the keys or the diagonal
    (BOUNDARY), the keys past S and (CAUSAL) the keys after their query set to -inf too."""
    if MASK_KIND == 2:
        s += load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND)
    if MASK_KIND == 1:
        s = tl.where(load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND),
                     s, float("-inf"))
    if BOUNDARY:
        allowed = offs_n[None, :] < S
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def probs_tile(q, k_base, mask_base, lse, offs_m, offs_n, offs_e, stride_kn, stride_ke, stride_mm, stride_mn,
               L, S, E, qk_scale, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               EMULATE_BF16: tl.constexpr):
    """P = exp2(s2 - lse2) of one (BLOCK_M, BLOCK_N) tile (before dropout), recomputed from q's
    tile and the saved lse2; 0 (from -inf, never inf or NaN) where masked or out of range."""
    kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_e[:, None] * stride_ke,
                 mask=(offs_n[None, :] < S) & (offs_e[:, None] < E), other=0.0)
    s = dot(q, kt, None, EMULATE_BF16, INPUT_PRECISION) * qk_scale
    if MASK_KIND == 2:
        s += load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND)
    allowed = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    if MASK_KIND == 1:
        allowed = allowed & load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, MASK_KIND)
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
    return tl.math.exp2(tl.where(allowed, s, float("-inf")) - lse[:, None])


@triton.jit
def _dropout_keep_mask_kernel(Seed, Keep, H, L, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep bits the attention kernels draw, for tests: Keep (N*H, L, S) uint8."""
    start_m, off_h, off_b = program_coords(L, BLOCK_M, H, False)
    off_bh = off_b * H + off_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    seed = tl.load(Seed)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, off_bh, offs_m, offs_n, L, S, dropout_p)
        tl.store(Keep + (off_bh.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :], keep.to(tl.uint8),
                 mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


def dropout_keep_mask(batch, heads, length_q, length_k, dropout_p, seed, device):
    """The bool keep-mask (N, H, L, S) the attention kernels draw for this seed and dropout_p."""
    keep = torch.empty((batch, heads, length_q, length_k), dtype=torch.uint8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    block = INTERPRET_BLOCK if INTERPRET else 64
    _dropout_keep_mask_kernel[grid(length_q, block, heads, batch)](
        seed, keep, heads, length_q, length_k, dropout_p, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
