"""Routed MoE FFN on the GPU: the op ``dit_compile::moe_ffn`` against the alternatives.

    python bench/moe_bench.py                      # everything, about 1-2 minutes on one H100
    python bench/moe_bench.py --models hidream --tokens 1024 4096
    python bench/moe_bench.py --sweep               # plus the kernel's tile configs, for tuning

Times the routed part of one MoE layer (gate, dispatch, experts, combine; no shared expert) in bf16:

* ``op``: gate, then ``torch.ops.dit_compile.moe_ffn`` (the Triton kernel), with the weights laid out
  as :func:`dit_compile.passes.moe.lower_moe` leaves them (HiDream: stacked ``[E, H, D]`` buffers;
  Nucleus: transposed views of its packed parameters).
* ``op, pointers``: the same op with every weight read by pointers, not TMA descriptors (the
  table's tiles otherwise): what TMA costs or saves, host time included, in the same run.
* ``eager``: gate, then diffusers' own dispatch: HiDream's ``MOEFeedForwardSwiGLU.moe_infer`` (argsort,
  host sync, loop over experts); for Nucleus, sort/gather, ``SwiGLUExperts`` with its per-expert loop,
  weight, ``scatter_add`` as ``NucleusMoELayer`` does.
* ``grouped_mm``: gate, sort/gather, ``F.grouped_mm`` (``torch._grouped_mm`` where that is the name) for
  gate+up and for down, weight, ``index_add``: the best pure-PyTorch pipeline without a host sync.
* ``dense``: two GEMMs and SiLU*mul over T*k rows with one expert's weights: the same FLOPs with no
  routing at all, the ceiling.

Shapes: HiDream-I1 (D 2560, 4 experts, top-2, expert hidden 6912); NucleusMoE (D 2048, 128 experts,
expert hidden 1344, capacity factor 8, used here as token-choice top-8, the same rows per token).
Routing: ``uniform`` (a random gate) or ``zipf`` (the gate's logits plus log of a Zipf(1) popularity,
so top-k picks experts roughly in Zipf proportions); the table reports the busiest expert's share
of rows. Every method is checked against a float32 reference before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch import Tensor

from dit_compile.kernels.moe_op import moe_ffn, moe_ffn_reference

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int
    num_experts: int
    top_k: int


SHAPES = {
    "hidream": Shape("HiDream", dim=2560, hidden=6912, num_experts=4, top_k=2),
    "nucleus": Shape("NucleusMoE", dim=2048, hidden=1344, num_experts=128, top_k=8),
}


@dataclass
class Layer:
    """One MoE layer's weights in every layout the methods need, all holding the same values."""

    shape: Shape
    gate: Tensor  # [E, D]
    w1: Tensor  # [E, H, D]
    w3: Tensor  # [E, H, D]
    w2: Tensor  # [E, D, H]
    diffusers_module: torch.nn.Module  # HiDream MOEFeedForwardSwiGLU or Nucleus SwiGLUExperts


def make_layer(shape: Shape, device: str, dtype: torch.dtype) -> Layer:
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
    from diffusers.models.transformers.transformer_nucleusmoe_image import SwiGLUExperts

    g = torch.Generator(device).manual_seed(0)
    E, H, D = shape.num_experts, shape.hidden, shape.dim

    def randn(*size: int, std: float) -> Tensor:
        return (torch.randn(*size, generator=g, device=device) * std).to(dtype)

    gate = randn(E, D, std=D**-0.5)  # logits ~ N(0, 1) for x ~ N(0, 1)
    w1, w3, w2 = randn(E, H, D, std=D**-0.5), randn(E, H, D, std=D**-0.5), randn(E, D, H, std=H**-0.5)
    with torch.device("meta"):
        if shape.name == "HiDream":
            module = MOEFeedForwardSwiGLU(dim=D, hidden_dim=4 * D, num_routed_experts=E, num_activated_experts=shape.top_k)
        else:
            module = SwiGLUExperts(hidden_size=D, moe_intermediate_dim=H, num_experts=E)
    module = module.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        if shape.name == "HiDream":
            assert module.experts[0].w1.weight.shape == (H, D), "diffusers changed HiDream's expert hidden size"
            for e, expert in enumerate(module.experts):
                expert.w1.weight.copy_(w1[e]), expert.w3.weight.copy_(w3[e]), expert.w2.weight.copy_(w2[e])
        else:
            module.gate_up_proj.copy_(torch.cat([w1, w3], dim=1).transpose(1, 2))  # [E, D, 2H]
            module.down_proj.copy_(w2.transpose(1, 2))  # [E, H, D]
    return Layer(shape, gate, w1, w3, w2, module)


def zipf_bias(num_experts: int, device: str) -> Tensor:
    popularity = 1.0 / torch.arange(1, num_experts + 1, device=device, dtype=torch.float32)
    return (popularity / popularity.sum()).log()


def route(x: Tensor, layer: Layer, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """MoEGate's math: linear, softmax, top-k (unnormalised weights)."""
    logits = F.linear(x, layer.gate)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    weights, ids = logits.softmax(-1).topk(layer.shape.top_k, dim=-1, sorted=False)
    return weights, ids


def sort_by_expert(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Flat rows in expert order and per-expert counts, without a host sync (what the op does too)."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts


# ---------------------------------------------------------------------------------------------------
# The methods: each maps x [T, D] to the routed output [T, D]


def method_op(layer: Layer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    if layer.shape.name == "HiDream":
        weights = (layer.w1, layer.w3, layer.w2)  # lower_moe's stacked buffers
    else:
        gate_up, down = layer.diffusers_module.gate_up_proj, layer.diffusers_module.down_proj
        H = layer.shape.hidden
        weights = (gate_up[..., :H].transpose(1, 2), gate_up[..., H:].transpose(1, 2), down.transpose(1, 2))

    def run(x: Tensor) -> Tensor:
        w, ids = route(x, layer, bias)
        return moe_ffn(x, ids, w, *weights)

    return run


def method_op_pointers(layer: Layer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    import dataclasses
    from dit_compile.kernels import moe
    run = method_op(layer, bias)
    table = moe.choose_config

    def by_pointers(*args, **kwargs):
        return dataclasses.replace(table(*args, **kwargs), tma=False)

    def run_by_pointers(x: Tensor) -> Tensor:
        # Swapped for the call alone (two attribute writes: nothing a host-time column would see).
        moe.choose_config = by_pointers
        try:
            return run(x)
        finally:
            moe.choose_config = table

    return run_by_pointers


def method_eager(layer: Layer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    module = layer.diffusers_module
    if layer.shape.name == "HiDream":

        def run(x: Tensor) -> Tensor:
            w, ids = route(x, layer, bias)
            return module.moe_infer(x, ids.reshape(-1), w.reshape(-1, 1))

        return run

    def run_nucleus(x: Tensor) -> Tensor:
        w, ids = route(x, layer, bias)
        order, counts = sort_by_expert(ids, layer.shape.num_experts)
        tokens = order // layer.shape.top_k
        y = module(x[tokens], counts.long())  # SwiGLUExperts: .tolist() and a loop over experts
        y = (y.float() * w.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).scatter_add_(0, tokens[:, None].expand(-1, x.shape[1]), y)

    return run_nucleus


def method_grouped_mm(layer: Layer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    w13 = torch.cat([layer.w1, layer.w3], dim=1).transpose(1, 2)  # [E, D, 2H], column-major per expert
    w2 = layer.w2.transpose(1, 2)  # [E, H, D], column-major per expert

    def run(x: Tensor) -> Tensor:
        w, ids = route(x, layer, bias)
        order, counts = sort_by_expert(ids, layer.shape.num_experts)
        tokens = order // layer.shape.top_k
        offsets = counts.cumsum(0, dtype=torch.int32)
        gate, up = GROUPED_MM(x[tokens], w13, offs=offsets).chunk(2, dim=-1)
        y = GROUPED_MM(F.silu(gate) * up, w2, offs=offsets)
        y = (y.float() * w.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)

    return run


def method_dense(layer: Layer, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    w13, w2 = torch.cat([layer.w1[0], layer.w3[0]], dim=0), layer.w2[0]
    rows: dict[int, Tensor] = {}

    def run(x: Tensor) -> Tensor:
        # T * k rows, prepared once per size: only the two GEMMs and SiLU*mul are timed.
        xr = rows.setdefault(x.shape[0], x.repeat_interleave(layer.shape.top_k, dim=0))
        gate, up = F.linear(xr, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    return run


METHODS = {"op": method_op, "op, pointers": method_op_pointers, "eager": method_eager,
           "grouped_mm": method_grouped_mm, "dense": method_dense}

# Candidates for --sweep: (block_m, block_n, block_k, num_warps, num_stages, down_block_n, group_m,
# tma). Every one builds for sm_90 with no spills (cuobjdump's resource usage: STACK 0, LOCAL 0)
# and within the H200's 227 KB of shared memory (checked without a GPU). 2026-12-04: the
# tile-major orders (group_m 1) and the 16x64 tile, never the best on the H200, left; the three
# configs choose_config picks by pointers (the best of the third lease's sweep) stay, beside them
# through TMA descriptors (fbbe929's successor: the weights and the down kernel's rows as bulk
# tensor copies; 172 registers for the 128x128 gate/up tile, 255 by pointers) and the tiles that
# TMA's lower register count and deeper pipelines may make pay. A 128x256 gate/up tile spills.
# Since the fourth lease, 256x64 through TMA (244 registers, no spills): one tile a NucleusMoE
# expert at 4096 tokens, so each weight tile is read once per expert where that op is 1.37x dense.
SWEEP = [(64, 64, 64, 4, 4, 128, 16, False), (128, 64, 64, 8, 3, 128, 8, False), (128, 128, 64, 8, 3, 256, 8, False),
         (64, 64, 64, 4, 4, 128, 16, True), (128, 64, 64, 8, 3, 128, 8, True), (128, 128, 64, 8, 3, 256, 8, True),
         (128, 64, 64, 8, 4, 128, 8, True), (128, 128, 64, 8, 4, 256, 8, True), (128, 128, 64, 8, 4, 128, 8, True),
         (64, 128, 64, 4, 4, 128, 8, True), (64, 128, 64, 8, 4, 256, 8, True), (128, 128, 64, 8, 3, 256, 16, True),
         (128, 128, 128, 8, 2, 256, 8, True), (256, 64, 64, 8, 3, 128, 8, True)]


def sweep_kernel(layer: Layer, bias: Tensor | None, x: Tensor) -> str:
    """Time the Triton launcher alone (routing precomputed) under each SWEEP config: the best one and
    how the default heuristic compares, for tuning choose_config."""
    from dit_compile.kernels.moe import MoEConfig, choose_config, moe_ffn_triton

    w, ids = route(x, layer, bias)
    default = choose_config(ids.numel(), layer.shape.num_experts, x.dtype)
    configs = {default} | {MoEConfig(*c) for c in SWEEP}
    ref = moe_ffn_reference(x.float(), ids, w.float(), layer.w1.float(), layer.w3.float(), layer.w2.float())
    times = {}
    for cfg in configs:
        run = lambda: moe_ffn_triton(x, ids, w, layer.w1, layer.w3, layer.w2, config=cfg)  # noqa: E731
        try:
            error = ((run().float() - ref).abs().max() / ref.abs().max()).item()
            if error >= 2e-2:  # a config that computes something else is never a candidate
                print(f"  config {cfg} wrong: max error {error:.3g} of max |ref|", file=sys.stderr)
                continue
            times[cfg] = triton.testing.do_bench(run, warmup=5, rep=30, return_mode="median")
        except Exception as error:  # e.g. out of shared memory for this config on this GPU
            print(f"  config {cfg} failed: {type(error).__name__}", file=sys.stderr)
    del ref
    best = min(times, key=times.get)
    def fmt(c: MoEConfig) -> str:
        return (f"m{c.block_m} n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages} dn{c.down_block_n} "
                f"g{c.group_m}{' tma' if c.tma else ''}")
    every = ", ".join(f"{fmt(c)} {t:.3f}" for c, t in sorted(times.items(), key=lambda ct: ct[1]))
    return (f"best {fmt(best)} {times[best]:.3f} ms; default {fmt(default)} "
            f"{times.get(default, float('nan')):.3f} ms; all: {every}")


def host_ms(run: Callable[[Tensor], Tensor], x: Tensor, calls: int = 20) -> float:
    """Milliseconds the host takes to issue one call, the device left to catch up afterwards. Near
    the device time, the method is bound by its launches (or waits on the device, as eager
    dispatch does for its token counts), not by its kernels."""
    import time
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run(x)
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


# ---------------------------------------------------------------------------------------------------


def check(name: str, run: Callable[[Tensor], Tensor], layer: Layer, bias: Tensor | None, x: Tensor) -> str | None:
    """None when ``run(x)`` matches the float32 reference, else why not."""
    if name == "dense":
        return None  # different math by design
    try:
        out = run(x)
    except Exception as error:  # an unsupported path (e.g. grouped_mm on this GPU) is reported, not fatal
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    w, ids = route(x, layer, bias)
    ref = moe_ffn_reference(x.float(), ids, w.float(), layer.w1.float(), layer.w3.float(), layer.w2.float())
    error = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    return None if error < 2e-2 else f"max error {error:.3g} of max |ref|"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["hidream", "nucleus"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096, 8192, 16384])
    parser.add_argument("--routing", nargs="+", choices=["uniform", "zipf"], default=["uniform", "zipf"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's tile configs (slower)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("moe_bench needs a CUDA device")
    device, dtype = "cuda", torch.bfloat16

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"grouped_mm: {getattr(GROUPED_MM, '__module__', None)}.{getattr(GROUPED_MM, '__name__', None)}")
    print()
    print("| model | tokens | routing | busiest expert | method | ms | TFLOP/s | vs eager | host ms |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for model in args.models:
        layer = make_layer(SHAPES[model], device, dtype)
        shape = layer.shape
        for routing in args.routing:
            bias = zipf_bias(shape.num_experts, device) if routing == "zipf" else None
            runs = {name: METHODS[name](layer, bias) for name in args.methods}
            x_check = torch.randn(1024, shape.dim, device=device, dtype=dtype)
            failed = {name: check(name, run, layer, bias, x_check) for name, run in runs.items()}
            for num_tokens in args.tokens:
                x = torch.randn(num_tokens, shape.dim, device=device, dtype=dtype)
                _, ids = route(x, layer, bias)
                busiest = torch.bincount(ids.reshape(-1), minlength=shape.num_experts).max().item() / ids.numel()
                flops = 2 * 3 * num_tokens * shape.top_k * shape.dim * shape.hidden
                times, hosts = {}, {}
                for name, run in runs.items():
                    if failed[name] is None:
                        times[name] = triton.testing.do_bench(lambda: run(x), warmup=10, rep=50, return_mode="median")
                        hosts[name] = host_ms(run, x)
                for name in runs:
                    if failed[name] is not None:
                        cells = f"failed check: {failed[name]} | | | "
                    else:
                        ms = times[name]
                        speedup = f"{times['eager'] / ms:.2f}x" if "eager" in times else ""
                        cells = f"{ms:.3f} | {flops / ms / 1e9:.0f} | {speedup} | {hosts[name]:.3f}"
                    print(f"| {shape.name} | {num_tokens} | {routing} | {busiest:.0%} | {name} | {cells} |", flush=True)
                if args.sweep:
                    print(f"| {shape.name} | {num_tokens} | {routing} | | kernel sweep | {sweep_kernel(layer, bias, x)} | | | |")
                del x
        del layer, runs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
