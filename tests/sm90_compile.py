"""Compile the MoE kernels for Hopper (sm_90) without a GPU, as the JIT would at launch.

    python tests/sm90_compile.py     # prints one JSON line per (dtype, config, kernel)

Triton compiles ahead of time for a named target with the ptxas its wheel ships, so a machine
without a GPU can check that the kernels build for the H100 and what the build contains. The JIT
specialises launch arguments: an integer equal to 1 becomes a constant and pointers and integers
divisible by 16 are marked so; for contiguous tensors that is what makes the loads vectorised and
asynchronous. The same specialisation is given here: innermost strides 1, the rest divisible by 16.
Run in its own process: the interpreter (``TRITON_INTERPRET=1``) replaces ``@triton.jit`` at import.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dit_compile.kernels import moe

INDEX_PTRS = ("sorted_rows_ptr", "tile_expert_ptr", "tile_start_ptr", "tile_end_ptr")
# Which strides are 1: HiDream's stacked experts (w1, w3 [E, H, D] and w2 [E, D, H], contiguous) and
# NucleusMoE's, passed as transposed views of gate_up [E, D, 2H] and down [E, H, D].
UNIT_STRIDES = {
    "hidream": ("stride_xd", "stride_w1d", "stride_w3d", "stride_hh", "stride_w2h", "stride_yd"),
    "nucleus": ("stride_xd", "stride_w1h", "stride_w3h", "stride_hh", "stride_w2d", "stride_yd"),
}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_sm90(fn, dtype: torch.dtype, cfg: moe.MoEConfig, layout: str, top_k: int = 2):
    """Compile one kernel for sm_90 with the launch's constants and the JIT's specialisation; with
    ``cfg.tma`` the weights (and the down kernel's hidden rows) are TMA descriptors, whose block
    shapes follow the layout as moe._weight_descriptor makes them."""
    unit = UNIT_STRIDES[layout]
    ty = TYPES[dtype]
    names = list(inspect.signature(fn.fn).parameters)
    block_n = cfg.block_n if fn is moe._gate_up_kernel else (cfg.down_block_n or cfg.block_n)
    # HiDream's weights are contiguous in K (D for w1/w3, H for w2), NucleusMoE's views in N.
    k_contiguous = layout == "hidream"
    blocks = {"TOP_K": top_k, "BLOCK_M": cfg.block_m, "BLOCK_N": block_n,
              "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "PRECISION": "tf32",
              "TMA": cfg.tma, "K_CONTIGUOUS": cfg.tma and k_contiguous}
    weight_block = [1, block_n, cfg.block_k] if k_contiguous else [1, cfg.block_k, block_n]
    sig, consts = {}, {}
    for n in names:
        if n in blocks or n in unit:
            sig[n], consts[n] = "constexpr", blocks.get(n, 1)
        elif cfg.tma and n in ("w1", "w3", "w2"):
            sig[n] = f"tensordesc<{ty}{weight_block}>"
        elif cfg.tma and n == "h" and fn is moe._down_kernel:
            sig[n] = f"tensordesc<{ty}{[cfg.block_m, cfg.block_k]}>"
        elif n in INDEX_PTRS:
            sig[n] = "*i32"
        elif n == "rw_ptr":
            sig[n] = "*fp32"
        elif n == "y_ptr":          # the down kernel's per-(token, slot) rows are fp32 for k > 1
            sig[n] = "*fp32" if top_k > 1 else "*" + ty
        elif n.endswith("_ptr") or n in ("w1", "w3", "w2", "h"):
            sig[n] = "*" + ty
        else:
            sig[n] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] != "constexpr" and not sig[n].startswith("tensordesc")}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def compile_task_map_sm90(fn, num_experts: int, block_m: int):
    """A task-map kernel for sm_90 at the constants build_task_map gives it (router ids int64)."""
    names = list(inspect.signature(fn.fn).parameters)
    bins = triton.next_power_of_2(num_experts + 1)
    chunk = max(16, min(1024, 8192 // bins))
    consts = {"BLOCK_M": block_m, "BINS": bins, "CHUNK": chunk, "ROWS": max(chunk, moe.ROWS_WORK // bins)}
    consts = {k: v for k, v in consts.items() if k in names}
    sig = {n: "constexpr" if n in consts else "*i64" if n == "ids_ptr" else
           "*i32" if n.endswith("_ptr") else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


def compile_combine_sm90(dtype: torch.dtype, top_k: int = 2):
    """The combine kernel for sm_90: fp32 rows in, x's dtype out, router ids int64."""
    fn = moe._combine_kernel
    names = list(inspect.signature(fn.fn).parameters)
    consts = {"TOP_K": top_k, "BLOCK_D": 1024}
    sig = {n: "constexpr" if n in consts else {"y_ptr": "*fp32", "ids_ptr": "*i64",
           "out_ptr": "*" + TYPES[dtype]}.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def main() -> None:
    # By pointers in both dtypes, then through TMA descriptors in bf16.
    for tma, dtypes in ((False, TYPES), (True, (torch.bfloat16,))):
        for layout in UNIT_STRIDES:
            for dtype in dtypes:
                # The configs choose_config picks for HiDream (4 experts, H 6912, k=2) at 256 and
                # 16384 tokens, and for NucleusMoE (128 experts, H 1344, k=8) at 256 and 4096.
                for rows, experts, k in ((512, 4, 2), (32768, 4, 2), (2048, 128, 8), (32768, 128, 8)):
                    cfg = dataclasses.replace(moe.choose_config(rows, experts, dtype), tma=tma)
                    for fn in (moe._gate_up_kernel, moe._down_kernel):
                        ptx = compile_sm90(fn, dtype, cfg, layout, top_k=k).asm["ptx"]
                        print(json.dumps({"kernel": fn.fn.__name__, "layout": layout,
                                          "dtype": TYPES[dtype], "rows": rows, "tma": tma,
                                          "wgmma": "wgmma.mma_async" in ptx,
                                          "async_copy": "cp.async." in ptx.replace("cp.async.bulk", ""),
                                          "tma_loads": "cp.async.bulk.tensor" in ptx,
                                          "scalar_16bit_loads": ptx.count("ld.global.b16")}),
                              flush=True)
    # One program (HiDream, NucleusMoE at 256 tokens); two launches (NucleusMoE from 1024 on).
    for fn, num_experts in ((moe._task_map_kernel, 4), (moe._task_map_kernel, 128),
                            (moe._count_rows_kernel, 128), (moe._place_rows_kernel, 128)):
        compile_task_map_sm90(fn, num_experts, 64)
        print(json.dumps({"kernel": fn.fn.__name__, "experts": num_experts}), flush=True)
    for dtype in TYPES:
        compile_combine_sm90(dtype)
        print(json.dumps({"kernel": "_combine_kernel", "dtype": TYPES[dtype]}), flush=True)


if __name__ == "__main__":
    main()
