"""Grouped SwiGLU expert FFN in Triton, driven by a task map built on the device.

Computes ``dit_compile::moe_ffn`` (contract and plain-torch reference: :mod:`dit_compile.kernels.moe_op`)::

    out[t] = sum_j w[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),   e = ids[t, j]

Every (token, slot) pair is a *row*; row ``r = t * k + j``, R = T * k rows in all. The pipeline:

1. :func:`build_task_map`, torch ops only, all on the device and none reading a value back to the host
   (no ``.item()``, no ``.cpu()``, no ``torch.bincount`` whose output length is data-dependent): count
   rows per expert, sort rows by expert, cut each expert's run of rows into tiles of ``BLOCK_M`` rows and
   write one entry per tile: (expert, first sorted row, end of that expert's rows). An expert's run
   starts a fresh tile, so a tile never mixes experts; that costs at most one partial tile per expert,
   hence the worst-case tile count ``cdiv(R, BLOCK_M) + E`` that sizes the grid on the host from shapes
   alone. Entries past the real tiles carry expert ``E`` and their programs exit at once. Looking up
   a program's task is one load (an O(1) table, the idea of vLLM's ``moe_align_block_size``).
2. :func:`_gate_up_kernel`: per (tile, block of H), the gate and up projections in one pass over D, two
   fp32 accumulators, ``silu(gate) * up`` fused; writes the hidden activation per row, in sorted order.
3. :func:`_down_kernel`: per (tile, block of D), the down projection, times the row's routing weight,
   stored at the row's own (token, slot) position: every output element has exactly one writer.
4. Combine: ``y.view(T, k, D).sum(1)`` in fp32, then the cast to x's dtype.

Why a sorted combine rather than fp32 atomics: the result is bitwise reproducible run to run. The
cache policy of this project compares block outputs across steps, and scheduling noise in those
signals would leak into its decisions; a skewed routing would also pile atomics onto the same rows.
The price is one [R, D] fp32 round trip, small beside the 3 GEMMs (about 4% at HiDream shapes). With
k == 1 the rows are the tokens and the kernel writes the output directly.

Rows whose expert id is outside [0, E) sort after all experts, belong to no tile and keep the zeros
their output rows start with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MoEConfig", "TaskMap", "build_task_map", "choose_config", "moe_ffn_triton"]


class TaskMap(NamedTuple):
    """Where each program of the grouped GEMMs finds its rows. All int32, on the device of the ids.

    sorted_rows [R]:    flat row index ``t * k + j`` of the i-th row in expert order (stable).
    tile_expert [G]:    expert of tile g; ``E`` for the grid's spare tiles (their programs exit).
    tile_start  [G]:    first position in ``sorted_rows`` of tile g.
    tile_end    [G]:    end (exclusive) of tile g's expert's rows in ``sorted_rows``; a tile's rows
                        are ``[tile_start, min(tile_start + BLOCK_M, tile_end))``.
    G = cdiv(R, BLOCK_M) + E, known on the host from shapes alone.
    """

    sorted_rows: Tensor
    tile_expert: Tensor
    tile_start: Tensor
    tile_end: Tensor


def build_task_map(expert_ids: Tensor, num_experts: int, block_m: int) -> TaskMap:
    """Sort the (token, slot) rows of ``expert_ids`` [T, k] by expert and tile them; no host sync."""
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


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes and launch parameters shared by both kernels (BLOCK_N tiles H in the gate/up kernel
    and D in the down kernel; BLOCK_K tiles the reduction dim, D then H)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def choose_config(num_rows: int, num_experts: int, dtype: torch.dtype) -> MoEConfig:
    """A fixed heuristic, not an autotuner: the task map depends on BLOCK_M, so BLOCK_M must be known
    before the map is built. Rows per expert on average pick BLOCK_M (few rows: small tiles waste
    less on padding); fp32 halves the pipeline depth to fit shared memory (two weight tiles per stage
    in the gate/up kernel)."""
    rows_per_expert = num_rows / max(num_experts, 1)
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64 if rows_per_expert <= 1024 else 128
    if dtype == torch.float32:
        return MoEConfig(block_m=min(block_m, 64), block_n=64, block_k=32, num_warps=4, num_stages=2)
    # The gate/up kernel holds two [BLOCK_M, BLOCK_N] fp32 accumulators: keep them near 64 registers
    # per thread. Untuned on hardware so far: bench/moe_bench.py --sweep times the alternatives.
    if block_m == 128:
        return MoEConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)
    return MoEConfig(block_m=block_m, block_n=128, block_k=64, num_warps=8 if block_m == 64 else 4, num_stages=3)


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D]
    w1_ptr,  # [E, H, D] gate
    w3_ptr,  # [E, H, D] up
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
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
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

    expert = expert.to(tl.int64)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd  # [BLOCK_M, BLOCK_K]
    # Weight tiles are read as [BLOCK_K, BLOCK_N] = (w[e, n, k]) so that dot(x, w) is x @ w[e].T.
    w1_ptrs = w1_ptr + expert * stride_w1e + offs_n[None, :] * stride_w1h + offs_k[:, None] * stride_w1d
    w3_ptrs = w3_ptr + expert * stride_w3e + offs_n[None, :] * stride_w3h + offs_k[:, None] * stride_w3d

    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = offs_k < D - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b1 = tl.load(w1_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        b3 = tl.load(w3_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        gate = tl.dot(a, b1, gate, input_precision=PRECISION)
        up = tl.dot(a, b3, up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w1_ptrs += BLOCK_K * stride_w1d
        w3_ptrs += BLOCK_K * stride_w3d

    hidden = gate * tl.sigmoid(gate) * up
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hr + offs_n[None, :] * stride_hh
    tl.store(h_ptrs, hidden.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [R, H] hidden activation in expert order
    w2_ptr,  # [E, D, H] down
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
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

    expert = expert.to(tl.int64)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hr + offs_k[None, :] * stride_hh  # [BLOCK_M, BLOCK_K]
    w2_ptrs = w2_ptr + expert * stride_w2e + offs_n[None, :] * stride_w2d + offs_k[:, None] * stride_w2h

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mask_k = offs_k < H - k0
        a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K * stride_hh
        w2_ptrs += BLOCK_K * stride_w2h

    rows = tl.load(sorted_rows_ptr + offs_m, mask=mask_m, other=0)
    weight = tl.load(rw_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yr + offs_n[None, :] * stride_yd
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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

    Arguments are not validated here (the op does it). A dozen small torch ops build the task map,
    then one Triton launch per projection; nothing waits for the device. Runs on CPU tensors under
    ``TRITON_INTERPRET=1``.
    """
    num_tokens, dim = x.shape
    top_k = expert_ids.shape[1]
    num_experts, hidden_dim, _ = w1.shape
    num_rows = num_tokens * top_k
    if num_rows == 0:
        return x.new_zeros(num_tokens, dim)
    cfg = config or choose_config(num_rows, num_experts, x.dtype)
    task = build_task_map(expert_ids, num_experts, cfg.block_m)
    num_tiles = task.tile_expert.numel()
    # fp32 inputs get true fp32 products (torch's default for fp32 matmul), not TF32.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    hidden = torch.empty(num_rows, hidden_dim, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_tiles, triton.cdiv(hidden_dim, cfg.block_n))](
        x, w1, w3, hidden,
        task.sorted_rows, task.tile_expert, task.tile_start, task.tile_end,
        hidden_dim, dim, num_experts,
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1), w1.stride(2),
        w3.stride(0), w3.stride(1), w3.stride(2),
        hidden.stride(0), hidden.stride(1),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip

    # Zeros: rows with an out-of-range expert id are never written and must contribute nothing.
    # With k == 1 a row is a token, so the kernel writes the output itself.
    y = torch.zeros(num_rows, dim, dtype=x.dtype if top_k == 1 else torch.float32, device=x.device)
    weights = routing_weights.reshape(-1).contiguous()  # the kernel indexes it by flat row
    _down_kernel[(num_tiles, triton.cdiv(dim, cfg.block_n))](
        hidden, w2, weights, y,
        task.sorted_rows, task.tile_expert, task.tile_start, task.tile_end,
        dim, hidden_dim, num_experts,
        hidden.stride(0), hidden.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if top_k == 1:
        return y
    return y.view(num_tokens, top_k, dim).sum(1).to(x.dtype)
