"""MoE lowering: the Triton kernel, the op dit_compile::moe_ffn, and the pass that substitutes it.

Without CUDA the kernel runs under Triton's interpreter, which must be switched on before the kernel
module is imported (Triton reads TRITON_INTERPRET when a function is decorated). With CUDA the same
tests run the compiled kernel, and the interpreter is left off for the rest of the session.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
import warnings
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dit_compile
import tiny_models
from dit_compile.kernels.moe_op import moe_ffn, moe_ffn_reference
from dit_compile.passes.moe import count_moe_ops, find_moe, lower_moe, register_moe, restore_moe

triton = pytest.importorskip("triton")
from dit_compile.kernels.moe import (MoEConfig, build_task_map, moe_ffn_triton,  # noqa: E402
                                     task_map_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_fault() -> str | None:
    """Why the installed Triton cannot interpret a loop over a runtime bound, or None.

    Triton 3.6's interpreter calls ``int()`` on the 1-element array that holds a scalar argument,
    which numpy >= 2.4 refuses (later Triton squeezes it first). The kernels are then fine and only
    the interpreter is not: the kernel tests skip, naming the cause, instead of failing on it."""
    if DEVICE == "cuda":
        return None
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001: any failure of the interpreter itself
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound "
                f"with numpy {numpy.__version__} ({e!r}); install numpy<2.4 or a newer Triton")
    return None if int(out) == 3 else "Triton's interpreter miscounted a loop"


_FAULT = _interpreter_fault()
kernel_test = pytest.mark.skipif(_FAULT is not None, reason=str(_FAULT))
# Small tiles so that tiny problems still span several tiles, partial tiles and masked edges.
SMALL = MoEConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)


def make_problem(num_tokens, top_k, num_experts, dim, hidden, *, ids=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=g)
    if ids is None:
        ids = torch.rand(num_tokens, num_experts, generator=g).argsort(-1)[:, :top_k]  # distinct per token
    weights = torch.rand(num_tokens, top_k, generator=g)
    w1 = torch.randn(num_experts, hidden, dim, generator=g) / dim**0.5
    w3 = torch.randn(num_experts, hidden, dim, generator=g) / dim**0.5
    w2 = torch.randn(num_experts, dim, hidden, generator=g) / hidden**0.5
    floats = [t.to(DEVICE, dtype) for t in (x, weights, w1, w3, w2)]
    return floats[0], ids.to(DEVICE), floats[1], floats[2], floats[3], floats[4]


def reference64(x, ids, weights, w1, w3, w2):
    return moe_ffn_reference(*(t.cpu().double() if t.is_floating_point() else t.cpu() for t in (x, ids, weights, w1, w3, w2)))


def assert_kernel_matches(args, atol=2e-5, rtol=1e-4, config=SMALL):
    out = moe_ffn_triton(*args, config=config)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    torch.testing.assert_close(out.cpu().double(), reference64(*args), atol=atol, rtol=rtol)
    return out


# --------------------------------------------------------------------------------------------------
# Task map


@kernel_test
@pytest.mark.parametrize("build", [build_task_map, task_map_reference])
def test_task_map_tiles_every_row_once_within_one_expert(build):
    ids = torch.tensor([[3, 0], [3, 1], [3, 0], [3, 9], [-1, 3]] * 5)  # skewed; 9 and -1 are out of range
    num_experts, block_m = 5, 4
    task = build(ids.to(DEVICE), num_experts, block_m)
    flat = ids.reshape(-1)
    assert task.tile_expert.numel() == triton.cdiv(flat.numel(), block_m) + num_experts
    covered = []
    for expert, start, end in zip(task.tile_expert.tolist(), task.tile_start.tolist(), task.tile_end.tolist()):
        if expert == num_experts:
            continue
        rows = task.sorted_rows[start : min(start + block_m, end)].long().cpu()
        assert (flat[rows] == expert).all()
        covered += rows.tolist()
    valid = ((flat >= 0) & (flat < num_experts)).nonzero().flatten().tolist()
    assert sorted(covered) == valid


@kernel_test
@settings(max_examples=25, deadline=None)
@given(num_rows=st.integers(1, 300), num_experts=st.one_of(st.integers(1, 9), st.integers(100, 160)),
       block_m=st.sampled_from([1, 4, 16]), out_of_range=st.booleans(),
       dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**16),
       split=st.booleans())
@example(num_rows=300, num_experts=128, block_m=16, out_of_range=True, dtype=torch.int64, seed=1, split=False)
@example(num_rows=300, num_experts=128, block_m=16, out_of_range=True, dtype=torch.int64, seed=1, split=True)
def test_task_map_kernel_is_the_reference(num_rows, num_experts, block_m, out_of_range, dtype, seed, split):
    """The task map kernels write what the torch ops write: the same stable order of rows and, for
    every real tile, the same expert and row range; spare tiles carry expert E. With a hundred
    experts or more (NucleusMoE has 128) the kernels walk the rows in chunks of 32 or 64, so a
    row's place depends on the chunks before it. ``split``: the two-launch map, each program
    taking one chunk of rows (up to ten programs here), so that a row's place also depends on the
    programs before its own, and the tiles are dealt out across programs."""
    from dit_compile.kernels import moe
    g = torch.Generator().manual_seed(seed)
    low, high = (-2, num_experts + 2) if out_of_range else (0, num_experts)
    # Router ids sliced from a wider tensor, as [T, 1] views are: strided once flattened.
    ids = torch.randint(low, high, (num_rows, 2), generator=g, dtype=dtype)[:, :1].to(DEVICE)
    with mock.patch.object(moe, "ONE_PROGRAM_WORK", -1 if split else moe.ONE_PROGRAM_WORK), \
            mock.patch.object(moe, "ROWS_WORK", 1 if split else moe.ROWS_WORK), \
            mock.patch.object(moe, "_task_map_kernel", None if split else moe._task_map_kernel):
        got = build_task_map(ids, num_experts, block_m)
    ref = task_map_reference(ids, num_experts, block_m)
    assert torch.equal(got.sorted_rows, ref.sorted_rows)
    assert torch.equal(got.tile_expert, ref.tile_expert)
    real = ref.tile_expert < num_experts
    assert torch.equal(got.tile_start[real], ref.tile_start[real])
    assert torch.equal(got.tile_end[real], ref.tile_end[real])


class _HostSyncs(TorchDispatchMode):
    """The ops that read a device value on the host (a sync on CUDA), or whose output size does."""
    SYNCING = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique2", "bincount",
               "masked_select", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_task_map_reference_makes_no_host_sync():
    """The oracle is torch ops on the device too: none of them waits for it."""
    ids = torch.randint(0, 128, (100, 8)).to(DEVICE)
    with _HostSyncs() as syncs:
        task_map_reference(ids, 128, 16)
    assert not syncs.seen, syncs.seen


def test_task_map_of_a_large_problem_takes_two_launches(monkeypatch):
    """Past ONE_PROGRAM_WORK one program's serial loop would take longer than a second launch:
    the map is built by two launches over several programs (NucleusMoE from 256 tokens on), and
    no torch op runs beside them but the allocations."""
    from dit_compile.kernels import moe
    launched, ops = [], []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, grid, kwargs["ROWS"]))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(moe, "_task_map_kernel", None)     # launching it would fail the test
    for name in ("_count_rows_kernel", "_place_rows_kernel"):
        monkeypatch.setattr(moe, name, Launch(name))
    ids = torch.randint(0, 128, (1024, 8))       # NucleusMoE: 128 experts, top-8, 1024 tokens
    with Record():
        moe.build_task_map(ids, 128, 64)
    # 256 bins: 512 rows a program, 16 programs.
    assert launched == [("_count_rows_kernel", (16,), 512), ("_place_rows_kernel", (16,), 512)]
    assert set(ops) <= {"empty", "view", "unbind", "_unsafe_view", "reshape", "alias"}, ops


# --------------------------------------------------------------------------------------------------
# Kernel against a float64 reference


@kernel_test
@pytest.mark.parametrize(
    "case",
    ["uniform", "all_to_one_expert", "idle_experts", "single_token", "ragged_tiles", "top1", "top3"],
)
def test_kernel_matches_reference(case):
    T, k, E, D, H = {
        "uniform": (32, 2, 4, 32, 32),
        "all_to_one_expert": (21, 1, 4, 24, 40),
        "idle_experts": (19, 2, 6, 24, 40),
        "single_token": (1, 2, 4, 24, 40),
        "ragged_tiles": (37, 2, 3, 40, 24),
        "top1": (23, 1, 4, 24, 40),
        "top3": (13, 3, 5, 24, 40),
    }[case]
    ids = None
    if case == "all_to_one_expert":
        ids = torch.full((T, 1), 2)
    elif case == "idle_experts":  # experts 0, 3 and 5 get nothing
        ids = torch.stack([torch.randint(1, 3, (T,)), torch.full((T,), 4)], dim=1)
    assert_kernel_matches(make_problem(T, k, E, D, H, ids=ids))


@kernel_test
def test_kernel_program_order_and_down_tile_change_nothing():
    """Grouped order (any group size, one larger than the tile count too) and the down kernel's own
    column tile only reorder and re-cut the same dot products: the output is the same. Bitwise for
    the order alone where the interpreter runs it; another tile shape is another matmul shape, for
    which the BLAS under the interpreter (OpenBLAS picks kernels by shape and CPU: on an AMD EPYC a
    32-wide tile differs from a 16-wide one in the last bit), like a compiled kernel, may sum a
    dot's terms in another order."""
    import dataclasses
    args = make_problem(37, 2, 3, 40, 48)
    base = assert_kernel_matches(args, config=dataclasses.replace(SMALL, group_m=1))
    for group_m, down_n in ((3, None), (64, None), (64, 32), (8, 16)):
        tol = 0.0 if DEVICE == "cpu" and down_n in (None, SMALL.block_n) else 1e-6
        cfg = dataclasses.replace(SMALL, group_m=group_m, down_block_n=down_n)
        torch.testing.assert_close(moe_ffn_triton(*args, config=cfg), base, rtol=tol, atol=tol,
                                   msg=f"group_m={group_m}, down_block_n={down_n}")


@pytest.mark.parametrize("top_k", [1, 2])
def test_launcher_leaves_all_work_to_four_kernels(monkeypatch, top_k):
    """At a few hundred tokens a MoE layer's time is its launches: the op must make four (task
    map, gate/up, down, combine; three with k == 1) and no torch kernel beside them but the
    zero-fill of k == 1's output. A stray torch op (a sum, a cast, a copy) fails here."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from dit_compile.kernels import moe
    launched, ops = [], []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    names = ["_task_map_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel"]
    for name in names:
        monkeypatch.setattr(moe, name, Launch(name))
    # Contiguous, as a router's topk returns them (a strided view is copied once, by contiguous).
    args = [t.cpu().contiguous() for t in make_problem(40, top_k, 4, 16, 24)]
    with Record():
        moe.moe_ffn_triton(*args)
    assert launched == (names if top_k > 1 else names[:3])
    allowed = {"empty", "view", "unbind", "_unsafe_view", "reshape", "alias"} | (
        {"zeros", "zero_", "fill_"} if top_k == 1 else set())
    assert set(ops) <= allowed, sorted(set(ops) - allowed)


@kernel_test
@pytest.mark.parametrize("top_k", [1, 2])
def test_kernel_drops_out_of_range_ids(top_k):
    """A token whose every slot names no expert gets zeros. With k == 1 the down kernel writes the
    output itself and never that token's row: the row must start as zeros, not as whatever memory
    the allocator hands back (here, a freed buffer of the same size full of NaN)."""
    x, ids, weights, w1, w3, w2 = make_problem(9, top_k, 3, 24, 40)
    ids[0, -1], ids[4] = 3, torch.tensor([-1, 7][:top_k])
    torch.full((9 * top_k, 24), float("nan"), device=DEVICE)    # freed at once, for reuse
    out = assert_kernel_matches((x, ids, weights, w1, w3, w2))
    assert out[4].abs().max() == 0


def _transposed_views(w1, w3, w2):
    """NucleusMoE's layout: gate/up stored as [E, D, 2H] and down as [E, H, D], passed as views."""
    hidden = w1.shape[1]
    gate_up = torch.cat([w1, w3], dim=1).transpose(1, 2).contiguous()
    down = w2.transpose(1, 2).contiguous()
    return gate_up[..., :hidden].transpose(1, 2), gate_up[..., hidden:].transpose(1, 2), down.transpose(1, 2)


@kernel_test
def test_kernel_reads_transposed_weight_views():
    # NucleusMoE stores gate/up as [E, D, 2H] and down as [E, H, D]; the op gets transposed views.
    x, ids, weights, w1, w3, w2 = make_problem(17, 2, 3, 24, 40)
    views = _transposed_views(w1, w3, w2)
    assert not views[0].is_contiguous()
    assert_kernel_matches((x, ids, weights, *views))


@kernel_test
@pytest.mark.parametrize("layout", ["stacked", "transposed"])
def test_kernel_through_tma_descriptors(layout):
    """With ``tma`` the weights and the down kernel's hidden rows are read through descriptors:
    tiles overhanging H and D (and the last expert) must read zeros, never the next expert's
    weights, and a tile's rows past its expert's end must never be stored. fp16: the interpreter's
    bf16 dot multiplies raw bits. A weight TMA cannot read (a base off 16 bytes) takes the pointer
    path instead, with the same result."""
    import dataclasses
    from dit_compile.kernels.moe import _weight_descriptor
    x, ids, weights, w1, w3, w2 = make_problem(37, 2, 3, 40, 56, dtype=torch.float16)
    if layout == "transposed":
        w1, w3, w2 = _transposed_views(w1, w3, w2)
    k_contiguous = layout == "stacked"
    assert [_weight_descriptor(w, 16, 16)[1] for w in (w1, w3, w2)] == [k_contiguous] * 3
    ref = reference64(x, ids, weights, w1, w3, w2)
    for cfg in (SMALL, MoEConfig(block_m=32, block_n=32, block_k=32, num_warps=1, num_stages=1, down_block_n=16)):
        pointers = moe_ffn_triton(x, ids, weights, w1, w3, w2, config=cfg)
        tma = moe_ffn_triton(x, ids, weights, w1, w3, w2, config=dataclasses.replace(cfg, tma=True))
        torch.testing.assert_close(tma.cpu().double(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(tma, pointers, atol=1e-3, rtol=1e-3)
    shifted = torch.empty(w1.numel() + 1, dtype=w1.dtype, device=w1.device)[1:].view(w1.shape).copy_(w1)
    assert _weight_descriptor(shifted, 16, 16) is None
    out = moe_ffn_triton(x, ids, weights, shifted, w3, w2, config=dataclasses.replace(SMALL, tma=True))
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)


@kernel_test
def test_kernel_default_config_and_half_precision():
    args = make_problem(29, 2, 4, 32, 64, dtype=torch.float16)
    out = moe_ffn_triton(*args)
    torch.testing.assert_close(out, moe_ffn_reference(*(a.cpu() for a in args)).to(DEVICE), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.cpu().double(), reference64(*args), atol=2e-2, rtol=2e-2)


# One (rows, experts, hidden) per branch of choose_config's table: few rows per expert, many, many
# rows over many experts, and the rest. The configs, not the sizes, are what these tests vary.
TABLE = {"few rows": (128, 16), "many per expert": (2**20, 4), "many experts": (8192, 128), "middle": (600, 4)}


@kernel_test
@pytest.mark.parametrize("branch", sorted(TABLE))
def test_kernel_at_each_table_config(branch):
    """Each tile config choose_config can pick for half precision computes the same function,
    at a size where its tiles overhang every dimension (masks, padding, idle programs)."""
    from dit_compile.kernels.moe import choose_config
    cfg = choose_config(*TABLE[branch], torch.float16)
    args = make_problem(29, 2, 4, 32, 64, dtype=torch.float16)
    out = moe_ffn_triton(*args, config=cfg)
    torch.testing.assert_close(out.cpu().double(), reference64(*args), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("branch", sorted(TABLE))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter's bf16 dot multiplies raw bits)")
def test_kernel_low_precision_on_gpu(dtype, branch):
    """Each table config, by pointers and through TMA descriptors (HiDream's stacked weights and
    NucleusMoE's transposed views), at sizes whose tiles overhang H and D."""
    import dataclasses
    from dit_compile.kernels.moe import _weight_descriptor, choose_config
    x, ids, weights, w1, w3, w2 = make_problem(300, 2, 4, 264, 536, dtype=dtype)
    ref = reference64(x, ids, weights, w1, w3, w2)
    assert all(_weight_descriptor(w, 64, 64) for w in (w1, w3, w2, *_transposed_views(w1, w3, w2)))
    for tma in (False, True):
        cfg = dataclasses.replace(choose_config(*TABLE[branch], dtype), tma=tma)
        for w in ((w1, w3, w2), _transposed_views(w1, w3, w2)):
            out = moe_ffn_triton(x, ids, weights, *w, config=cfg)
            torch.testing.assert_close(out.cpu().double(), ref, atol=3e-2, rtol=3e-2, msg=f"tma={tma}")


@kernel_test
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tokens=st.integers(1, 40),
    top_k=st.integers(1, 3),
    num_experts=st.integers(3, 6),
    skew=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_routing(num_tokens, top_k, num_experts, skew, seed):
    # Zipf-like expert popularity; top-k without replacement, as a router's topk gives.
    g = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -skew
    ids = torch.multinomial(popularity.expand(num_tokens, -1), top_k, generator=g)
    assert_kernel_matches(make_problem(num_tokens, top_k, num_experts, 24, 40, ids=ids, seed=seed))


# --------------------------------------------------------------------------------------------------
# The op


class _TinyMoE(nn.Module):
    def __init__(self, num_experts=4, dim=16, hidden=24, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim**0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden**0.5)

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        return x + moe_ffn(x, ids, weights, self.w1, self.w3, self.w2)


def _ptxas() -> str | None:
    path = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_ptxas() is None, reason="this Triton ships no ptxas to compile for sm_90")
def test_kernels_compile_for_hopper_with_wgmma_and_async_loads():
    """Without a GPU: both GEMM kernels build for the H100 (sm_90) at the configs the launcher
    picks, in bf16 and fp16, for HiDream's weight layout and NucleusMoE's transposed views, and every
    build uses Hopper's wgmma and asynchronous, vectorised loads (what the speed goals rest on); the
    task-map kernels build for both models' expert counts (one program; two launches for
    NucleusMoE's), the combine for both dtypes. Runs in
    its own process: here the interpreter has replaced @triton.jit."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    builds = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    # 2 layouts x 2 dtypes x 4 configs (choose_config's four branches) x 2 kernels, by pointers;
    # then the same through TMA descriptors in bf16.
    assert [b["kernel"] for b in builds[48:]] == (["_task_map_kernel"] * 2 + ["_count_rows_kernel", "_place_rows_kernel"]
                                                 + ["_combine_kernel"] * 2)
    assert [b["tma"] for b in builds[:48]] == [False] * 32 + [True] * 16
    for b in builds[:48]:
        assert b["wgmma"] and b["scalar_16bit_loads"] == 0, b
        # By pointers every operand is an asynchronous copy; through TMA the weights (and the down
        # kernel's rows) are bulk tensor copies, and only gate/up's gathered tokens stay cp.async.
        assert b["async_copy"] == (not b["tma"] or b["kernel"] == "_gate_up_kernel"), b
        assert b["tma_loads"] == b["tma"], b


def test_op_cpu_matches_reference_and_opcheck():
    args = [t.cpu() for t in make_problem(11, 2, 4, 24, 40)]
    torch.testing.assert_close(moe_ffn(*args).double(), reference64(*args), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(moe_ffn, args, test_utils=("test_schema", "test_faketensor"))


def test_op_fake_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 24, dtype=torch.bfloat16)
        ids, weights = torch.empty(7, 2, dtype=torch.int32), torch.empty(7, 2)
        w1, w2 = torch.empty(4, 40, 24, dtype=torch.bfloat16), torch.empty(4, 24, 40, dtype=torch.bfloat16)
        out = moe_ffn(x, ids, weights, w1, w1, w2)
        assert out.shape == (7, 24) and out.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="w2 must be"):
            moe_ffn(x, ids, weights, w1, w1, w1)
        with pytest.raises(RuntimeError, match="must share a dtype"):
            moe_ffn(x, ids, weights, w1, w1, w2.float())
        # Each check, as the fake implementation (sharing them with the real ones) makes it.
        for args, message in (
                ((x[None], ids, weights, w1, w1, w2), r"x must be \[T, D\]"),
                ((x, ids[:6], weights[:6], w1, w1, w2), r"expert_ids must be \[T, k\] with T=7"),
                ((x, weights, weights, w1, w1, w2), "expert_ids must be integer"),
                ((x, ids, weights[:, :1], w1, w1, w2), r"routing_weights must be a float \[T, k\]"),
                ((x, ids, ids, w1, w1, w2), r"routing_weights must be a float \[T, k\]"),
                ((x, ids, weights, w1, w1[:, :32], w2), r"w1 and w3 must both be \[E, H, D\]"),
                ((x[:, :16], ids, weights, w1, w1, w2), r"w1 is \[E, H, 24\] but x has D=16"),
                ((x, ids, weights, w1, w1.float(), w2), "must share a dtype"),
                ((x.float(), ids, weights, w1, w1, w2), "must share a dtype")):
            with pytest.raises(RuntimeError, match=message):
                moe_ffn(*args)


def test_op_rounds_twice_in_the_input_dtype_as_the_kernel_stores():
    """In bf16 the CPU implementation computes in fp32 and rounds twice, as the kernel stores: the
    hidden activation silu(gate) * up to x's dtype, then the output. With D = H = 1 and a down
    weight of 3 each rounding shows in the result (3 * round(h) is not round(3 * h)): bitwise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g).bfloat16()
    ids, weights = torch.zeros(64, 1, dtype=torch.long), torch.ones(64, 1)
    w1, w3, w2 = (torch.full((1, 1, 1), v, dtype=torch.bfloat16) for v in (1.5, -2.25, 3.0))
    out = moe_ffn(x, ids, weights, w1, w3, w2)
    xf = x.float()      # the products below are exact in fp32, as the op's 1 x 1 matmuls
    hidden = nn.functional.silu(xf * 1.5) * (xf * -2.25)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (3 * hidden.bfloat16().float()).bfloat16())
    assert not torch.equal(out, (3 * hidden).bfloat16())


def test_op_exports_as_one_node():
    model, x = _TinyMoE().eval(), torch.randn(9, 16)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dit_compile.moe_ffn.default) == 1
    # A graph that calls the op by its packet (torch.fx's symbolic trace) counts it too.
    traced = torch.fx.symbolic_trace(lambda x, i, w, a, b, c: torch.ops.dit_compile.moe_ffn(x, i, w, a, b, c))
    assert count_moe_ops(traced) == 1
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.inductor
def test_op_compiles_fullgraph_with_inductor():
    model, x = _TinyMoE().eval(), torch.randn(9, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="inductor", fullgraph=True)(x), model(x))


# --------------------------------------------------------------------------------------------------
# The pass on diffusers' models


def tiny_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1),
    ).eval()  # fmt: skip
    latent = torch.randn(1, 4, 8, 8)
    kwargs = dict(
        timesteps=torch.tensor([500]), encoder_hidden_states_t5=torch.randn(1, 6, 8),
        encoder_hidden_states_llama3=torch.randn(2, 1, 5, 4), pooled_embeds=torch.randn(1, 8), return_dict=False,
    )  # fmt: skip
    # The patchified form a pipeline passes for non-square images (img_sizes a list of ints), and
    # the 4-D latent, for which forward builds img_sizes as a tensor of Python ints that unpatchify
    # slices with (Dynamo traces it whole on torch 2.11 and 2.13).
    tokens, _, _, img_ids = model.patchify(latent)
    patchified = dict(
        kwargs, hidden_states=tokens, hidden_states_masks=torch.ones(1, tokens.shape[1]), img_ids=img_ids, img_sizes=[(4, 4)]
    )
    return model, dict(kwargs, hidden_states=latent), patchified


def _graphs(model, kwargs, **compile_kwargs):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=record, **compile_kwargs)(**kwargs)[0]
    return graphs, out


def test_hidream_lowered_matches_eager_and_compiles_fullgraph():
    model, latent_kwargs, kwargs = tiny_hidream()
    with torch.no_grad():
        expected = model(**kwargs)[0]
        assert torch.equal(model(**latent_kwargs)[0], expected)
    assert find_moe(model) == {"double_stream_blocks.0.block.ff_i": False, "single_stream_blocks.0.block.ff_i": False}
    assert lower_moe(model) == 2 and lower_moe(model) == 2
    assert all(find_moe(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs)[0], expected, atol=1e-5, rtol=1e-5)
    graphs, out = _graphs(model, kwargs, fullgraph=True)
    assert len(graphs) == 1 and count_moe_ops(graphs[0]) == 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    torch._dynamo.reset()
    graphs, out = _graphs(model, latent_kwargs, fullgraph=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    assert restore_moe(model) == 2 and not any(find_moe(model).values())
    torch._dynamo.reset()
    graphs, _ = _graphs(model, kwargs)
    assert len(graphs) > 1 and sum(count_moe_ops(g) for g in graphs) == 0  # the original loop breaks


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(dim=st.sampled_from([4, 8]), experts=st.integers(1, 6), data=st.data(),
       batch=st.integers(1, 2), tokens=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_lowering_preserves_each_dispatch(dim, experts, data, batch, tokens, seed):
    """Either dispatch lowered computes what it computed, in float64 to 1e-12, for any
    number of experts, of them routed per token (HiDream's top-k, up to all), of tokens and of
    capacity (NucleusMoE's, by its factor: experts' rows overlap, and some tokens go to none),
    softmax or sigmoid scores: experts that get no token included."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer

    torch.manual_seed(seed)
    x = torch.randn(batch, tokens, dim)
    if data.draw(st.booleans(), label="hidream"):
        top_k = data.draw(st.integers(1, experts), label="top_k")
        module = MOEFeedForwardSwiGLU(dim=dim, hidden_dim=4 * dim, num_routed_experts=experts,
                                      num_activated_experts=top_k)
        args = (x,)
    else:
        # Capacity ceil(factor * tokens / experts) may not exceed the tokens: diffusers' topk raises.
        factor = data.draw(st.sampled_from([f for f in (0.5, 1.0, 2.5) if f <= experts]), label="capacity")
        module = NucleusMoELayer(hidden_size=dim, moe_intermediate_dim=3 * dim, num_experts=experts,
                                 capacity_factor=factor, use_sigmoid=data.draw(st.booleans(), label="sigmoid"),
                                 route_scale=1.5)
        args = (x, torch.randn(batch, tokens, dim), torch.randn(batch, dim))  # the unmodulated input, temb
    with torch.no_grad():
        for p in module.parameters():        # Nucleus leaves its expert stacks uninitialised
            p.copy_(torch.randn_like(p) * dim**-0.5)
    module = module.double().eval()
    args = tuple(a.double() for a in args)
    with torch.no_grad():
        expected = module(*args)
        assert lower_moe(module) == 1
        torch.testing.assert_close(module(*args), expected, rtol=1e-12, atol=1e-12)


def test_hidream_stack_stays_in_sync():
    model, _, kwargs = tiny_hidream()
    lower_moe(model)
    moe = model.double_stream_blocks[0].block.ff_i

    def aliased():
        return all(
            getattr(e, name).weight.data_ptr() == stack[i].data_ptr()
            for name, stack in (("w1", moe._moe_w1), ("w3", moe._moe_w3), ("w2", moe._moe_w2))
            for i, e in enumerate(moe.experts)
        )

    assert aliased() and not any("_moe_" in key for key in model.state_dict())
    with torch.no_grad():
        moe.experts[1].w3.weight.mul_(2)  # in place: the stack sees it
    assert torch.equal(moe._moe_w3[1], moe.experts[1].w3.weight)

    model.to(torch.float64)  # new storage for every parameter: restacked
    assert moe._moe_w1.dtype == torch.float64 and aliased()
    model.to(torch.float32)
    state = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new parameter objects: restacked
    assert aliased() and torch.equal(moe._moe_w2[3], state["double_stream_blocks.0.block.ff_i.experts.3.w2.weight"])
    new = torch.nn.Parameter(torch.randn_like(moe.experts[2].w1.weight))
    moe.experts[2].w1.weight = new  # one new parameter object: its stack restacked
    assert aliased() and moe.experts[2].w1.weight is new and torch.equal(moe._moe_w1[2], new)

    clone = copy.deepcopy(model)  # its own stack, aliased again at its first dispatch
    clone_moe = clone.double_stream_blocks[0].block.ff_i
    with torch.no_grad():
        lowered = model(**kwargs)[0]
        torch.testing.assert_close(clone(**kwargs)[0], lowered)
    assert clone_moe.experts[0].w1.weight.data_ptr() == clone_moe._moe_w1[0].data_ptr()
    assert clone_moe._moe_w1.data_ptr() != moe._moe_w1.data_ptr()
    with torch.no_grad():
        restore_moe(model)
        torch.testing.assert_close(model(**kwargs)[0], lowered, atol=1e-5, rtol=1e-5)


def test_a_weight_the_stack_cannot_take_undoes_the_lowering_and_compiled_calls_see_new_weights():
    model, _, kwargs = tiny_hidream()
    lower_moe(model)
    compiled = torch.compile(model, backend="mixcache", fullgraph=True,
                             options={"cache": None, "regions": "eager"})
    moe = model.double_stream_blocks[0].block.ff_i
    with torch.no_grad():
        before = compiled(**kwargs)[0]
        moe.experts[0].w2.weight = torch.nn.Parameter(moe.experts[0].w2.weight * 3)
        after = compiled(**kwargs)[0]              # the compiled graph reads the new stack
        assert not torch.allclose(after, before)
        restore_moe(model)
        torch.testing.assert_close(after, model(**kwargs)[0], atol=1e-5, rtol=1e-5)
        lower_moe(model)
        with pytest.warns(UserWarning, match=r"replaced by one of \(256, 32\), torch.float64.* "
                                             r"the MoE lowering is undone here"):
            moe.experts[1].w1.weight = torch.nn.Parameter(moe.experts[1].w1.weight.double())
        assert find_moe(model)["double_stream_blocks.0.block.ff_i"] is False


def test_nucleus_lowered_matches_eager_and_compiles_fullgraph():
    model, kwargs = tiny_models.nucleus()
    kwargs["return_dict"] = False
    with torch.no_grad():
        expected = model(**kwargs)[0]
    # Unlowered, torch 2.13 traces the loop's .tolist() under fullgraph=True with unbacked sizes and
    # unrolls it: 2 matmuls per expert per layer, each of a data-dependent size.
    assert lower_moe(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs)[0], expected, atol=1e-5, rtol=1e-5)
    graphs, out = _graphs(model, kwargs, fullgraph=True)
    assert len(graphs) == 1 and count_moe_ops(graphs[0]) == 2
    assert not any(n.target in (torch.matmul, torch.Tensor.matmul) for n in graphs[0].graph.nodes)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # And under the backend: its regions found, the same output.
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"regions": "eager", "cache": None})(**kwargs)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert dit_compile.explain(model, **kwargs).fallback is None


def test_explain_reports_moe_dispatches_lowered_or_not():
    """explain lists the model's MoE dispatches by their path in the model (a compiled model's as
    its module's, not under ``_orig_mod``), and which of them are lowered."""
    model, kw = tiny_models.hidream(patchified=True)    # one graph once lowered
    paths = list(find_moe(model))
    assert len(paths) == 4 and not any(p.startswith("_orig_mod") for p in paths)
    lower_moe(model)
    report = dit_compile.explain(torch.compile(model), **kw, return_dict=False)
    assert report.moe == dict.fromkeys(paths, True)
    assert "MoE dispatches: 4, not lowered: 0\n" in str(report)
    report.moe[paths[0]] = False
    assert "MoE dispatches: 4, not lowered: 1 (backend='mixcache' lowers them" in str(report)


def test_explain_traces_the_dispatches_lowered_and_leaves_them_as_they_were():
    """As the backend lowers a model's MoE dispatches before its first trace, explain traces them
    lowered: one graph holding both of HiDream's stacks (unlowered, a graph per dispatch, none of
    them with the blocks). The model keeps its own dispatches after, and one lowered by hand before
    stays lowered."""
    model, kw = tiny_models.hidream(patchified=True)
    paths = list(find_moe(model))
    lower_moe(model.get_submodule(paths[0]))
    with torch.no_grad():
        expected = model(**kw, return_dict=False)[0]
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.graphs == 1 and report.fallback is None and not report.breaks
    assert report.stacks == {"double_stream_blocks": 2, "single_stream_blocks": 2}
    assert report.block_graphs == 2
    assert report.moe == {p: p == paths[0] for p in paths}
    assert "not lowered: 3 (backend='mixcache' lowers them before its first trace, as this " \
        "report's trace did" in str(report)
    assert find_moe(model) == report.moe
    with torch.no_grad():
        torch.testing.assert_close(model(**kw, return_dict=False)[0], expected, rtol=0, atol=0)


def test_explain_leaves_the_dispatches_of_a_model_compiled_not_to_lower_them(monkeypatch):
    """Compiled with options={"lower_moe": False} the backend leaves the dispatches as they are,
    and so does explain's trace (here the dispatches' state as the trace finds it: an unlowered
    HiDream's trace takes seconds)."""
    explain_module = sys.modules["dit_compile.explain"]     # the package's `explain` is the function
    model, kw = tiny_models.hidream(patchified=True)
    seen = []
    monkeypatch.setattr(explain_module, "_traced",
                        lambda target, report, args, kwargs: seen.append(find_moe(target)) or report)
    for options in ({}, {"lower_moe": False}):
        report = dit_compile.explain(torch.compile(model, backend="mixcache", options=options), **kw)
        assert set(seen[-1].values()) == {not options}
        assert set(find_moe(model).values()) == {False}
    assert "not lowered: 4 (options={'lower_moe': False} leaves them so" in str(report)


def test_nucleus_padding_rows_are_zero():
    nucleus = pytest.importorskip("diffusers.models.transformers.transformer_nucleusmoe_image")
    experts = nucleus.SwiGLUExperts(hidden_size=8, moe_intermediate_dim=12, num_experts=3)
    nn.init.normal_(experts.gate_up_proj)
    nn.init.normal_(experts.down_proj)
    x, counts = torch.randn(10, 8), torch.tensor([3, 0, 4])  # 3 padding rows
    with torch.no_grad():
        expected = experts(x, counts)
        lower_moe(experts)
        torch.testing.assert_close(experts(x, counts), expected, atol=1e-5, rtol=1e-5)
    assert experts(x, counts)[7:].abs().max() == 0


# --------------------------------------------------------------------------------------------------
# A user's own MoE


class _SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias=False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden, bias=bias), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class _UserMoE(nn.Module):
    def __init__(self, num_experts=3, dim=16, hidden=24, bias=False):
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(_SwiGLU(dim, hidden, bias) for _ in range(num_experts))

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        return x + self.dispatch(x, ids, weights)

    def dispatch(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (ids == e).nonzero(as_tuple=True)  # data-dependent: breaks the graph
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def test_register_moe_for_user_module():
    torch.manual_seed(0)
    model, x = _UserMoE(), torch.randn(13, 16)
    with torch.no_grad():
        expected = model(x)
    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    assert find_moe(model) == {"": True} and lower_moe(model) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        out = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bias-free"):
        register_moe(_UserMoE(bias=True), "dispatch", experts="experts", projections=("gate", "up", "down"))

    class Doubled(nn.Linear):   # a subclass computing something else (as LoRA or quantisation)
        def forward(self, x):
            return 2 * super().forward(x)
    wrapped = _UserMoE()
    wrapped.experts[1].up = Doubled(16, 24, bias=False)
    with pytest.raises(ValueError, match="plain bias-free nn.Linear"):
        register_moe(wrapped, "dispatch", experts="experts", projections=("gate", "up", "down"))
    with pytest.raises(ValueError, match="exactly one"):
        register_moe(model, "dispatch")


def test_lowered_dispatch_stays_differentiable_where_autograd_records():
    """Training (grad enabled, weights requiring grad): the original method runs, so gradients are
    eager's; the op (no backward) runs where nothing is recorded. Also where only the experts or
    the router train and the input is data (the stacked buffers never require grad: that once ran
    the op, leaving the experts without gradients or failing backward); the router's routing
    weights alone requiring grad run the original too."""
    torch.manual_seed(0)
    for x, frozen in ((torch.randn(13, 16, requires_grad=True), ()),
                      (torch.randn(13, 16), ()), (torch.randn(13, 16), ("router",)),
                      (torch.randn(13, 16), ("experts",))):
        model = _UserMoE()
        for name in frozen:
            getattr(model, name).requires_grad_(False)
        ref = copy.deepcopy(model)
        register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
        model(x).square().sum().backward()
        grads = [x.grad] + [p.grad for p in model.parameters()]
        x.grad = None
        ref(x).square().sum().backward()
        for g, r in zip(grads, [x.grad] + [p.grad for p in ref.parameters()]):
            assert (g is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_a_lowered_model_pickles_and_loads_lowered(tmp_path):
    """``torch.save(model)`` after lowering (which a mixcache compile does by itself) once wrote a
    file that would not load (a bound method pickles by a name the class lacks). It loads
    lowered, dispatching on its own weights, and converts (``.double()``) as a lowered one does."""
    import io
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
    torch.manual_seed(0)
    moe = MOEFeedForwardSwiGLU(dim=16, hidden_dim=24, num_routed_experts=4, num_activated_experts=2).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = moe(x)
    lower_moe(moe)
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert find_moe(loaded) == {"": True}
    graphs = []
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()
        torch.compile(loaded, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(x)
        assert [count_moe_ops(g) for g in graphs] == [1]
        # Its own weights: a change to the loaded model's experts reaches its dispatch only.
        loaded.experts[0].w1.weight.mul_(0)
        assert not torch.allclose(loaded(x), expected) and torch.allclose(moe(x), expected, atol=1e-5)
        loaded.double()
        assert loaded._moe_w1.dtype == torch.float64 and loaded(x.double()).dtype == torch.float64


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
def test_a_copy_of_a_lowered_module_dispatches_on_its_experts_as_they_are(copy_by):
    """A deepcopy's parameters were clones apart from its stack, so an in-place edit of its experts
    never reached its dispatch (0.29 off the same edit unlowered); an unpickled module's assignments
    were not watched (a weight assigned anew: 1.9 off). A copy stacks again at its first dispatch."""
    import io
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
    torch.manual_seed(0)
    moe = MOEFeedForwardSwiGLU(dim=16, hidden_dim=24, num_routed_experts=4, num_activated_experts=2).eval()
    x = torch.randn(2, 5, 16)
    lower_moe(moe)
    if copy_by == "deepcopy":
        lowered = copy.deepcopy(moe)
    else:
        buffer = io.BytesIO()
        torch.save(moe, buffer)
        buffer.seek(0)
        lowered = torch.load(buffer, weights_only=False)
    plain = copy.deepcopy(lowered)
    restore_moe(plain)
    with torch.no_grad():
        for m in (lowered, plain):
            m.experts[1].w3.weight.mul_(2)
        torch.testing.assert_close(lowered(x), plain(x), atol=1e-5, rtol=1e-5)
        new = torch.randn_like(plain.experts[2].w1.weight)
        for m in (lowered, plain):
            m.experts[2].w1.weight = torch.nn.Parameter(new.clone())
        torch.testing.assert_close(lowered(x), plain(x), atol=1e-5, rtol=1e-5)
        lowered.experts[0].w2.weight.mul_(3)
        plain.experts[0].w2.weight.mul_(3)
        torch.testing.assert_close(lowered(x), plain(x), atol=1e-5, rtol=1e-5)
        assert not torch.equal(moe._moe_w3, lowered._moe_w3)  # the original keeps its own


def test_experts_with_hooks_are_not_lowered_unless_the_hook_is_layerwise_casting():
    """The op reads stacked weights and never calls the experts, so hooks on them (offloading,
    hooks of one's own) would not run: refused, not a silent skip of the hook. diffusers' layerwise
    casting (fp8 storage) is the exception: the op does what it does, casting the stacks, which
    stay in the storage dtype, and the result is the hooked experts'."""
    from diffusers.hooks import apply_layerwise_casting
    torch.manual_seed(0)
    model, x = _UserMoE(), torch.randn(13, 16)
    apply_layerwise_casting(model.experts, storage_dtype=torch.float8_e4m3fn,
                            compute_dtype=torch.float32)
    with torch.no_grad():
        expected = model(x)
    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    assert model._moe_w1.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # Stacked under autocast (a mixcache compile lowers at its start, inside the call): its type
    # promotion of torch.stack refused fp8 ('Unexpected floating ScalarType'), and HiDream's
    # compile failed where eager ran.
    under = _UserMoE()
    apply_layerwise_casting(under.experts, storage_dtype=torch.float8_e4m3fn,
                            compute_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        register_moe(under, "dispatch", experts="experts", projections=("gate", "up", "down"))
    assert under._moe_w1.dtype == torch.float8_e4m3fn
    partly = _UserMoE()
    apply_layerwise_casting(partly.experts[0].gate, storage_dtype=torch.bfloat16,
                            compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="layerwise casting on some"):
        register_moe(partly, "dispatch", experts="experts", projections=("gate", "up", "down"))
    model.experts[1].down.register_forward_hook(lambda m, args, out: None)
    with pytest.raises(ValueError, match="expert 1 has forward hooks"):
        register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    hooked = _UserMoE()
    hooked.experts[2].up.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(ValueError, match="expert 2 has forward hooks"):
        register_moe(hooked, "dispatch", experts="experts", projections=("gate", "up", "down"))
    assert find_moe(hooked) == {}
    with pytest.raises(ValueError, match="three layers"):
        register_moe(_UserMoE(), "dispatch", experts="experts", projections=("gate", "up"))
    with pytest.raises(ValueError, match="no attribute 'expertz'"):
        register_moe(_UserMoE(), "dispatch", experts="expertz", projections=("gate", "up", "down"))


def test_hidream_dispatch_keeps_no_grad_and_autocast():
    """diffusers runs HiDream's moe_infer under no_grad: lowered, a forward with grad enabled
    still runs (and backpropagates through the rest) as eager's does; under autocast the experts
    compute in the autocast dtype, as their linear layers would."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(0)
    moe = MOEFeedForwardSwiGLU(dim=16, hidden_dim=24, num_routed_experts=4, num_activated_experts=2).eval()
    ref = copy.deepcopy(moe)
    assert lower_moe(moe) == 1
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = moe(x)
    out.sum().backward()
    grad, x.grad = x.grad.clone(), None
    expected = ref(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-5)
    # ... through the op, where the original would sync to the host: one graph with grad enabled.
    graphs = []
    torch._dynamo.reset()
    torch.compile(moe, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(x)
    assert [count_moe_ops(g) for g in graphs] == [1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low, eager = moe(x), ref(x)
    assert low.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), eager.float(), atol=3e-2, rtol=3e-2)


def test_register_moe_rejects_a_non_method_before_changing_anything():
    model = _UserMoE()
    with pytest.raises(ValueError, match="has no method 'experts'"):
        register_moe(model, "experts", experts="experts", projections=("gate", "up", "down"))
    assert "_moe_w1" not in model._buffers and "_apply" not in model.__dict__


# --------------------------------------------------------------------------------------------------
# GPU: the op through Inductor on the device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_op_on_cuda_through_inductor():
    model = _TinyMoE(num_experts=8, dim=128, hidden=256).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(model, backend="inductor", fullgraph=True)(x)
        weights, ids = model.router(x).softmax(-1).topk(2, dim=-1)
        ref = x.double().cpu() + reference64(x, ids, weights, model.w1, model.w3, model.w2)
    torch.testing.assert_close(out.cpu().double(), ref, atol=5e-2, rtol=5e-2)


def test_lowering_again_undoes_it_where_experts_changed_after_lowering():
    """The documented remedy for experts changed after lowering is to call ``lower_moe`` again.
    It once kept a module lowered whatever its experts had become: a LoRA-style wrapper (or a
    forward hook) added to an expert afterwards was ignored by the op, silently (0.26 off here).
    Now such a module gets its original method back, with a warning naming the expert; layerwise
    casting applied afterwards is taken up (the stacks in the storage dtype, cast per dispatch)."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    class Doubled(nn.Linear):  # a wrapper computing something else (as LoRA)
        def forward(self, x):
            return 2 * super().forward(x)

    def make():
        torch.manual_seed(0)
        return MOEFeedForwardSwiGLU(dim=16, hidden_dim=24, num_routed_experts=4, num_activated_experts=2).eval()

    x = torch.randn(2, 5, 16)
    for change in ("wrap", "hook", "cast"):
        moe, ref = make(), make()
        assert lower_moe(moe) == 1
        for m in (moe, ref):
            if change == "wrap":
                old = m.experts[1].w3
                m.experts[1].w3 = Doubled(old.in_features, old.out_features, bias=False)
                m.experts[1].w3.weight = nn.Parameter(old.weight.detach().clone())
            elif change == "hook":
                m.experts[2].w2.register_forward_hook(lambda mod, args, out: out * 3)
            else:
                apply_layerwise_casting(m.experts, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            count = lower_moe(moe)
        with torch.no_grad():
            torch.testing.assert_close(moe(x), ref(x), atol=1e-5, rtol=1e-5)
        if change == "cast":
            assert count == 1 and find_moe(moe) == {"": True} and moe._moe_w1.dtype == torch.bfloat16
            assert not caught
        else:
            assert count == 0 and find_moe(moe) == {"": False} and "_moe_w1" not in moe._buffers
            assert [str(w.message) for w in caught] == [
                "dit_compile: MoE dispatch of MOEFeedForwardSwiGLU restored to its original method: "
                + ("experts: expert 1: ('w1', 'w3', 'w2') must be plain bias-free nn.Linear" if change == "wrap"
                   else "experts: expert 2 has forward hooks (diffusers' group offloading, accelerate's "
                        "offload, hooks of your own): the op reads the stacked weights and never calls "
                        "the experts, so their hooks would not run")]


@kernel_test
def test_cuda_implementation_leaves_float64_to_the_reference():
    """The CUDA implementation handed every dtype to the Triton kernel, whose tiles and dots are
    for fp32 and 16-bit inputs only: a float64 model (a reference run on the GPU) came back all
    zeros under the interpreter. Dtypes outside the kernel's get the plain-torch reference. Called
    directly, so that without CUDA it runs on the CPU (the kernel under the interpreter)."""
    from dit_compile.kernels.moe_op import _moe_ffn_cuda

    args = make_problem(9, 2, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(_moe_ffn_cuda(*args).cpu(), reference64(*args), atol=1e-12, rtol=1e-12)
    # It checks its arguments as the other implementations do, before choosing a path.
    x, ids, weights, w1, w3, w2 = args
    with pytest.raises(RuntimeError, match=r"w2 must be \[E, D, H\]"):
        _moe_ffn_cuda(x, ids, weights, w1, w3, w2[:, :4])


class _KeywordMoE(_UserMoE):
    """Calls its dispatch by keyword, under the dispatch's own parameter names."""

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        return x + self.dispatch(x, weights=weights, ids=ids)


def test_register_moe_takes_keyword_calls_as_the_method_does():
    """A dispatch called by keyword worked on the original method and raised once lowered without
    ``route=`` (``_plain_route() got an unexpected keyword argument 'weights'``): the plain route
    now binds by the method's own names, traces whole, and pickles; a call it cannot read says
    to pass ``route=``."""
    import io
    torch.manual_seed(0)
    model, x = _KeywordMoE(), torch.randn(13, 16)
    with torch.no_grad():
        expected = model(x)
    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    graphs = []
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()
        out = torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert [count_moe_ops(g) for g in graphs] == [1]
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(TypeError, match=r"takes exactly \(x, expert_ids, routing_weights\).*pass route="):
            model.dispatch(x, ids=torch.zeros(13, 2, dtype=torch.long))


def test_register_moe_names_missing_projection_layers():
    """Experts whose layers are not called w1 / w3 / w2, registered with the default projections=,
    were refused as if their layers were of the wrong type ("must be plain bias-free
    nn.Linear"); the message now says which names the experts lack and which layers they have."""
    with pytest.raises(ValueError, match=r"expert 0 has no 'w1', 'w3', 'w2': projections=\('w1', 'w3', 'w2'\) "
                                         r"must name its gate, up and down layers \(its nn.Linear layers: "
                                         r"\['gate', 'up', 'down'\]\)"):
        register_moe(_UserMoE(), "dispatch", experts="experts")

def _nucleus_experts_and_a_doubling_hook():
    """NucleusMoE's ``SwiGLUExperts`` (3 experts, random weights) and a diffusers hook class that
    doubles a module's output: the hook diffusers' offloading would attach, made visible."""
    from diffusers.hooks import ModelHook
    nucleus = pytest.importorskip("diffusers.models.transformers.transformer_nucleusmoe_image")

    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    torch.manual_seed(0)
    experts = nucleus.SwiGLUExperts(hidden_size=8, moe_intermediate_dim=12, num_experts=3)
    nn.init.normal_(experts.gate_up_proj)
    nn.init.normal_(experts.down_proj)
    return experts, Double



@pytest.mark.parametrize("order", [(0, 2, 1), (1, 2, 0), (2, 0, 1)])
def test_register_moe_names_swapped_arguments(order):
    """A dispatch that takes its arguments in another order, registered without ``route=``,
    failed inside the op with "moe_ffn: expert_ids must be integer", which names neither the
    order nor ``route=`` (the ids first or last, too)."""
    model, x = _UserMoE(), torch.randn(13, 16)
    weights, ids = model.router(x).softmax(-1).topk(2, dim=-1)
    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    args = [(x, ids, weights)[i] for i in order]
    got = ", ".join(str(a.dtype) for a in args)
    with torch.no_grad(), pytest.raises(TypeError, match=r"takes \(x, expert_ids, routing_weights\) in "
                                                          r"that order: float, integer, float tensors; "
                                                          rf"it was called with {got} \(another order\? route="):
        model.dispatch(*args)


def test_a_method_a_hook_replaced_on_the_instance_is_not_lowered():
    """diffusers' and accelerate's hooks replace ``forward`` on the instance: group offloading's
    leaf-level hooks do so on NucleusMoE's ``SwiGLUExperts``, which own their weights. Lowering
    replaced that ``forward`` with the op, silently (a hook doubling the output: 138 off), and
    ``restore_moe`` then dropped it for good. It is left as is, with a warning, and
    ``register_moe`` refuses it."""
    from diffusers.hooks import HookRegistry
    experts, Double = _nucleus_experts_and_a_doubling_hook()
    HookRegistry.check_if_exists_or_initialize(experts).register_hook(Double(), "double")
    x, counts = torch.randn(10, 8), torch.tensor([3, 2, 4])
    with torch.no_grad():
        expected = experts(x, counts)
        with pytest.warns(UserWarning, match="SwiGLUExperts left as is: forward is replaced on this instance"):
            assert lower_moe(experts) == 0
        torch.testing.assert_close(experts(x, counts), expected)
    assert find_moe(experts) == {"": False}
    model = _UserMoE()
    model.dispatch = lambda x, ids, weights: torch.zeros_like(x)  # one's own replacement
    with pytest.raises(ValueError, match="dispatch is replaced on this instance"):
        register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))


class _StackedMoE(_TinyMoE):
    """Expert weights already stacked (``w1``, ``w3``, ``w2``), its own slow dispatch left as is."""

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        return x + self.dispatch(x, ids, weights)

    def dispatch(self, x, ids, weights):
        return moe_ffn_reference(x, ids, weights, self.w1, self.w3, self.w2)


def _stacked_user_weights(module):
    return module.w1, module.w3, module.w2


def test_a_module_registered_with_a_lambda_says_why_it_does_not_pickle():
    """``register_moe(m, ..., weights=lambda m: ...)``, the recipe in ``passes/moe.py``, lowers,
    but ``torch.save(model)`` then failed with pickle's "Can't pickle <function <lambda>>:
    attribute lookup <lambda> on __main__ failed", naming neither register_moe nor a remedy. It
    says both; a deepcopy still works, and a module-level function pickles."""
    import io
    torch.manual_seed(0)
    model, x = _StackedMoE().eval(), torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    register_moe(model, "dispatch", weights=lambda m: (m.w1, m.w3, m.w2))
    with pytest.raises(pickle.PicklingError, match=r"register_moe\(weights=.*<lambda>\) cannot be pickled.*"
                                                   r"module-level function as weights=, or restore_moe"):
        torch.save(model, io.BytesIO())
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(model)(x), expected)

    def local_weights(m):
        return m.w1, m.w3, m.w2
    register_moe(model, "dispatch", weights=local_weights)
    with pytest.raises(pickle.PicklingError, match=r"register_moe\(weights=.*<locals>.*\) cannot be pickled"):
        torch.save(model, io.BytesIO())
    register_moe(model, "dispatch", weights=_stacked_user_weights)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert find_moe(loaded) == {"": True}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_restore_leaves_a_lowered_method_a_hook_wraps_since():
    """A hook added after lowering (diffusers' replace ``forward`` on the instance, wrapping the
    lowered one, and run the op correctly): ``restore_moe`` popped the instance's ``forward``,
    dropping the hook silently (138 off), and removing the hook then put the lowered method back
    with no spec. The module is now left lowered, with a warning, until the hook is removed."""
    from diffusers.hooks import HookRegistry
    experts, Double = _nucleus_experts_and_a_doubling_hook()
    x, counts = torch.randn(10, 8), torch.tensor([3, 2, 4])
    with torch.no_grad():
        plain = experts(x, counts)
        assert lower_moe(experts) == 1
        registry = HookRegistry.check_if_exists_or_initialize(experts)
        registry.register_hook(Double(), "double")
        with pytest.warns(UserWarning, match="SwiGLUExperts.forward was replaced on the instance after lowering"):
            assert restore_moe(experts) == 0
        torch.testing.assert_close(experts(x, counts), 2 * plain)
        registry.remove_hook("double")
        assert find_moe(experts) == {"": True} and restore_moe(experts) == 1
        torch.testing.assert_close(experts(x, counts), plain)
        assert "forward" not in experts.__dict__


# --------------------------------------------------------------------------------------------------
# Refusals and bookkeeping of the pass, found by mutation


class _KeywordOnlyMoE(_UserMoE):
    """Its dispatch takes the routing by keyword only."""

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        return x + self.dispatch(x, ids=ids, weights=weights)

    def dispatch(self, x, *, ids, weights):
        return super().dispatch(x, ids, weights)


def test_register_moe_plain_route_binds_keyword_only_parameters_and_refuses_extra_arguments():
    """The plain route reads keyword-only parameters under their names too, and a call with more
    than the three arguments is refused (never silently cut to three), and so are float ids
    (not only beside integer weights: the message names the three dtypes)."""
    torch.manual_seed(0)
    model, x = _KeywordOnlyMoE(), torch.randn(13, 16)
    with torch.no_grad():
        expected = model(x)
        register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    user = _UserMoE()
    weights, ids = user.router(x).softmax(-1).topk(2, dim=-1)
    register_moe(user, "dispatch", experts="experts", projections=("gate", "up", "down"))
    with torch.no_grad():
        for args, kwargs in (((x, ids, weights, None), {}), ((x, ids), {"weights": weights, "scale": 2.0})):
            with pytest.raises(TypeError, match=r"takes exactly \(x, expert_ids, routing_weights\)"):
                user.dispatch(*args, **kwargs)
        with pytest.raises(TypeError, match="called with torch.float32, torch.float32, "
                                            "torch.float32"):
            user.dispatch(x, weights, weights)


def test_register_moe_refuses_what_the_op_cannot_compute():
    """Each structural refusal of register_moe, before anything changes: both experts= and
    weights=, projections that are not three names, no experts at all, a down projection of
    another shape, experts unlike expert 0 (a dtype, of all its layers or of its down projection
    alone), and a hook on an expert itself or a diffusers hook (which replaces forward) on one of
    its layers."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Keep(ModelHook):
        pass

    def register(model, **kwargs):
        kwargs = {"experts": "experts", "projections": ("gate", "up", "down"), **kwargs}
        register_moe(model, "dispatch", **kwargs)

    cases = []
    cases.append((_UserMoE(), {"weights": _stacked_user_weights}, "exactly one"))
    cases.append((_UserMoE(), {"projections": ("gate", "up", "down", "gate")}, "three layers"))
    cases.append((_UserMoE(), {"projections": ("gate", "up", 3)}, "three layers"))
    empty = _UserMoE()
    empty.experts = nn.ModuleList()
    cases.append((empty, {}, "not a non-empty nn.ModuleList"))
    wide = _UserMoE()
    for expert in wide.experts:
        expert.down = nn.Linear(25, 16, bias=False)
    cases.append((wide, {}, "gate/up .* and down .* shapes disagree"))
    mixed = _UserMoE()
    mixed.experts[1].double()
    cases.append((mixed, {}, "expert 1: shape, dtype or device differs from expert 0"))
    down_only = _UserMoE()          # its down projection alone: stacked, it promoted every expert
    down_only.experts[1].down.double()
    cases.append((down_only, {}, "expert 1: shape, dtype or device differs from expert 0"))
    hooked = _UserMoE()
    hooked.experts[0].register_forward_hook(lambda m, args, out: out)
    cases.append((hooked, {}, "expert 0 has forward hooks"))
    replaced = _UserMoE()
    HookRegistry.check_if_exists_or_initialize(replaced.experts[1].up).register_hook(Keep(), "keep")
    cases.append((replaced, {}, "expert 1 has forward hooks"))
    for model, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            register(model, **kwargs)
        assert find_moe(model) == {} and "_moe_w1" not in model._buffers and "_apply" not in model.__dict__


def _stacked_expert_weights(module):
    return tuple(torch.stack([getattr(e, name).weight for e in module.experts]) for name in ("gate", "up", "down"))


def test_registering_again_and_restoring_leave_nothing_of_the_lowering_behind():
    """Registered again with weights= where it was with experts=, and restored, a module keeps
    no stack, no _apply wrapper and no load hook: a conversion (.double()) and a load then run as
    the class's own, and the dispatch computes on the experts' weights."""
    torch.manual_seed(0)
    model, x = _UserMoE(), torch.randn(13, 16)
    with torch.no_grad():
        expected = model(x)

    def clean():
        return ("_moe_w1" not in model._buffers and "_apply" not in model.__dict__
                and not model._load_state_dict_post_hooks)

    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    assert not clean() and len(model._load_state_dict_post_hooks) == 1
    register_moe(model, "dispatch", weights=_stacked_expert_weights)
    assert clean() and find_moe(model) == {"": True}
    model.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()).float(), expected, atol=1e-5, rtol=1e-5)
    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    assert restore_moe(model) == 1 and clean() and "dispatch" not in model.__dict__
    model.float()
    model.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_lowering_again_restacks_after_an_expert_is_added():
    """An expert appended to the list after lowering: lower_moe restacks all of them (the stack
    was one expert short)."""
    torch.manual_seed(0)
    model = _UserMoE()
    register_moe(model, "dispatch", experts="experts", projections=("gate", "up", "down"))
    model.experts.append(_SwiGLU(16, 24))
    assert lower_moe(model) == 1 and model._moe_w1.shape[0] == 4
    assert model.experts[3].up.weight.data_ptr() == model._moe_w3[3].data_ptr()


def test_recognised_classes_skip_what_they_cannot_lower():
    """A HiDream MoE whose experts are not HiDream's feed-forward (a forward the op does not
    compute), or that has no integer num_activated_experts, or whose moe_infer is replaced on the
    instance, and a NucleusMoE expert stack of odd or mixed-dtype weights, are left as they are
    with a warning; subclasses of the recognised classes (and of HiDream's expert) are lowered;
    a lowered NucleusMoE stack is kept lowered by lower_moe again."""
    from diffusers.models.transformers.transformer_hidream_image import (HiDreamImageFeedForwardSwiGLU,
                                                                         MOEFeedForwardSwiGLU)
    nucleus = pytest.importorskip("diffusers.models.transformers.transformer_nucleusmoe_image")

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False), nn.Linear(24, 16, bias=False)

        def forward(self, x):
            return self.w2(nn.functional.gelu(self.w1(x)) * self.w3(x))

    def hidream():
        return MOEFeedForwardSwiGLU(dim=16, hidden_dim=24, num_routed_experts=4, num_activated_experts=2).eval()

    skipped = []
    other = hidream()
    other.experts = nn.ModuleList(Gelu() for _ in range(4))
    skipped.append((other, "experts are not HiDreamImageFeedForwardSwiGLU"))
    no_k = hidream()
    no_k.num_activated_experts = None
    skipped.append((no_k, "no integer num_activated_experts"))
    replaced = hidream()
    replaced.moe_infer = MOEFeedForwardSwiGLU.moe_infer.__get__(replaced)
    skipped.append((replaced, "moe_infer is replaced on this instance"))
    odd = nucleus.SwiGLUExperts(hidden_size=8, moe_intermediate_dim=12, num_experts=3)
    odd.gate_up_proj = nn.Parameter(torch.randn(3, 8, 25))
    skipped.append((odd, r"gate_up_proj \(3, 8, 25\) and down_proj \(3, 12, 8\) do not match"))
    mixed = nucleus.SwiGLUExperts(hidden_size=8, moe_intermediate_dim=12, num_experts=3)
    mixed.down_proj = nn.Parameter(torch.randn(3, 12, 8, dtype=torch.float64))
    skipped.append((mixed, r"gate_up_proj \(3, 8, 24\) and down_proj \(3, 12, 8\) do not match"))
    for module, message in skipped:
        with pytest.warns(UserWarning, match=f"left as is: {message}"):
            assert lower_moe(module) == 0
        assert find_moe(module) == {"": False}

    class SubExpert(HiDreamImageFeedForwardSwiGLU):
        pass

    class SubMoE(MOEFeedForwardSwiGLU):
        pass

    torch.manual_seed(0)
    sub = SubMoE(dim=16, hidden_dim=24, num_routed_experts=4, num_activated_experts=2).eval()
    sub.experts = nn.ModuleList(SubExpert(16, 24) for _ in range(4))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = sub(x)
        assert find_moe(sub) == {"": False} and lower_moe(sub) == 1
        torch.testing.assert_close(sub(x), expected, atol=1e-5, rtol=1e-5)
    stack = nucleus.SwiGLUExperts(hidden_size=8, moe_intermediate_dim=12, num_experts=3)
    assert lower_moe(stack) == 1 and lower_moe(stack) == 1 and find_moe(stack) == {"": True}


def test_choose_config_branches_at_their_documented_edges():
    """choose_config's table at the edges its docstring states: at most 16 rows per expert, at
    least 2048, from 8192 rows; rows per expert a true quotient (16.5 is more than 16); fp32's
    tile heights by 16 and 64 rows per expert."""
    from dit_compile.kernels.moe import choose_config

    def tiles(rows, experts, dtype=torch.float16):
        cfg = choose_config(rows, experts, dtype)
        return cfg.block_m, cfg.block_n, cfg.down_block_n, cfg.num_stages

    few, many, wide, middle = (64, 64, 128, 4), (128, 128, 256, 3), (128, 64, 128, 3), (128, 128, 128, 4)
    assert tiles(64, 4) == few and tiles(33, 2) == middle and tiles(65, 4) == middle
    assert tiles(2048 * 4, 4) == many and tiles(2047 * 4, 4) == middle
    assert tiles(8192, 128) == wide and tiles(8191, 128) == middle
    assert [tiles(n * 4, 4, torch.float32)[0] for n in (16, 17, 64, 65)] == [16, 32, 32, 64]


def test_launcher_takes_tma_where_every_operand_allows_it(monkeypatch):
    """Which kernels read through TMA descriptors under the interpreter (where the TMA tests run
    them on the CPU): 16-bit inputs with a tma config only; gate/up only where w1 and w3 share a
    layout; down only where the hidden rows are 16-byte strided; a weight whose strides are not
    multiples of 16 bytes has no descriptor."""
    import dataclasses
    from dit_compile.kernels import moe
    launched = {}

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.__setitem__(self.name, (kwargs.get("TMA"), kwargs.get("K_CONTIGUOUS")))

    for name in ("_task_map_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel"):
        monkeypatch.setattr(moe, name, Launch(name))
    cfg = dataclasses.replace(SMALL, tma=True)

    def tma(dtype, layout, hidden=40, config=cfg):
        x, ids, weights, w1, w3, w2 = make_problem(9, 2, 3, 32, hidden, dtype=dtype)
        views = _transposed_views(w1, w3, w2)
        w = {"stacked": (w1, w3, w2), "transposed": views, "mixed": (w1, views[1], w2)}[layout]
        moe.moe_ffn_triton(*(t.cpu() for t in (x, ids, weights, *w)), config=config)
        return launched["_gate_up_kernel"], launched["_down_kernel"]

    assert tma(torch.float16, "stacked") == ((True, True), (True, True))
    assert tma(torch.bfloat16, "transposed") == ((True, False), (True, False))
    assert tma(torch.float16, "stacked", config=SMALL) == ((False, False), (False, False))
    assert tma(torch.float32, "stacked") == ((False, False), (False, False))
    assert tma(torch.float16, "mixed") == ((False, False), (True, True))
    # H = 36: hidden rows of 72 bytes; the transposed w2's rows are D's (64 bytes), so only the
    # hidden rows keep the down kernel off TMA.
    assert tma(torch.float16, "transposed", hidden=36)[1] == (False, False)
    assert moe._weight_descriptor(torch.empty(3, 40, 20, dtype=torch.float16), 16, 16) is None


@kernel_test
def test_kernel_of_no_rows_and_of_strided_routing():
    """No tokens, or no slots, give zeros of the output's shape. Ids and routing weights that are
    strided views (a router's [T, k] slices) are read by their values, not their storage order,
    with k == 1 (the down kernel writes the output) and k == 2 (the combine reads the ids: in
    storage order it would take the out-of-range ids outside the view for the view's own, and
    drop rows)."""
    x, ids, weights, w1, w3, w2 = make_problem(17, 4, 5, 24, 40)
    ids = ids.contiguous()
    ids[::3, 1] = -1
    empty = moe_ffn_triton(x[:0], ids[:0], weights[:0], w1, w3, w2, config=SMALL)
    assert empty.shape == (0, 24)
    none = moe_ffn_triton(x, ids[:, :0], weights[:, :0], w1, w3, w2, config=SMALL)
    assert none.shape == x.shape and none.abs().max() == 0
    for view in ((slice(None), slice(0, 1)), (slice(None), slice(None, None, 2))):
        assert not weights[view].reshape(-1).is_contiguous() and not ids[view].reshape(-1).is_contiguous()
        assert_kernel_matches((x, ids[view], weights[view], w1, w3, w2))


def test_task_map_takes_one_program_up_to_one_program_work(monkeypatch):
    """ONE_PROGRAM_WORK is the most rows times bins one program takes: at it, one launch; one
    past it, the two-launch map."""
    from dit_compile.kernels import moe
    launched = []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    for name in ("_task_map_kernel", "_count_rows_kernel", "_place_rows_kernel"):
        monkeypatch.setattr(moe, name, Launch(name))
    ids = torch.randint(0, 7, (64, 2))          # 128 rows, 8 bins
    for work, expected in ((128 * 8, ["_task_map_kernel"]), (128 * 8 - 1, ["_count_rows_kernel", "_place_rows_kernel"])):
        launched.clear()
        monkeypatch.setattr(moe, "ONE_PROGRAM_WORK", work)
        moe.build_task_map(ids, 7, 16)
        assert launched == expected, work
