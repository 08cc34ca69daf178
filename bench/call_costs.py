"""Where a cached generation's time goes: transformer calls by what the runtime did, and the pipeline.

    python bench/call_costs.py --model small [--preset balanced] [--cases 4] [--device cuda]

A generation's wall time is its computed calls, its reused calls (the runtime's bookkeeping and
the extrapolation, which FLOPs do not count) and the pipeline's own work between calls (scheduler
step, guidance combine), which no cache skips. The FLOPs fraction bounds the speedup only where the
last two are nothing: this says how far from nothing they are. Full compute and the preset, same
cases, one process; each call timed by forward hooks on the compiled model (after a
synchronize on CUDA, so a call's kernels are charged to it). Not a benchmark of the method
(that is bench/quality.py); a breakdown.

A reused call is split in two, in the same run: the runtime's own part (finding the state, the
decision, the extrapolation, the record), timed around the executor, where no graph runs in such a
call; and the rest of the call as the hooks see it, which is Dynamo's (the guards it checks, the
wrappers it runs before and after what the backend returned) and the hooks'. Medians: a call
that a collection or the OS interrupts would move a mean.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import train  # noqa: E402


def breakdown(model: train.Trained, cache, cases: list[quality.Case], steps: int) -> dict:
    """Mean per generation: total and pipeline milliseconds, and per action (calls, ms per call)."""
    import dit_compile
    from dit_compile.runtime.cache import find_state
    from dit_compile.runtime.executor import GuardedExecutor
    # Read once: diffusers' `device` walks the parameters (0.2 ms on `small`, on the CPU), which
    # would be charged to every timed call.
    device = model.device
    torch._dynamo.reset()
    f = torch.compile(model.transformer, backend="mixcache",
                      options={"regions": "eager", "cache": cache})
    pipe = model.pipeline()
    pipe.transformer = f
    times: dict[str, list[float]] = collections.defaultdict(list)
    own: list[float] = []       # each call's time inside the runtime (the executor)
    reused: list[tuple[float, float]] = []   # a reused call: as the hooks see it, in the runtime
    start = [0.0]
    # The breakdown's own work between calls (finding the state to read the record, the reset
    # between cases) is timed and left out of the total: charged to the pipeline, it made the
    # cached run's pipeline look 7 ms a generation slower than full compute's on `small`.
    bookkeeping = [0.0]
    executor_call = GuardedExecutor.__call__

    def timed_executor(self, *args):
        t0 = time.perf_counter()
        out = executor_call(self, *args)
        train.synchronize(device)
        own.append(time.perf_counter() - t0)
        return out

    def before(module, args):
        train.synchronize(device)
        start[0] = time.perf_counter()

    def after(module, args, out):
        train.synchronize(device)
        t1 = time.perf_counter()
        elapsed = t1 - start[0]
        # The runtime's last record, read directly: dit_compile.stats builds the whole trace, which
        # would charge a growing cost to every call.
        state = find_state(f) if cache is not None else None
        action = state.records[-1].action if state is not None else "compute"
        times[action].append(elapsed)
        if action == "step":
            reused.append((elapsed, own[-1]))
        bookkeeping[0] += time.perf_counter() - t1

    f.register_forward_pre_hook(before)
    f.register_forward_hook(after)
    GuardedExecutor.__call__ = timed_executor
    try:
        with torch.no_grad():
            model.sample(pipe, cases[0].condition, cases[0].seed, steps=steps)     # warm-up
            times.clear()
            reused.clear()
            bookkeeping[0] = 0.0
            t0 = time.perf_counter()
            for case in cases:
                if cache is not None:
                    t1 = time.perf_counter()
                    dit_compile.reset(f)
                    bookkeeping[0] += time.perf_counter() - t1
                model.sample(pipe, case.condition, case.seed, steps=steps)
            total = time.perf_counter() - t0 - bookkeeping[0]
    finally:
        GuardedExecutor.__call__ = executor_call
    n = len(cases)
    inside = sum(sum(v) for v in times.values())
    return {"total": 1e3 * total / n, "pipeline": 1e3 * (total - inside) / n,
            "calls": {a: (len(v) / n, 1e3 * sum(v) / len(v)) for a, v in times.items()},
            "reused": [1e3 * _median(v) for v in zip(*reused)] if reused else None}


def _median(v: tuple[float, ...]) -> float:
    return sorted(v)[len(v) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--cases", type=train.positive, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", type=train.device_arg, default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = train.load(args.model, device=args.device)
    cases = quality.make_cases(args.cases)
    full = breakdown(model, None, cases, args.steps)
    ours = breakdown(model, args.preset, cases, args.steps)
    print(f"`python bench/call_costs.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
          f"model `{args.model}`, {args.cases} cases, {args.steps} steps, "
          f"{train.runtime_info(model.device)['device_name']}, torch {torch.__version__}\n")
    print("| method | ms / generation | pipeline, ms | calls: count x ms each |\n|---|---|---|---|")
    for name, r in (("full compute", full), (f"mixcache {args.preset}", ours)):
        calls = ", ".join(f"{a} {k:g} x {ms:.2f}" for a, (k, ms) in r["calls"].items())
        print(f"| {name} | {r['total']:.1f} | {r['pipeline']:.1f} | {calls} |")
    computed = sum(k * ms for a, (k, ms) in ours["calls"].items() if a != "step")
    print(f"\nspeedup {full['total'] / ours['total']:.2f}x; with the reused calls and the pipeline "
          f"free it would be {full['total'] / computed:.2f}x")
    if ours["reused"] is not None:
        call, own = ours["reused"]
        print(f"a reused call (medians): {call:.3f} ms as the hooks see it, of which the runtime's "
              f"own {own:.3f} ms; the rest, Dynamo's and the hooks': {call - own:.3f} ms")


if __name__ == "__main__":
    main()
