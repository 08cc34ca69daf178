"""Demo: a small trained diffusers Wan transformer in diffusers' WanPipeline, compiled with
backend="mixcache"; prints time per generation, speedup over eager, fidelity against eager full
compute (PSNR of the video, as bench/quality.py takes it) and the fraction of FLOPs computed.

    python bench/demo.py [--cases 2] [--steps 20]

The model is `bench/models/small`: diffusers' own ``WanTransformer3DModel`` (3 layers) trained by
bench/train.py on procedural videos (bench/models/README.md), sampled in pixel space. A cache can
only be judged on trained weights: a trained model's output changes slowly from step to step where
a random network's does not, and on random weights the presets rightly reuse next to nothing.
Full tables, diffusers' own caches beside them and the GPU figures: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import quality  # noqa: E402
import train  # noqa: E402

import dit_compile  # noqa: E402

METHODS = [
    ("inductor", dict(backend="inductor")),
    ("mixcache (cache off)", dict(backend="mixcache", options={"cache": None})),
    ("mixcache preset quality", dict(backend="mixcache", options={"cache": "quality"})),
    ("mixcache (default: balanced)", dict(backend="mixcache")),
    ("mixcache preset fast", dict(backend="mixcache", options={"cache": "fast"})),
]


def main(argv: list[str] | None = None) -> list[tuple]:
    """Print the table; return its rows (method, s/gen, first gen, mean PSNR dB, FLOPs fraction)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=train.positive, default=2, help="(condition, seed) pairs, each timed twice")
    ap.add_argument("--steps", type=train.positive, default=None, help="sampler steps (default: the model's 20)")
    args = ap.parse_args(argv)
    model = train.load("small")
    pipe = model.pipeline()
    cases = quality.make_cases(args.cases)

    def generate(case: quality.Case) -> torch.Tensor:
        return model.sample(pipe, case.condition, case.seed, steps=args.steps)

    def first_pass() -> tuple[list[torch.Tensor], float]:
        """Each case's video, and the first generation's seconds (compile included)."""
        t0 = time.perf_counter()
        videos = [generate(cases[0])]
        first = time.perf_counter() - t0
        return videos + [generate(case) for case in cases[1:]], first

    with torch.no_grad():
        c = model.config
        x = torch.randn(1, model.transformer.config.in_channels, c.frames, c.size, c.size)
        print(dit_compile.explain(model.transformer, hidden_states=x, timestep=torch.tensor([500.0]),
                                  encoder_hidden_states=model.condition.embed(cases[0].condition),
                                  return_dict=False))
        refs, _ = first_pass()
        compiled = {"eager": model.transformer}
        found = {"eager": (None, float("inf"), 1.0)}    # first gen, PSNR, FLOPs fraction
        for name, kw in METHODS:
            pipe.transformer = compiled[name] = torch.compile(model.transformer, **kw)
            videos, first = first_pass()
            try:
                frac = dit_compile.stats(pipe.transformer)["flops_fraction"]
            except ValueError:      # nothing cached (inductor, or cache=None): all computed
                frac = 1.0
            found[name] = (first, statistics.mean(quality.psnr(v, r) for v, r in zip(videos, refs)),
                           frac)
        # Timed in rounds over every method, each generation of every case twice: the machine's
        # speed drifts within a run, and methods timed one after another took it for theirs.
        seconds: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(2):
            for name, transformer in compiled.items():
                pipe.transformer = transformer
                for case in cases:
                    t0 = time.perf_counter()
                    generate(case)
                    seconds[name].append(time.perf_counter() - t0)
        rows = [(name, statistics.median(seconds[name]), *found[name]) for name in compiled]
    t_eager = rows[0][1]
    print(f"\n`small` (trained), {args.cases} cases, {args.steps or c.sample_steps} steps, CFG "
          f"{c.guidance}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    print(f"{'method':30s} {'s/gen':>7s} {'first gen':>10s} {'speedup':>8s} {'PSNR dB':>8s} "
          f"{'FLOPs':>6s}")
    for name, t, first, p, frac in rows:
        shown = "ref" if name == "eager" else f"{p:.1f}"
        print(f"{name:30s} {t:7.3f} {first if first else float('nan'):10.2f} {t_eager / t:7.2f}x "
              f"{shown:>8s} {frac:6.2f}")
    print(f"(PSNR: mean over the cases against eager full compute, capped at {quality.PSNR_CAP:g}"
          " for identical videos; FLOPs: the fraction of the transformer's computed)")
    return rows


if __name__ == "__main__":
    main()
