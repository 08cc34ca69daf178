"""Choose MixCache presets on cases the evaluation never sees.

    python bench/tune_presets.py --model small [--cases 16] [--sweep default|hybrid|FILE.json] [--replay]

The evaluation cases of ``bench/quality.py`` are seeds ``0..15`` with conditions from one fixed
RNG; tuning on them would grade the presets on their own training set. Here the cases are seeds
``500..`` with conditions from another RNG, and each configuration reports only what the choice
needs: the mean fraction of FLOPs computed (the backend's own record) and PSNR against full
compute (mean and worst case). No timing: that is the harness's job, on the evaluation cases.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import quality  # noqa: E402
import train  # noqa: E402


def tuning_cases(n: int) -> list[quality.Case]:
    rng = random.Random(77)
    sizes = (len(data.SHAPES), len(data.COLOURS), len(data.MOTIONS), len(data.BACKGROUNDS))
    return [quality.Case(data.Condition(*[rng.randrange(k) for k in sizes]), 500 + i)
            for i in range(n)]


def default_sweep() -> dict[str, Any]:
    """The presets, the budgets and reuse bounds around them at first and second order, and uniform
    cadences to beat."""
    sweep: dict[str, Any] = {p: p for p in ("quality", "balanced", "fast")}
    for max_reuse in (1, 2, 3):
        for budget in (0.004, 0.008, 0.012, 0.016, 0.024):
            sweep[f"budget {budget} max_reuse {max_reuse}"] = {
                "rule": "mixcache", "budget": budget, "max_reuse": max_reuse, "extrapolate": 1}
    for max_reuse, budgets in ((1, (0.006, 0.008, 0.01)), (2, (0.012, 0.016, 0.02, 0.024)),
                               (3, (0.02, 0.024, 0.03))):
        for budget in budgets:
            sweep[f"order 2 budget {budget} max_reuse {max_reuse}"] = {
                "rule": "mixcache", "budget": budget, "max_reuse": max_reuse, "extrapolate": 2}
    for order in (1, 2):
        sweep[f"every 2nd step reused from step 3, order {order}"] = {
            "rule": "schedule", "step": list(range(3, 20, 2)), "extrapolate": order}
        sweep[f"2 of 3 steps reused from step 2, order {order}"] = {
            "rule": "schedule", "step": [k for k in range(2, 20) if k % 3 != 0],
            "extrapolate": order}
        sweep[f"steps 0, 1, 4, 7, ..., 16, 18 computed, order {order}"] = {
            "rule": "schedule", "step": [k for k in range(2, 20) if k not in (4, 7, 10, 13, 16, 18)],
            "extrapolate": order}
    return sweep


def hybrid_sweep() -> dict[str, Any]:
    """``balanced`` with cfg and block reuse allowed beside step reuse, and forced schedules that
    set block reuse against whole-step reuse at the same steps."""
    sweep: dict[str, Any] = {"balanced": "balanced"}
    for gran in (("step", "block"), ("step", "cfg"), ("step", "cfg", "block")):
        for budget, max_reuse in ((0.02, 2), (0.03, 3)):
            sweep[f"{' + '.join(gran)}, budget {budget} max_reuse {max_reuse}"] = {
                "rule": "mixcache", "extrapolate": 2, "granularities": list(gran),
                "budget": budget, "max_reuse": max_reuse}
    forced = {"block reuse at steps 7, 13": dict(block=[7, 13]),
              "step reuse at steps 7, 13, order 2": dict(step=[7, 13], extrapolate=2),
              "step reuse at steps 7, 13, order 0": dict(step=[7, 13], extrapolate=0),
              "block reuse at steps 5-8": dict(block=[5, 6, 7, 8]),
              "step reuse at steps 5-8, order 0": dict(step=[5, 6, 7, 8], extrapolate=0)}
    return {**sweep, **{k: {"rule": "schedule", **v} for k, v in forced.items()}}


def replay(name: str, steps: int) -> None:
    """The steps each preset reused (per guidance branch) on the 16 evaluation cases, and how often
    each schedule occurred: the most common one is what a real-size replay should force."""
    import collections

    import dit_compile
    torch.set_num_threads(1)
    model = train.load(name)
    pipe = model.pipeline()
    with torch.no_grad():
        for preset in ("quality", "balanced", "fast"):
            torch._dynamo.reset()
            pipe.transformer = torch.compile(model.transformer, backend="mixcache",
                                             options={"regions": "eager", "cache": preset})
            seen: collections.Counter = collections.Counter()
            for case in quality.make_cases(16):
                dit_compile.reset(pipe.transformer)
                start = len(quality.mixcache_trace(pipe.transformer))
                model.sample(pipe, case.condition, case.seed, steps=steps)
                trace = quality.mixcache_trace(pipe.transformer)[start:]
                seen[tuple(tuple(r["step"] for r in trace if r["branch"] == b and
                                 r["action"] == "step") for b in (0, 1))] += 1
            for (b0, b1), n in seen.most_common():
                print(f"{name} {preset}: {n}/16 cases reused steps {list(b0)} (branch 0), "
                      f"{list(b1)} (branch 1)")
            pipe.transformer = model.transformer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sweep", default="default",
                    help="'default', 'hybrid' (cfg and block reuse beside step reuse) or a JSON "
                         "file {name: cache}")
    ap.add_argument("--replay", action="store_true",
                    help="print, per preset, the steps it reused on each evaluation case (the "
                         "forced schedules bench/wan_speed.py replays at real size)")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.model, args.steps)
    torch.set_num_threads(1)
    sweep = ({"default": default_sweep, "hybrid": hybrid_sweep}[args.sweep]()
             if args.sweep in ("default", "hybrid") else json.load(open(args.sweep)))
    model = train.load(args.model)
    pipe = model.pipeline()
    cases = tuning_cases(args.cases)
    import dit_compile
    with torch.no_grad():
        refs = [model.sample(pipe, c.condition, c.seed, steps=args.steps) for c in cases]
        print(f"model `{args.model}`, {args.cases} tuning cases, {args.steps} steps\n")
        print("| configuration | FLOPs computed | PSNR dB mean (min) |\n|---|---|---|")
        for name, cache in sweep.items():
            torch._dynamo.reset()
            pipe.transformer = torch.compile(model.transformer, backend="mixcache",
                                             options={"regions": "eager", "cache": cache})
            psnrs, fracs = [], []
            for case, ref in zip(cases, refs):
                dit_compile.reset(pipe.transformer)
                seen = len(quality.mixcache_trace(pipe.transformer))
                out = model.sample(pipe, case.condition, case.seed, steps=args.steps)
                trace = quality.mixcache_trace(pipe.transformer)[seen:]
                fracs.append(sum(r["flops"] for r in trace) / len(trace))
                psnrs.append(quality.psnr(out, ref))
            print(f"| {name} | {sum(fracs) / len(fracs):.3f} | "
                  f"{sum(psnrs) / len(psnrs):.1f} ({min(psnrs):.1f}) |", flush=True)
            pipe.transformer = model.transformer
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
