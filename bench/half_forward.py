"""What batched CFG's half-batch forward adds to a first generation: a tiny CogVideoX in diffusers'
CogVideoXPipeline (both guidance branches in one call), cfg reuse forced at steps 2 and 3, so the
half forward is compiled at step 2. Each run in a fresh process with an empty Inductor cache:

    python bench/half_forward.py --layers 12            # the half forward region by region
    python bench/half_forward.py --layers 12 --whole    # as before 2026-12-06: one Inductor graph
"""
import argparse
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--regions", default="inductor", choices=["inductor", "blocks"])
    ap.add_argument("--whole", action="store_true",
                    help="compile the half forward's graph whole, with plain Inductor")
    args = ap.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()   # before Inductor reads it
    import torch
    import diffusers
    import dit_compile  # noqa: F401  (the backend's module, to patch below)
    from dit_compile import backend
    from torch._inductor.compile_fx import compile_fx
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pipelines
    from dit_compile.runtime.halves import HalfBatch
    if args.whole:
        backend.compile_regions = lambda gm, inputs, model, opts: compile_fx(gm, inputs)
    half_calls = []        # seconds of each half forward call, the first one compiling it
    real_call = HalfBatch.__call__

    def timed(self, *a, **k):
        start = time.perf_counter()
        try:
            return real_call(self, *a, **k)
        finally:
            half_calls.append(time.perf_counter() - start)
    HalfBatch.__call__ = timed
    model = pipelines.cogvideox_transformer(args.layers)
    pipe = pipelines.cogvideox_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": args.regions, "cache": {"rule": "schedule", "cfg": [2, 3]}})
    times = []
    for _ in range(2):
        start = time.perf_counter()
        pipelines.run_cogvideox(pipe, args.steps)
        times.append(time.perf_counter() - start)
    print(f"tiny CogVideoX, {args.layers} layers, {args.steps} steps, regions={args.regions}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{os.cpu_count()} CPUs: half forward {'whole' if args.whole else 'by regions'}: "
          f"first generation {times[0]:.2f} s (its first half forward call {half_calls[0]:.2f} s), "
          f"second {times[1]:.2f} s")


if __name__ == "__main__":
    main()
