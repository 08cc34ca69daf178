"""Speed at real shapes (GPU): Wan2.1-T2V-1.3B-shaped transformer (random bf16 weights) inside
diffusers' WanPipeline, 480x832, 33 frames, 512 text tokens, CFG 5.0, UniPC flow shift 3.0.

    python bench/wan_speed.py [--steps 20] [--config 1.3b|14b|tiny] [--only NAME ...] [--reps 2]

Methods, in one process: eager, plain torch.compile (Inductor), diffusers' regional compilation
(compile_repeated_blocks), mixcache with caching off (also with its regions compiled in the
background), and mixcache forced schedules next to the
fraction of FLOPs they compute, and (at 20 steps) the schedules the MixCache presets chose on the
trained models, replayed; diffusers' First-Block-Cache under regional compilation, always reusing,
is issue 3's anchor. Prints a markdown table with the command, device, versions, date.
``--config tiny`` is a CPU smoke test of the script itself, not a measurement.
"""
from __future__ import annotations

import argparse
import tempfile
import copy
import datetime
import logging
import platform
import shlex
import sys
import time

import torch

CONFIGS = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                 text_dim=4096, in_channels=16, out_channels=16, freq_dim=256),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                text_dim=4096, in_channels=16, out_channels=16, freq_dim=256),
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=4,
                 text_dim=32, in_channels=16, out_channels=16, freq_dim=32),
}


def model_kwargs(config: dict) -> dict:
    """WanTransformer3DModel's arguments for one of CONFIGS (the Wan2.1 fixed settings added)."""
    return dict(patch_size=(1, 2, 2), cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, rope_max_seq_len=1024, **config)


def schedules(steps: int, layers: int) -> dict[str, dict]:
    from dit_compile.runtime.mixcache import PRESETS
    half = list(range(2, steps, 2))
    return {
        "mixcache step 1/2": {"rule": "schedule", "step": half},
        "mixcache cfg 1/2": {"rule": "schedule", "cfg": list(range(1, steps, 2))},
        "mixcache blocks 2-N 1/2": {"rule": "schedule", "block": half},
        "mixcache blocks 2-N 19/20 (FBCache anchor)": {"rule": "schedule", "block": list(range(1, steps))},
        "mixcache mix": {"rule": "schedule", "step": list(range(4, steps, 4)),
                         "cfg": list(range(1, steps, 2)), "block": list(range(2, steps, 4))},
        **({f"replayed {p} (large)": {"rule": "schedule", "step": s,
                                       "extrapolate": PRESETS[p]["extrapolate"]}
            for p, s in REPLAYED.items()} if steps == 20 else {}),
    }


# The steps each MixCache preset reused on the trained `large` model (the most common schedule
# over the 16 evaluation cases, the same on both guidance branches), from
# `python bench/tune_presets.py --model large --replay`. Replayed at real size as forced schedules,
# extrapolated to the preset's order, they say what wall-clock speedup those decisions give there
# (random weights: no quality claim).
REPLAYED = {
    "quality": [2, 4, 6, 8, 10, 12, 14, 16, 19],
    "balanced": [2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 19],
    "fast": [2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 17, 19],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--config", default="1.3b", choices=sorted(CONFIGS))
    ap.add_argument("--only", nargs="*", default=None)
    # Timed generations per method after the first: 2 keeps the whole table inside a device call;
    # more tell a small gap (the cfg row's 2.8% on the H200, 2026-12-04) from the run's noise.
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    # The backend's compile-time breakdown (per distinct piece) to stderr: the first-generation
    # column is Dynamo's trace plus these.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("dit_compile").setLevel(logging.INFO)
    import diffusers
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    import dit_compile
    from dit_compile.frames import install_trace_hook

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tiny = args.config == "tiny"
    h, w, frames, text = (64, 64, 5, 16) if tiny else (480, 832, 33, 512)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**model_kwargs(CONFIGS[args.config]))
    model = model.to(dev, dtype).eval()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(dev).manual_seed(0)
    embeds = torch.randn(1, text, CONFIGS[args.config]["text_dim"], device=dev, dtype=dtype, generator=g)
    neg = torch.randn_like(embeds)

    def generate():
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, height=h, width=w,
                   num_frames=frames, num_inference_steps=args.steps, guidance_scale=5.0,
                   output_type="latent", generator=torch.Generator(dev).manual_seed(1)).frames
        if cuda:
            torch.cuda.synchronize()
        return out

    def measure(reps: int = args.reps):
        t0 = time.perf_counter()
        out = generate()
        first = time.perf_counter() - t0
        # A background compile still running (option background_compile) would be timed here
        # uncompiled: the timed generations start once it is in.
        dit_compile.wait_for_compiles(pipe.transformer)
        t0 = time.perf_counter()
        for _ in range(reps):
            out = generate()
        return out, first, (time.perf_counter() - t0) / reps

    def nested(m: torch.nn.Module) -> torch.nn.Module:
        dit_compile.nest_blocks(m)
        return m

    def fp8(m: torch.nn.Module) -> torch.nn.Module:
        # diffusers' layerwise casting: weights stored in float8, each layer cast as it runs.
        m = copy.deepcopy(m)
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        return m

    methods: list[tuple[str, object]] = [
        ("eager", lambda: model),
        ("torch.compile (inductor)", lambda: torch.compile(model)),
        ("regional (compile_repeated_blocks)", "regional"),
        ("mixcache (cache off)", lambda: torch.compile(model, backend="mixcache",
                                                       options={"cache": None})),
        # Inductor for the blocks only: how much of the first generation the prologue's and the
        # epilogue's compiles cost, and what they save per generation.
        ("mixcache (cache off, blocks compiled)", lambda: torch.compile(
            model, backend="mixcache", options={"cache": None, "regions": "blocks"})),
        # The regions compiled in a child process while the first generation runs uncompiled: the
        # first generation's column is the point (the compile no longer waited for).
        ("mixcache (cache off, background compile)", lambda: torch.compile(
            model, backend="mixcache", options={"cache": None, "background_compile": True})),
        # The blocks as nested compile regions (a shorter first trace): what the copies that
        # keep a nested region's inputs and outputs unaliased cost per generation, if anything.
        ("mixcache (cache off, blocks nested)", lambda: torch.compile(
            nested(copy.deepcopy(model)), backend="mixcache", options={"cache": None})),
    ]
    # Weights stored in float8 (diffusers' enable_layerwise_casting), which mixcache traces as
    # casts of the weights (passes/casting.py): time and peak memory against the same storage
    # run eagerly (its own max abs diff: float8's rounding, not the backend's).
    methods += [
        ("fp8 layerwise casting: eager", lambda: fp8(model)),
        ("fp8 layerwise casting: mixcache, cache off", lambda: torch.compile(
            fp8(model), backend="mixcache", options={"cache": None})),
        ("fp8 layerwise casting: mixcache balanced", lambda: torch.compile(
            fp8(model), backend="mixcache")),
    ]
    # The deployable form: the rewritten model exported, each region compiled ahead of time by
    # AOTInductor, loaded in its place (no trace, no compile at load; export time in the name).
    # Named so that no other selection ("cache off") picks it: on the GPU (torch 2.11, H200) loading
    # the AOTInductor packages crashed the process (a segfault in aoti_load_package), and with it
    # every row after it.
    methods.append(("exported with AOTInductor, no caching", "exported"))
    # Issue 3's anchor, in this process: diffusers' own First-Block-Cache under regional
    # compilation, at a threshold that always reuses (the first block's change is never above
    # infinity), so blocks 2-N are skipped on every step after the first, as in the forced
    # schedule "blocks 2-N 19/20".
    methods.append(("diffusers FirstBlockCache always reusing, regional (anchor)", "fbcache"))
    for name, cache in schedules(args.steps, CONFIGS[args.config]["num_layers"]).items():
        methods.append((name, lambda c=cache: torch.compile(model, backend="mixcache",
                                                            options={"cache": c})))
    rows, ref = [], None
    with torch.no_grad():
        for name, make in methods:
            if args.only and not any(o in name for o in args.only) and name != "eager":
                continue
            torch._dynamo.reset()
            # The reset drops Dynamo's start callback, with which a mixcache compile rewrites the
            # model before its first trace (layerwise casting, MoE): installed again, as at import.
            install_trace_hook()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if make == "regional":
                pipe.transformer = copy.deepcopy(model)   # compile_repeated_blocks: in place
                pipe.transformer.compile_repeated_blocks()
            elif make == "fbcache":
                from diffusers.hooks import FirstBlockCacheConfig
                pipe.transformer = copy.deepcopy(model)
                pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=float("inf")))
                pipe.transformer.compile_repeated_blocks()
            elif make == "exported":
                latent = (1, model.config.in_channels, (frames - 1) // 4 + 1, h // 8, w // 8)
                # The timestep as the pipeline passes it (UniPC's are int64).
                sched.set_timesteps(args.steps)
                call = dict(hidden_states=torch.zeros(latent, device=dev, dtype=dtype),
                            timestep=sched.timesteps[:1].to(dev), encoder_hidden_states=embeds,
                            return_dict=False)
                with tempfile.TemporaryDirectory() as d:
                    t0 = time.perf_counter()
                    dit_compile.export(model, d, call, {"cache": None}, aoti=True)
                    t1 = time.perf_counter()
                    pipe.transformer = dit_compile.load(d)
                    name = f"{name}; export {t1 - t0:.0f} s, load {time.perf_counter() - t1:.1f} s"
            else:
                pipe.transformer = make()
            out, first, t = measure()
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            frac = None if make == "fbcache" else 1.0      # a hook's skips are not counted here
            try:
                frac = dit_compile.stats(pipe.transformer)["flops_fraction"]
                dit_compile.reset(pipe.transformer)
            except ValueError:
                pass
            if ref is None:
                ref = out
            err = float((out.float() - ref.float()).abs().max())
            rows.append((name, t, first, frac, err, peak))
            # A row as soon as it is measured: a run stopped early keeps what it had.
            print(f"{name}: {t:.3f} s/gen, first {first:.1f} s, flops {_share(frac)}, "
                  f"max abs diff vs eager {err:.3g}, peak {_gib(peak)} GiB", flush=True)
            pipe.transformer = model
    # The baseline: plain Inductor where it ran; else mixcache with caching off (its equal, the
    # speed part's table shows how close); else eager. The header names it.
    timed = {name: t for name, t, *_ in rows}
    base_name = next(n for prefix in ("torch.compile", "mixcache (cache off)", "eager")
                     for n in timed if n.startswith(prefix))
    base = timed[base_name]
    dev_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(f"\n`python {shlex.join(sys.argv)}` on {dev_name}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, {datetime.date.today()}, {args.config} config, "
          f"{h}x{w}x{frames}, {text} text tokens, {args.steps} steps, CFG 5.0\n")
    # Where a schedule falls short of its FLOP ratio: if the baseline's time were FLOP-bound work
    # W plus a fixed cost o per transformer call (launches, the executor, the pipeline's own step),
    # a schedule would take frac * W + n * o, so o = (t - frac * base) / ((1 - frac) * n). The
    # same o across schedules says the gap is that fixed cost; one that grows with the reuse says
    # the reused calls cost more than their FLOPs (the probe, the residual adds, syncs).
    print(f"| method | s / generation | first generation (s) | vs {base_name} | FLOPs computed | "
          "fixed cost that explains the gap, ms / call | max abs diff vs eager | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    calls = 2 * args.steps              # CFG: two transformer calls a step
    for name, t, first, frac, err, peak in rows:
        fixed = (f"{1e3 * (t - frac * base) / ((1 - frac) * calls):.2f}"
                 if frac is not None and frac < 0.99 else "")
        print(f"| {name} | {t:.3f} | {first:.1f} | {base / t:.2f}x | {_share(frac)} | {fixed} | "
              f"{err:.3g} | {_gib(peak)} |")


def _share(frac: float | None) -> str:
    return "-" if frac is None else f"{frac:.2f}"


def _gib(peak: float | None) -> str:
    return "-" if peak is None else f"{peak:.2f}"


if __name__ == "__main__":
    main()
