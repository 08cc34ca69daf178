"""Plot what MixCache decided during one generation: the action per step and branch, the error it
estimated for each reuse, and the error spent since the last full compute against the budget.

    python bench/trace_plot.py --model large --preset balanced --case 0 --out trace.png

Everything plotted comes from ``dit_compile.stats(model)["trace"]``, the record any user can read;
the case is one of the harness's evaluation cases (``bench/quality.py``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import train  # noqa: E402

MARKERS = {"compute": ("o", "black"), "step": ("s", "tab:blue"), "cfg": ("^", "tab:orange"),
           "block": ("D", "tab:green")}


def generation_trace(name: str, preset: str, case_index: int, steps: int) -> list[dict]:
    import dit_compile
    model = train.load(name)
    pipe = model.pipeline()
    case = quality.make_cases(max(16, case_index + 1))[case_index]
    pipe.transformer = torch.compile(model.transformer, backend="mixcache",
                                     options={"regions": "eager", "cache": preset})
    with torch.no_grad():
        model.sample(pipe, case.condition, case.seed, steps=steps)
    return dit_compile.stats(pipe.transformer)["trace"]


def plot(trace: list[dict], budget: float | None, title: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for r in trace:
        marker, colour = MARKERS[r["action"]]
        top.scatter(r["step"], r["branch"], marker=marker, color=colour, s=60)
    for action, (marker, colour) in MARKERS.items():
        top.scatter([], [], marker=marker, color=colour, label=action)
    top.set_yticks(sorted({r["branch"] for r in trace}))
    top.set_ylabel("guidance branch")
    top.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.25))
    for b in sorted({r["branch"] for r in trace}):
        rows = [r for r in trace if r["branch"] == b]
        reused = [r for r in rows if r["action"] != "compute"]
        bottom.plot([r["step"] for r in reused], [r["signal"] for r in reused], "s",
                    label=f"branch {b}: estimated error of the reuse")
        bottom.plot([r["step"] for r in rows], [r["spent"] or 0.0 for r in rows], "-",
                    label=f"branch {b}: error spent since the last compute")
    if budget is not None:
        bottom.axhline(budget, color="grey", ls="--", label="budget")
    bottom.set_xlabel("step")
    bottom.set_ylabel("output error x step length")
    bottom.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="large")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--case", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from dit_compile.runtime.mixcache import PRESETS
    trace = generation_trace(args.model, args.preset, args.case, args.steps)
    for r in trace:
        print(f"step {r['step']:2d} branch {r['branch']} t {r['t']:7.1f} {r['action']:8s} "
              f"flops {r['flops']:.2f} signal {r['signal'] if r['signal'] is None else round(r['signal'], 4)} "
              f"spent {r['spent'] if r['spent'] is None else round(r['spent'], 4)}")
    plot(trace, PRESETS.get(args.preset, {}).get("budget"),
         f"MixCache '{args.preset}' on model {args.model}, evaluation case {args.case} "
         f"({args.steps} steps): {sum(r['flops'] for r in trace) / len(trace):.2f} of the FLOPs",
         args.out)


if __name__ == "__main__":
    main()
