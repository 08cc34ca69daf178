"""Demo: a tiny diffusers Wan transformer in diffusers' WanPipeline, compiled with
backend="mixcache"; prints time per generation and fidelity against eager full compute.

    python bench/demo.py [--steps 20] [--layers 8]

Random weights: a random network has little step-to-step redundancy, so the cached run here shows
the mechanism and its cost, not the quality a trained model keeps (see bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import pipelines  # noqa: E402

import dit_compile  # noqa: E402


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x.float() - ref.float()) ** 2).mean())
    peak = float(ref.float().abs().max()) or 1.0
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def timed(pipe, steps: int, reps: int = 3) -> tuple[torch.Tensor, float, float]:
    t0 = time.perf_counter()
    out = pipelines.run_wan(pipe, steps)           # first generation: compiles
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        out = pipelines.run_wan(pipe, steps)
    return out, first, (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> list[tuple]:
    """Print the table; return its rows (method, s/gen, first gen, PSNR dB, FLOPs fraction)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
                                  ffn_dim=128, num_layers=args.layers, rope_max_seq_len=64).eval()
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        print(dit_compile.explain(model, hidden_states=torch.randn(1, 4, 2, 8, 8),
                                  timestep=torch.tensor([500.0]),
                                  encoder_hidden_states=torch.randn(1, 8, 16), return_dict=False))
        ref, _, t_eager = timed(pipe, args.steps)
        rows = [("eager", t_eager, None, float("inf"), 1.0)]
        runs = [("inductor", dict(backend="inductor")),
                ("mixcache (cache off)", dict(backend="mixcache", options={"cache": None})),
                ("mixcache (default: balanced)", dict(backend="mixcache")),
                ("mixcache first_block+fastercache",
                 dict(backend="mixcache", options={"cache": [
                     {"rule": "first_block", "threshold": 0.2, "start": 4},
                     {"rule": "fastercache", "every": 2, "start": 4}]}))]
        for name, kw in runs:
            torch._dynamo.reset()
            pipe.transformer = torch.compile(model, **kw)
            out, first, t = timed(pipe, args.steps)
            try:
                frac = dit_compile.stats(pipe.transformer)["flops_fraction"]
                dit_compile.reset(pipe.transformer)
            except ValueError:      # nothing cached (inductor, or cache=None): all computed
                frac = 1.0
            rows.append((name, t, first, psnr(out, ref), frac))
    print(f"\n{args.steps} steps, CFG 5.0, {args.layers} layers, torch {torch.__version__}, CPU threads "
          f"{torch.get_num_threads()}")
    print(f"{'method':36s} {'s/gen':>8s} {'first gen':>10s} {'speedup':>8s} {'PSNR dB':>8s} {'FLOPs':>6s}")
    for name, t, first, p, frac in rows:
        print(f"{name:36s} {t:8.3f} {first if first else float('nan'):10.2f} {t_eager / t:7.2f}x "
              f"{p:8.1f} {frac:6.2f}")
    return rows


if __name__ == "__main__":
    main()
