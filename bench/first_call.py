"""Where a first call's time goes: Dynamo's trace against the compiles, for each way of compiling.

    python bench/first_call.py [--layers 30] [--device cpu|cuda] [--config tiny|1.3b] [--calls 40]
                               [--only NAME ...]

The model is bench/wan_speed.py's, at its latent and text shapes, with ``--layers`` blocks.

Issue 2 asks that mixcache's first generation (compile included) be no slower than regional
compilation's. Each method runs in a fresh process with empty Inductor and Triton caches, after
importing what a pipeline imports (diffusers' pipelines pull in transformers), so the first call
pays what a user's first generation pays for the transformer: Dynamo's trace and the compiles.
``dynamo trace only`` is ``backend="eager"``: the trace and nothing else. "blocks nested" calls
``dit_compile.nest_blocks(model)`` first (``torch.compiler.nested_compile_region`` on this model's
blocks), so that Dynamo traces one block and stamps out the rest (a user's one line; the backend
cannot shorten the trace it is handed); those rows are left out on a torch whose Dynamo traces
every nested call again (before 2.12). "blocks stamped" calls ``dit_compile.nest_blocks(model,
stamp=True)``: Dynamo traces the first block and the backend stamps it out for the rest
(``passes/stamping.py``), on any torch.
"background compile" rows set the option ``background_compile``: the regions compile in a child
process while the calls run uncompiled. What a first generation pays is then the "first N calls"
column (``--calls``: a generation's transformer calls, two a step with CFG, at timesteps falling
from 900), not the first call.
For mixcache the backend's own time (region pass, split, compiles) is read from its INFO log; the
rest of the first call is Dynamo and running the model once. The second call runs once the
background compile, if any, is in (``dit_compile.wait_for_compiles``); "all compiled by" is when
that was, from the first call's start (the first N calls' time where nothing compiles in the
background). Not a benchmark of per-call speed (bench/wan_speed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    "dynamo trace only": "eager",
    "regional (compile_repeated_blocks)": "regional",
    "mixcache, cache off": "mixcache",
    "mixcache, cache off, regions=blocks": "blocks",
    "dynamo trace only, blocks nested": "nested-eager",
    "mixcache, cache off, blocks nested": "nested-mixcache",
    "mixcache, cache off, regions=blocks, blocks nested": "nested-blocks",
    "mixcache, cache off, blocks stamped": "stamped-mixcache",
    "mixcache, cache off, regions=blocks, blocks stamped": "stamped-blocks",
    "mixcache, cache off, background compile": "background-mixcache",
    "mixcache, cache off, regions=blocks, background compile": "background-blocks",
    "mixcache, cache off, regions=blocks, blocks stamped, background compile":
        "stamped-background-blocks",
}

# The latent (batch, channels, frames, height, width) and text tokens wan_speed.py feeds each
# of its configurations (64x64x5 and 480x832x33 through the VAE's 4x8x8 compression).
SHAPES = {"tiny": ((1, 16, 2, 8, 8), 16), "1.3b": ((1, 16, 9, 60, 104), 512)}


def one(method: str, layers: int, device: str, config: str, calls: int) -> dict:
    """Runs in the child process: build, compile, time the first and second call."""
    import logging
    import re
    import time

    import diffusers.pipelines  # noqa: F401  what a pipeline process has imported
    import torch
    from diffusers import WanTransformer3DModel

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("dit_compile").addHandler(handler)
    logging.getLogger("dit_compile").setLevel(logging.INFO)

    from wan_speed import CONFIGS, model_kwargs
    kw = {**CONFIGS[config], "num_layers": layers}
    latent, text = SHAPES[config]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):     # random init on the device: seconds, not minutes, at 1.3B
        m = WanTransformer3DModel(**model_kwargs(kw))
    m = m.to(dtype).eval()
    x = torch.randn(latent, device=device, dtype=dtype)
    e = torch.randn(1, text, kw["text_dim"], device=device, dtype=dtype)
    import dit_compile
    if method.startswith(("nested-", "stamped-")):
        dit_compile.nest_blocks(m, stamp=method.startswith("stamped-"))
        method = method.partition("-")[2]
    background = method.startswith("background-")
    method = method.removeprefix("background-")
    if method == "regional":
        m.compile_repeated_blocks(fullgraph=True)
        f = m
    elif method == "eager":
        f = torch.compile(m, backend="eager", fullgraph=True)
    else:
        opts = {"cache": None, **({"regions": "blocks"} if method == "blocks" else {}),
                **({"background_compile": True} if background else {})}
        f = torch.compile(m, backend="mixcache", fullgraph=True, options=opts)

    def call(t: float) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            f(x, torch.tensor([t], device=device), e, return_dict=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    start = time.perf_counter()
    first = call(900.0)
    generation = first + sum(call(900.0 - 800.0 * i / calls) for i in range(1, calls))
    dit_compile.wait_for_compiles(f)
    ready = time.perf_counter() - start     # the calls, then what a background compile had left
    second = call(100.0)
    backend = next((float(m.group(1)) for r in records
                    if (m := re.search(r"backend ([\d.]+) s", r))), None)
    return {"first": first, "generation": generation, "ready": ready, "second": second,
            "backend": backend}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=None,
                    help="methods whose name contains one of these")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.layers, args.device, args.config, args.calls)))
        return

    import diffusers
    import torch
    from dit_compile.passes.nesting import reuses_nested_regions
    rows, skipped = [], []
    for name, method in METHODS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        if method.startswith("nested-") and not reuses_nested_regions():
            skipped.append(name)    # slower there, measured on a CPU: see nest_blocks' warning
            continue
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(cache, "triton"), PYTHONWARNINGS="ignore")
            out = subprocess.run([sys.executable, __file__, "--child", method, "--layers",
                                  str(args.layers), "--device", args.device, "--config", args.config,
                                  "--calls", str(args.calls)],
                                 env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, r))
        print(f"done: {name}: first call {r['first']:.2f} s", file=sys.stderr)

    print(f"`python bench/first_call.py --layers {args.layers} --device {args.device} --config "
          f"{args.config} --calls {args.calls}`\n\n{args.config} Wan, {args.layers} layers, {args.device}, torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}, {os.cpu_count()} CPUs; each "
          "method in a fresh process with empty compile caches\n")
    print(f"| method | first call, s | of which mixcache's backend, s | first {args.calls} calls, s "
          "| all compiled by, s | a call after, s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        backend = f"{r['backend']:.2f}" if r["backend"] is not None else "-"
        print(f"| {name} | {r['first']:.2f} | {backend} | {r['generation']:.2f} | "
              f"{r['ready']:.2f} | {r['second']:.3f} |")
    if skipped:
        names = "; ".join(f"`{n}`" for n in skipped)
        print(f"\nNot run: {names}. torch {torch.__version__} traces every call of a "
              "nested compile region again (Dynamo reuses one from torch 2.12 on), so nesting "
              "only makes its trace longer.")


if __name__ == "__main__":
    main()
