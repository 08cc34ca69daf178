"""Which cheap signal predicts the damage of reusing a step? (The MixCache trigger's question.)

    python bench/signal_study.py --model small [--cases 8]

On the tuning cases of ``tune_presets.py`` (never the evaluation cases): for every step ``k >= 2``
of a 20-step generation, the *damage* of reusing that one step (first-order extrapolated, all other
steps computed) is the mean squared error of the final video against full compute. Beside it, the
signals the runtime could have read at that call, each as the relative L1 change since the previous
step of the conditional branch:

* ``probe``: the first block's residual (First-Block-Cache's signal);
* ``input``: the latent entering the transformer;
* ``modulated``: the first block's timestep-modulated input, ``norm1(x) * (1 + scale) + shift``,
  where its attention reads it (TeaCache's signal);
* ``output``: the transformer's output (what step reuse replaces);

the estimates MixCache builds from the output (its rate of change per unit of timestep times the
distance to the last computed call; the change of that rate, for extrapolated reuse), and each of
them times the length of the step about to be taken (the last timestep spacing, capped at ``t``). Printed: Spearman's rank correlation of each signal with the damage, over all
(case, step) pairs (the higher, the better the signal orders the steps by what reusing them
costs), and the PSNR of the video when only step k is reused, per k.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import train  # noqa: E402
from tune_presets import tuning_cases  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    r = [0.0] * len(xs)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(_ranks(a)), torch.tensor(_ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def record_signals(model: train.Trained, pipe, case: quality.Case, steps: int) -> list[dict]:
    """Per step (conditional branch, the first call of each step): t, latent, the first block's
    modulated input, probe residual and output of a full-compute generation."""
    calls: list[dict] = []
    block0 = model.transformer.blocks[0]
    probe: dict[str, torch.Tensor] = {}

    def on_attention(mod, args, kwargs):
        probe["m"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def on_block(mod, args, kwargs, out):
        probe["r"] = (out - args[0]).detach().clone()

    def on_model(mod, args, kwargs, out):
        calls.append({"t": float(kwargs["timestep"].reshape(-1)[0]),
                      "input": kwargs["hidden_states"].detach().clone(),
                      "modulated": probe["m"], "probe": probe["r"],
                      "output": out[0].detach().clone()})

    hooks = [block0.attn1.register_forward_pre_hook(on_attention, with_kwargs=True),
             block0.register_forward_hook(on_block, with_kwargs=True),
             model.transformer.register_forward_hook(on_model, with_kwargs=True)]
    try:
        model.sample(pipe, case.condition, case.seed, steps=steps)
    finally:
        for h in hooks:
            h.remove()
    return calls[::2]          # WanPipeline: conditional call first, then unconditional


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import dit_compile
    model = train.load(args.model)
    pipe = model.pipeline()
    signals: dict[str, list[float]] = {}
    damage: list[float] = []
    per_step: dict[int, list[float]] = {}
    with torch.no_grad():
        for case in tuning_cases(args.cases):
            ref = model.sample(pipe, case.condition, case.seed, steps=args.steps)
            calls = record_signals(model, pipe, case, args.steps)
            t_first = calls[0]["t"]
            for k in range(2, args.steps):
                h = min(abs(calls[k]["t"] - calls[k - 1]["t"]), abs(calls[k]["t"])) / t_first
                t = [c["t"] for c in calls]
                rate = _rel(calls[k - 1]["output"], calls[k - 2]["output"]) / abs(t[k - 1] - t[k - 2])
                found = {
                    "probe": _rel(calls[k]["probe"], calls[k - 1]["probe"]),
                    "input": _rel(calls[k]["input"], calls[k - 1]["input"]),
                    "modulated": _rel(calls[k]["modulated"], calls[k - 1]["modulated"]),
                    # The output at k is what reuse replaces: the runtime has k-1 against k-2.
                    "output": _rel(calls[k - 1]["output"], calls[k - 2]["output"]),
                    "output rate x distance": rate * abs(t[k] - t[k - 1]),
                }
                if k >= 3:      # the slope's change needs three computed outputs
                    s1 = (calls[k - 1]["output"] - calls[k - 2]["output"]) / (t[k - 1] - t[k - 2])
                    s0 = (calls[k - 2]["output"] - calls[k - 3]["output"]) / (t[k - 2] - t[k - 3])
                    curv = float((s1 - s0).abs().mean() / calls[k - 1]["output"].abs().mean())
                    found["curvature x distance"] = curv * abs(t[k] - t[k - 1])
                else:
                    found["curvature x distance"] = found["output rate x distance"]
                for name, v in found.items():
                    signals.setdefault(name, []).append(v)
                    signals.setdefault(f"{name} x step length", []).append(v * h)
                torch._dynamo.reset()
                pipe.transformer = torch.compile(model.transformer, backend="mixcache", options={
                    "regions": "eager",
                    "cache": {"rule": "schedule", "step": [k], "extrapolate": True}})
                out = model.sample(pipe, case.condition, case.seed, steps=args.steps)
                dit_compile.reset(pipe.transformer)
                pipe.transformer = model.transformer
                damage.append(float(((out - ref) ** 2).mean()))
                per_step.setdefault(k, []).append(quality.psnr(out, ref))
    print(f"model `{args.model}`, {args.cases} tuning cases, steps 2..{args.steps - 1} "
          f"({len(damage)} single-step reuses)\n")
    print("| signal | Spearman with damage |\n|---|---|")
    for name, values in signals.items():
        print(f"| {name} | {spearman(values, damage):+.2f} |")
    print("\nPSNR (dB, mean over cases) of the video when only step k is reused:\n")
    print(" ".join(f"{k}: {sum(v) / len(v):.1f}" for k, v in per_step.items()))


if __name__ == "__main__":
    main()
