"""Grouped SwiGLU expert FFN in Triton, driven by a task map built on the device.

Computes ``dit_compile::moe_ffn`` (contract and plain-torch reference: :mod:`dit_compile.kernels.moe_op`)::

    out[t] = sum_j w[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),   e = ids[t, j]

Every (token, slot) pair is a *row*; row ``r = t * k + j``, R = T * k rows in all. The pipeline:

1. The task map, on the device and never read back by the host: count rows per expert, sort rows by
   expert (stable), cut each expert's run of rows into tiles of ``BLOCK_M`` rows and write one entry
   per tile: (expert, first sorted row, end of that expert's rows). An expert's run starts a fresh
   tile, so a tile never mixes experts; that costs at most one partial tile per expert, hence the
   worst-case tile count ``cdiv(R, BLOCK_M) + E`` that sizes the grid on the host from shapes alone.
   Entries past the real tiles carry expert ``E`` and their programs exit at once. Looking up a
   program's task is one load (an O(1) table, the idea of vLLM's ``moe_align_block_size``).
   :func:`_task_map_kernel` builds it in one launch with one program: at the sizes where a layer's
   time is launch latency (a few hundred tokens), the dozen torch ops of :func:`task_map_reference`
   (the oracle the kernels are tested against) would cost more than the GEMMs. Its serial loop over
   rows grows with R times the number of experts, so past :data:`ONE_PROGRAM_WORK` two launches
   share it out: :func:`_count_rows_kernel` counts each program's rows per expert,
   :func:`_place_rows_kernel` places each program's rows after the earlier programs' (the same
   stable order) and deals out the tiles. The torch ops took that place until 2026-12-04: on the
   H200 the op then took 1.3 ms of host time at NucleusMoE's 1024 tokens, as long as the device
   took, and lost to ``F.grouped_mm``.
2. :func:`_gate_up_kernel`: per (tile, block of H), the gate and up projections in one pass over D, two
   fp32 accumulators, ``silu(gate) * up`` fused; writes the hidden activation per row, in sorted order.
3. :func:`_down_kernel`: per (tile, block of D), the down projection, times the row's routing weight,
   stored at the row's own (token, slot) position: every output element has exactly one writer.
4. :func:`_combine_kernel`: per token, the sum of its k rows in fp32, cast to x's dtype; rows whose
   expert id is out of range count as zero (they were never written).

Both GEMM kernels run on a 1-D grid in grouped order (Triton's matmul tutorial): ``GROUP_M``
consecutive tiles, mostly of one expert, sweep the column blocks together, so a wave of programs
shares the weight columns and the rows it reads in L2. In tile-major order a wave read a different
row tile per program, and at 16384 tokens every column block read the whole activation from memory
again.

On Hopper and later (``MoEConfig.tma``, every 16-bit config of the table) the weights, and the
down kernel's hidden rows, are read through TMA descriptors (bulk tensor copies, no per-element
addresses in registers: 172 registers for the 128x128 gate/up tile against 255 by pointers) and
only the gate/up kernel's token rows, a gather, by pointers; on the H200 the same tiles by
pointers took 1.02-1.30x as long from 1024 tokens on (:func:`choose_config`).

Why a sorted combine rather than fp32 atomics: the result is bitwise reproducible run to run. The
cache policy of this project compares block outputs across steps, and scheduling noise in those
signals would leak into its decisions; a skewed routing would also pile atomics onto the same rows.
The price is one [R, D] fp32 round trip, small beside the 3 GEMMs (about 4% at HiDream shapes). With
k == 1 the rows are the tokens and the kernel writes the output directly.

Rows whose expert id is outside [0, E) sort after all experts and belong to no tile: the combine
skips them, and with k == 1 their output rows keep the zeros they start with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["MoEConfig", "TaskMap", "build_task_map", "choose_config", "moe_ffn_triton", "task_map_reference"]


class TaskMap(NamedTuple):
    """Where each program of the grouped GEMMs finds its rows. All int32, on the device of the ids.

    sorted_rows [R]:    flat row index ``t * k + j`` of the i-th row in expert order (stable).
    tile_expert [G]:    expert of tile g; ``E`` for the grid's spare tiles (their programs exit).
    tile_start  [G]:    first position in ``sorted_rows`` of tile g.
    tile_end    [G]:    end (exclusive) of tile g's expert's rows in ``sorted_rows``; a tile's rows
                        are ``[tile_start, min(tile_start + BLOCK_M, tile_end))``. Spare tiles: no
                        meaning (their programs exit before reading them).
    G = cdiv(R, BLOCK_M) + E, known on the host from shapes alone.
    """

    sorted_rows: Tensor
    tile_expert: Tensor
    tile_start: Tensor
    tile_end: Tensor


def task_map_reference(expert_ids: Tensor, num_experts: int, block_m: int) -> TaskMap:
    """The task map of ``expert_ids`` [T, k] in torch ops, on the device and with no host sync."""
    device = expert_ids.device
    flat = expert_ids.reshape(-1).to(torch.int64)
    num_rows = flat.numel()
    # Out-of-range ids go to an extra bin E that sorts last and gets no tiles.
    bins = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_rows = torch.argsort(bins, stable=True).to(torch.int32)
    # Rows per expert: bincount without its data-dependent output length (which syncs on CUDA).
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.int32))
    counts = counts[:num_experts]
    row_end = counts.cumsum(0, dtype=torch.int32)
    row_start = row_end - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end_of_expert = tiles.cumsum(0, dtype=torch.int32)
    tile_begin_of_expert = tile_end_of_expert - tiles
    num_tiles = triton.cdiv(num_rows, block_m) + num_experts
    tile = torch.arange(num_tiles, dtype=torch.int32, device=device)
    # The expert owning tile g is the first whose cumulative tile count exceeds g; experts with
    # no rows own no tiles, and tiles past the last expert's get E.
    tile_expert = torch.searchsorted(tile_end_of_expert, tile, right=True, out_int32=True)
    owner = tile_expert.clamp(max=num_experts - 1).long()
    tile_start = row_start[owner] + (tile - tile_begin_of_expert[owner]) * block_m
    tile_end = row_end[owner]
    return TaskMap(sorted_rows, tile_expert, tile_start, tile_end)


# Rows times bins (experts + 1, to a power of two) past which one program's serial loop over the
# rows takes longer than spreading it over programs costs a second launch: HiDream (4 experts) stays
# on one program to 64k rows, NucleusMoE (128 experts) to 2k. Past it each program of the two-launch
# map takes ROWS_WORK // bins rows (512 for NucleusMoE: 256 programs at 16384 tokens, top-8).
ONE_PROGRAM_WORK = 1 << 19
ROWS_WORK = 1 << 17


@triton.jit
def _row_bins(ids_ptr, rows, valid, num_experts):
    """Bin of each row: its expert, or ``num_experts`` for an out-of-range id (sorts last)."""
    e = tl.load(ids_ptr + rows, mask=valid, other=0)
    return tl.where((e >= 0) & (e < num_experts), e, num_experts).to(tl.int32)


@triton.jit
def _place_rows(ids_ptr, sorted_rows_ptr, placed, first, end, num_experts, BINS: tl.constexpr,
                CHUNK: tl.constexpr):
    """Write rows ``[first, end)`` to ``sorted_rows`` at ``placed`` (the next free position
    of each bin) plus the row's rank among those rows of its bin: a cumsum of one-hot columns keeps
    the order stable."""
    bins = tl.arange(0, BINS)
    for r0 in range(first, end, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        valid = rows < end
        e = _row_bins(ids_ptr, rows, valid, num_experts)
        onehot = ((e[:, None] == bins[None, :]) & valid[:, None]).to(tl.int32)  # [CHUNK, BINS]
        position = tl.cumsum(onehot, axis=0) - 1 + placed[None, :]
        tl.store(sorted_rows_ptr + tl.sum(onehot * position, axis=1), rows.to(tl.int32), mask=valid)
        placed += tl.sum(onehot, axis=0)


@triton.jit
def _write_tiles(tile_expert_ptr, tile_start_ptr, tile_end_ptr, counts, first, step, num_tiles, num_experts,
                 BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """The map's entries for tiles ``first, first + 1, ...`` in runs of CHUNK, ``step`` apart, from
    the rows per bin."""
    bins = tl.arange(0, BINS)
    expert_bin = bins < num_experts
    row_end = tl.cumsum(counts, axis=0)
    row_start = row_end - counts
    tiles = tl.where(expert_bin, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end_of_bin = tl.cumsum(tiles, axis=0)
    tile_begin_of_bin = tile_end_of_bin - tiles
    for g0 in range(first, num_tiles, step):
        tile = g0 + tl.arange(0, CHUNK)
        # The owner of tile g is the number of experts whose tiles all come before g (experts with
        # no rows own none); past the last real tile that is num_experts: a spare tile.
        owner = tl.sum(((tile_end_of_bin[None, :] <= tile[:, None]) & expert_bin[None, :]).to(tl.int32), axis=1)
        own = (bins[None, :] == owner[:, None]) & expert_bin[None, :]  # [CHUNK, BINS]
        start = row_start[None, :] + (tile[:, None] - tile_begin_of_bin[None, :]) * BLOCK_M
        valid = tile < num_tiles
        tl.store(tile_expert_ptr + tile, owner, mask=valid)
        tl.store(tile_start_ptr + tile, tl.sum(tl.where(own, start, 0), axis=1), mask=valid)
        tl.store(tile_end_ptr + tile, tl.sum(tl.where(own, row_end[None, :], 0), axis=1), mask=valid)


@triton.jit
def _bin_counts(ids_ptr, first, end, num_experts, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Rows of each bin among rows ``[first, end)``."""
    bins = tl.arange(0, BINS)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for r0 in range(first, end, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        valid = rows < end
        e = _row_bins(ids_ptr, rows, valid, num_experts)
        counts += tl.sum(((e[:, None] == bins[None, :]) & valid[:, None]).to(tl.int32), axis=0)
    return counts


@triton.jit
def _task_map_kernel(
    ids_ptr,  # [R] expert id of each row, any integer dtype
    sorted_rows_ptr,  # [R] int32 out
    tile_expert_ptr,  # [G] int32 out
    tile_start_ptr,  # [G] int32 out
    tile_end_ptr,  # [G] int32 out
    num_rows,
    num_tiles,
    num_experts,
    BLOCK_M: tl.constexpr,
    BINS: tl.constexpr,  # experts + 1 (the out-of-range bin), to a power of two
    CHUNK: tl.constexpr,  # rows per step of the loops; CHUNK * BINS values live in registers
):
    # One program, three passes: count rows per bin, place each row, tile.
    counts = _bin_counts(ids_ptr, 0, num_rows, num_experts, BINS, CHUNK)
    row_start = tl.cumsum(counts, axis=0) - counts
    _place_rows(ids_ptr, sorted_rows_ptr, row_start, 0, num_rows, num_experts, BINS, CHUNK)
    _write_tiles(tile_expert_ptr, tile_start_ptr, tile_end_ptr, counts, 0, CHUNK, num_tiles, num_experts,
                 BLOCK_M, BINS, CHUNK)


@triton.jit
def _count_rows_kernel(
    ids_ptr,  # [R] expert id of each row, any integer dtype
    counts_ptr,  # [P, BINS] int32 out: rows of each bin among program p's ROWS rows
    num_rows,
    num_experts,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
):
    first = tl.program_id(0) * ROWS
    counts = _bin_counts(ids_ptr, first, tl.minimum(first + ROWS, num_rows), num_experts, BINS, CHUNK)
    tl.store(counts_ptr + tl.program_id(0) * BINS + tl.arange(0, BINS), counts)


@triton.jit
def _place_rows_kernel(
    ids_ptr,  # [R] expert id of each row, any integer dtype
    counts_ptr,  # [P, BINS] int32: what _count_rows_kernel wrote
    sorted_rows_ptr,  # [R] int32 out
    tile_expert_ptr,  # [G] int32 out
    tile_start_ptr,  # [G] int32 out
    tile_end_ptr,  # [G] int32 out
    num_rows,
    num_tiles,
    num_experts,
    num_programs,
    BLOCK_M: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Program p's rows go after every earlier program's rows of the same bin: the stable order of
    # the one-program map. The tiles are dealt out CHUNK at a time across the programs.
    pid = tl.program_id(0)
    bins = tl.arange(0, BINS)
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    for q in range(0, num_programs):
        c = tl.load(counts_ptr + q * BINS + bins)
        total += c
        before += tl.where(q < pid, c, 0)
    row_start = tl.cumsum(total, axis=0) - total
    first = pid * ROWS
    _place_rows(ids_ptr, sorted_rows_ptr, row_start + before, first, tl.minimum(first + ROWS, num_rows),
                num_experts, BINS, CHUNK)
    _write_tiles(tile_expert_ptr, tile_start_ptr, tile_end_ptr, total, pid * CHUNK, num_programs * CHUNK,
                 num_tiles, num_experts, BLOCK_M, BINS, CHUNK)


def build_task_map(expert_ids: Tensor, num_experts: int, block_m: int) -> TaskMap:
    """The task map of ``expert_ids`` [T, k] (or flat, [T * k]): one launch of one program
    (:func:`_task_map_kernel`) where that does the work quickly, else two launches over programs
    of ``ROWS_WORK // bins`` rows each (:func:`_count_rows_kernel`, :func:`_place_rows_kernel`).
    Either writes what :func:`task_map_reference` does. No host sync."""
    flat = expert_ids.reshape(-1).contiguous()  # a [T, 1] slice reshapes to a strided view
    num_rows = flat.numel()
    bins = triton.next_power_of_2(num_experts + 1)
    num_tiles = triton.cdiv(num_rows, block_m) + num_experts
    sorted_rows = torch.empty(num_rows, dtype=torch.int32, device=flat.device)
    tile_expert, tile_start, tile_end = torch.empty(3, num_tiles, dtype=torch.int32, device=flat.device)
    chunk = max(16, min(1024, 8192 // bins))  # 32 values a thread at 8 warps: no spills on sm_90
    if num_rows * bins <= ONE_PROGRAM_WORK:
        _task_map_kernel[(1,)](
            flat, sorted_rows, tile_expert, tile_start, tile_end, num_rows, num_tiles, num_experts,
            BLOCK_M=block_m, BINS=bins, CHUNK=chunk, num_warps=8,
        )  # fmt: skip
        return TaskMap(sorted_rows, tile_expert, tile_start, tile_end)
    rows = max(chunk, ROWS_WORK // bins)
    programs = triton.cdiv(num_rows, rows)
    counts = torch.empty(programs, bins, dtype=torch.int32, device=flat.device)
    _count_rows_kernel[(programs,)](
        flat, counts, num_rows, num_experts, BINS=bins, CHUNK=chunk, ROWS=rows, num_warps=8,
    )  # fmt: skip
    _place_rows_kernel[(programs,)](
        flat, counts, sorted_rows, tile_expert, tile_start, tile_end, num_rows, num_tiles, num_experts, programs,
        BLOCK_M=block_m, BINS=bins, CHUNK=chunk, ROWS=rows, num_warps=8,
    )  # fmt: skip
    return TaskMap(sorted_rows, tile_expert, tile_start, tile_end)


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes and launch parameters. BLOCK_M is shared (the task map is cut in BLOCK_M-row
    tiles); the gate/up kernel tiles H by ``block_n`` with two accumulators, the down kernel tiles D
    by ``down_block_n`` (``block_n`` when None); BLOCK_K tiles the reduction dim, D then H.
    ``group_m`` tiles sweep the column blocks together (L2 reuse; 1 is tile-major order). ``tma``:
    read the weights (and the down kernel's hidden rows) through TMA descriptors where the device
    and the layout allow it (:func:`_weight_descriptor`), else by pointers as everywhere else."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    down_block_n: int | None = None
    group_m: int = 8
    tma: bool = False


def choose_config(num_rows: int, num_experts: int, dtype: torch.dtype) -> MoEConfig:
    """A fixed table, not an autotuner: the task map depends on BLOCK_M, so BLOCK_M must be known
    before the map is built. fp32 halves the pipeline depth to fit shared memory (two weight tiles
    per stage in the gate/up kernel) and reads by pointers (true fp32 products).

    For bf16/fp16, what `bench/moe_bench.py --sweep` timed fastest on an H200 (2026-12-04, fourth
    lease, bench/RESULTS.md) at HiDream's shapes (4 experts, top-2, H 6912) and NucleusMoE's (128
    experts, top-8, H 1344), 256 to 16384 tokens, uniform and Zipf routing. Every pick reads the
    weights through TMA descriptors: by pointers the same tiles took 1.02-1.30x as long from 1024
    tokens on (both models, both routings). Each pick is the first call's sweep's best, or within
    7% of it, at every point it covers; the second call's sweep (under this table) agreed but at
    its first point, HiDream's 256 tokens uniform (0.355 ms against the best's 0.188; at Zipf
    routing, the next point, the pick was the best, 0.182):
    * at most 16 rows per expert (NucleusMoE at 256 tokens): 64x64 tiles, 4 warps, 4 stages,
      16-tile groups;
    * at least 2048 rows per expert (HiDream from 4096 tokens): 128x128 tiles, 256 down columns,
      16-tile groups: few, full tiles, each program re-reading its rows half as often;
    * else from 8192 rows (NucleusMoE from 1024 tokens, 64 to 1024 rows per expert): 128x64
      tiles, 128 down columns: twice the programs, for the many experts' partial tiles;
    * else (HiDream at 256 and 1024 tokens): 128x128 tiles, 4 stages, 128 down columns."""
    rows_per_expert = num_rows / max(num_experts, 1)
    if dtype == torch.float32:
        block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
        return MoEConfig(block_m=block_m, block_n=64, block_k=32, num_warps=4, num_stages=2)
    if rows_per_expert <= 16:
        return MoEConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4, down_block_n=128, group_m=16,
                         tma=True)
    if rows_per_expert >= 2048:
        return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, down_block_n=256, group_m=16,
                         tma=True)
    if num_rows >= 8192:
        return MoEConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3, down_block_n=128, tma=True)
    return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, down_block_n=128, tma=True)


@triton.jit
def _grouped_tile(pid, num_tiles, num_col_blocks, GROUP_M: tl.constexpr):
    """(tile, column block) of program ``pid`` on a 1-D grid: GROUP_M tiles per group, the group's
    programs column block by column block, so that the programs running together share weights."""
    per_group = GROUP_M * num_col_blocks
    first_tile = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % group_size
    col = (pid % per_group) // group_size
    return tile, col


@triton.jit
def _weight_tile(w, expert, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CONTIGUOUS: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile ``w[expert, n0:, k0:].T`` of w [E, N, K] through its descriptor
    (see _weight_descriptor), the operand order of ``dot(x, w[e].T)``. The descriptor pads with
    zeros past N and K within the expert, so a tile never reads another expert's weights."""
    if K_CONTIGUOUS:
        b = w.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    else:
        b = w.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    return b


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D]
    w1,  # [E, H, D] gate: a pointer, or with TMA a descriptor (_weight_descriptor)
    w3,  # [E, H, D] up: the same
    h_ptr,  # [R, H] out: silu(x @ w1[e].T) * (x @ w3[e].T), row i = i-th row in expert order
    sorted_rows_ptr,  # [R] int32
    tile_expert_ptr,  # [G] int32
    tile_start_ptr,  # [G] int32
    tile_end_ptr,  # [G] int32
    H,
    D,
    num_experts,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1h,
    stride_w1d,
    stride_w3e,
    stride_w3h,
    stride_w3d,
    stride_hr,
    stride_hh,
    num_tiles,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    K_CONTIGUOUS: tl.constexpr,  # with TMA: the weights' last dim is D (else H)
):
    tile, pid_n = _grouped_tile(tl.program_id(0), num_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:  # a spare tile of the worst-case grid
        return
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)

    offs_m = start + tl.arange(0, BLOCK_M)  # positions in expert order
    mask_m = offs_m < end
    rows = tl.load(sorted_rows_ptr + offs_m, mask=mask_m, other=0)
    tokens = (rows // TOP_K).to(tl.int64)  # the row's token: x is read in place, never gathered
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [BLOCK_M, BLOCK_K]
    if not TMA:
        # Weight tiles are read as [BLOCK_K, BLOCK_N] = (w[e, n, k]) so that dot(x, w) is x @ w[e].T.
        e64 = expert.to(tl.int64)
        w1_ptrs = w1 + e64 * stride_w1e + offs_n[None, :] * stride_w1h + offs_k[:, None] * stride_w1d
        w3_ptrs = w3 + e64 * stride_w3e + offs_n[None, :] * stride_w3h + offs_k[:, None] * stride_w3d

    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = offs_k < D - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if TMA:
            b1 = _weight_tile(w1, expert, pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K, K_CONTIGUOUS)
            b3 = _weight_tile(w3, expert, pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K, K_CONTIGUOUS)
        else:
            b1 = tl.load(w1_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            b3 = tl.load(w3_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            w1_ptrs += BLOCK_K * stride_w1d
            w3_ptrs += BLOCK_K * stride_w3d
        gate = tl.dot(a, b1, gate, input_precision=PRECISION)
        up = tl.dot(a, b3, up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd

    hidden = gate * tl.sigmoid(gate) * up
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hr + offs_n[None, :] * stride_hh
    tl.store(h_ptrs, hidden.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(
    h,  # [R, H] hidden activation in expert order: a pointer, or with TMA a descriptor
    w2,  # [E, D, H] down: a pointer, or with TMA a descriptor (_weight_descriptor)
    rw_ptr,  # [R] routing weight of row t * k + j
    y_ptr,  # [R, D] out: rw[r] * (h @ w2[e].T), stored at row r (token order)
    sorted_rows_ptr,  # [R] int32
    tile_expert_ptr,  # [G] int32
    tile_start_ptr,  # [G] int32
    tile_end_ptr,  # [G] int32
    D,
    H,
    num_experts,
    stride_hr,
    stride_hh,
    stride_w2e,
    stride_w2d,
    stride_w2h,
    stride_yr,
    stride_yd,
    num_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    K_CONTIGUOUS: tl.constexpr,  # with TMA: w2's last dim is H (else D)
):
    tile, pid_n = _grouped_tile(tl.program_id(0), num_tiles, tl.cdiv(D, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:
        return
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)

    if not TMA:
        e64 = expert.to(tl.int64)
        h_ptrs = h + offs_m.to(tl.int64)[:, None] * stride_hr + offs_k[None, :] * stride_hh  # [BLOCK_M, BLOCK_K]
        w2_ptrs = w2 + e64 * stride_w2e + offs_n[None, :] * stride_w2d + offs_k[:, None] * stride_w2h

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if TMA:
            # A whole BLOCK_M rows from the tile's start: rows past its end (the next expert's, or
            # zeros past R) only reach output rows that are never stored.
            a = h.load([start, k0])
            b = _weight_tile(w2, expert, pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K, K_CONTIGUOUS)
        else:
            mask_k = offs_k < H - k0
            a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            h_ptrs += BLOCK_K * stride_hh
            w2_ptrs += BLOCK_K * stride_w2h
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    rows = tl.load(sorted_rows_ptr + offs_m, mask=mask_m, other=0)
    weight = tl.load(rw_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yr + offs_n[None, :] * stride_yd
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _combine_kernel(
    y_ptr,  # [T * k, D] fp32: row t * k + j holds slot j's weighted expert output
    ids_ptr,  # [T * k] expert ids (any integer dtype); rows out of [0, E) were never written
    out_ptr,  # [T, D] out, x's dtype
    D,
    num_experts,
    TOP_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # in slot order: the sum is the same every run
        e = tl.load(ids_ptr + token * TOP_K + j)
        row = tl.load(y_ptr + (token * TOP_K + j) * D + offs, mask=mask, other=0.0)
        acc += tl.where((e >= 0) & (e < num_experts), row, 0.0)  # a select: garbage stays out
    tl.store(out_ptr + token * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _weight_descriptor(w: Tensor, block_n: int, block_k: int) -> tuple[TensorDescriptor, bool] | None:
    """``w`` [E, N, K] as a TMA descriptor whose blocks are one expert's tile, and whether K is its
    contiguous dim; None where TMA cannot read it. Three dims, not a flat [E * N, K]: the
    descriptor's bounds then stop a tile at its expert's edge (zeros past it), so any N and K work,
    and transposed views (NucleusMoE's experts) as well as HiDream's stacked weights. TMA needs a
    16-byte aligned base, a unit stride and the other strides multiples of 16 bytes."""
    num_experts, n, k = w.shape
    if w.stride(2) == 1:
        k_contiguous, shape, strides, block = True, [num_experts, n, k], [w.stride(0), w.stride(1), 1], [1, block_n, block_k]
    elif w.stride(1) == 1:
        k_contiguous, shape, strides, block = False, [num_experts, k, n], [w.stride(0), w.stride(2), 1], [1, block_k, block_n]
    else:
        return None
    if w.data_ptr() % 16 or any(stride * w.element_size() % 16 for stride in strides[:-1]):
        return None
    return TensorDescriptor(w, shape, strides, block), k_contiguous


def _uses_tma(cfg: MoEConfig, x: Tensor) -> bool:
    """TMA where the config asks for it, on Hopper and later (and the interpreter, on the CPU), for
    16-bit inputs (fp32 keeps the pointer path, whose products are true fp32)."""
    if not cfg.tma or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return x.device.type == "cpu" or (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9)


def moe_ffn_triton(
    x: Tensor,
    expert_ids: Tensor,
    routing_weights: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    *,
    config: MoEConfig | None = None,
) -> Tensor:
    """Launch the pipeline above. Shapes as in ``dit_compile::moe_ffn``: x [T, D], expert_ids and
    routing_weights [T, k], w1 and w3 [E, H, D], w2 [E, D, H] (any strides); returns [T, D] in x's dtype.

    Arguments are not validated here (the op does it). One launch builds the task map (two on
    large problems with many experts), one per projection and one combines the k rows of each
    token; nothing waits for the device. Runs on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    num_tokens, dim = x.shape
    top_k = expert_ids.shape[1]
    num_experts, hidden_dim, _ = w1.shape
    num_rows = num_tokens * top_k
    if num_rows == 0:
        return x.new_zeros(num_tokens, dim)
    cfg = config or choose_config(num_rows, num_experts, x.dtype)
    ids = expert_ids.reshape(-1).contiguous()  # row t * k + j; read by the task map and the combine
    task = build_task_map(ids, num_experts, cfg.block_m)
    num_tiles = task.tile_expert.numel()
    # fp32 inputs get true fp32 products (torch's default for fp32 matmul), not TF32.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    hidden = torch.empty(num_rows, hidden_dim, dtype=x.dtype, device=x.device)
    down_n = cfg.down_block_n or cfg.block_n
    # Descriptors where every operand of a kernel has one, else that kernel reads by pointers.
    gate_up_tma = down_tma = None
    if _uses_tma(cfg, x):
        d1, d3 = _weight_descriptor(w1, cfg.block_n, cfg.block_k), _weight_descriptor(w3, cfg.block_n, cfg.block_k)
        if d1 and d3 and d1[1] == d3[1]:
            gate_up_tma = (d1[0], d3[0], d1[1])
        d2 = _weight_descriptor(w2, down_n, cfg.block_k)
        if d2 and hidden.stride(0) * hidden.element_size() % 16 == 0:
            down_tma = (TensorDescriptor.from_tensor(hidden, [cfg.block_m, cfg.block_k]), d2[0], d2[1])
    _gate_up_kernel[(num_tiles * triton.cdiv(hidden_dim, cfg.block_n),)](
        x, *(gate_up_tma[:2] if gate_up_tma else (w1, w3)), hidden,
        task.sorted_rows, task.tile_expert, task.tile_start, task.tile_end,
        hidden_dim, dim, num_experts,
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1), w1.stride(2),
        w3.stride(0), w3.stride(1), w3.stride(2),
        hidden.stride(0), hidden.stride(1), num_tiles,
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PRECISION=precision, TMA=gate_up_tma is not None, K_CONTIGUOUS=bool(gate_up_tma and gate_up_tma[2]),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip

    # With k == 1 a row is a token, so the kernel writes the output itself, into zeros: rows with
    # an out-of-range expert id are never written. With k > 1 the combine skips those rows.
    if top_k == 1:
        y = torch.zeros(num_rows, dim, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(num_rows, dim, dtype=torch.float32, device=x.device)
    weights = routing_weights.reshape(-1).contiguous()  # the kernel indexes it by flat row
    _down_kernel[(num_tiles * triton.cdiv(dim, down_n),)](
        *(down_tma[:2] if down_tma else (hidden, w2)), weights, y,
        task.sorted_rows, task.tile_expert, task.tile_start, task.tile_end,
        dim, hidden_dim, num_experts,
        hidden.stride(0), hidden.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(0), y.stride(1), num_tiles,
        BLOCK_M=cfg.block_m, BLOCK_N=down_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PRECISION=precision,
        TMA=down_tma is not None, K_CONTIGUOUS=bool(down_tma and down_tma[2]),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if top_k == 1:
        return y
    out = torch.empty(num_tokens, dim, dtype=x.dtype, device=x.device)
    block_d = min(1024, triton.next_power_of_2(dim))
    _combine_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        y, ids, out, dim, num_experts, TOP_K=top_k, BLOCK_D=block_d,
    )  # fmt: skip
    return out
