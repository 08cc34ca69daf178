"""The speed/quality harness: every caching method, on the trained reference DiTs, judged the same way.

    python bench/quality.py --model small [--cases 16] [--steps 20] [--plot out.png] [--json out.json]
    python bench/quality.py --model large --device cuda [--dtype bf16] ...     # on a GPU
    python bench/quality.py --model large --render small --only sketch         # the split

For each method (full compute; ``backend="mixcache"`` configurations; diffusers' own cache hooks
through ``transformer.enable_cache``) and each of the same ``--cases`` (condition, seed) pairs:

* fidelity: PSNR and SSIM of the method's video against *full compute* of the same model, seed and
  condition (the only reference), both on the displayed video (``(x + 1) / 2`` clamped to
  ``[0, 1]``, data range 1); SSIM per frame and channel with an 11-tap Gaussian window (sigma 1.5);
* speed: wall time of the generation in this process, as full compute's time over the method's
  (totals over all cases; full compute is timed first and again last, and the mean of the two is
  the reference, so slow drift of a shared machine shows up instead of hiding in one row). On a
  GPU (``--device cuda``) the clock is read after ``torch.cuda.synchronize()`` at both ends. The
  process's CPU time is reported beside it on the CPU: on a machine shared with other work it
  moves less than wall time (with one thread it is the time this process actually ran). On a GPU
  it counts the host's kernel launches and synchronize waits, not the work, so the table leaves
  that column out there (the ``--json`` file keeps the values);
* FLOPs: the fraction of full compute's transformer FLOPs the method actually ran. For mixcache,
  from ``dit_compile.stats`` (each call's share, counted by the backend with torch's
  ``FlopCounterMode`` per compiled piece). For full compute and diffusers' hooks, a second,
  untimed run of the same case under ``FlopCounterMode`` counts the matmul/attention/conv FLOPs
  that really executed (the hooks decide from the same inputs, so the rerun takes the same
  decisions); the ratio to full compute's count is the fraction.  ``--no-flop-count`` skips that rerun
  (most of a GPU run's device time; the fractions do not depend on the machine, so a CPU run's
  stand), and those rows show no FLOPs.

Every generation is diffusers' ``WanPipeline`` (``bench/train.py``'s ``Trained.sample``: CFG with two
transformer calls per step, flow-matching Euler scheduler). Methods run one after another in one
process, each warmed up by one untimed generation (compilation, first-call allocation).

``--device`` (cpu, cuda, auto) and ``--dtype`` (fp32, bf16) pick where and in what the model runs;
the initial noise is drawn on the CPU from the seed either way, and the metrics are computed on the
CPU. Full compute in the same device and dtype is the reference, so PSNR/SSIM judge the method, not
the dtype. The device (its name), dtype, torch and diffusers versions go into the run metadata and
the header line of the table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import train  # noqa: E402

#: PSNR of a bit-identical output is infinite; per-case values are capped here before averaging.
PSNR_CAP = 100.0

T = TypeVar("T")


# -- cases and metrics ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    condition: data.Condition
    seed: int


def make_cases(n: int) -> list[Case]:
    """``n`` fixed (condition, seed) pairs: conditions drawn from a fixed RNG with the colours
    cycled (so every colour is present), seeds ``0..n-1``. The same list for every method."""
    rng = random.Random(2024)
    out = []
    for i in range(n):
        c = data.random_condition(rng)
        out.append(Case(data.Condition(c.shape, i % len(data.COLOURS), c.motion, c.background), i))
    return out


def _display(x: torch.Tensor) -> torch.Tensor:
    """A model output in ``[-1, 1]`` as the video a viewer sees, ``[0, 1]`` float64."""
    return ((x.double() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of video ``x`` against ``ref`` (same shape, model range ``[-1, 1]``), data range 1
    after ``_display``; ``PSNR_CAP`` when identical; NaN where ``x`` holds a NaN (no score: a
    diverged output must not pass for an identical one, as ``min(PSNR_CAP, nan)`` would)."""
    mse = float(((_display(x) - _display(ref)) ** 2).mean())
    if math.isnan(mse):
        return math.nan
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-k * k / (2 * sigma * sigma))
    return k / k.sum()


def ssim(x: torch.Tensor, ref: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of video ``x`` against ``ref``, both ``[..., C, F, H, W]`` in
    model range ``[-1, 1]``: computed per frame and channel on ``_display`` images (data range 1,
    K1 = 0.01, K2 = 0.03) with a separable Gaussian window over valid positions only, then averaged."""
    a, b = _display(x), _display(ref)
    a = a.reshape(-1, 1, *a.shape[-2:])                 # every (sample, channel, frame) an image
    b = b.reshape(-1, 1, *b.shape[-2:])
    g = _gaussian(window, sigma)
    gh, gw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, gh), gw)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


# -- methods ----------------------------------------------------------------------------------

class Method:
    """A way of running the model. ``attach`` returns the transformer to put in the pipeline;
    ``detach`` undoes what ``attach`` did. ``counted`` (None: use the FLOP-counting rerun) is the
    fraction of FLOPs computed by the generation that just ran, where the method knows it."""
    family = "full"

    def __init__(self, name: str):
        self.name = name

    def attach(self, model: train.Trained, pipe) -> torch.nn.Module:
        return model.transformer

    def detach(self, model: train.Trained) -> None:
        pass

    def before(self, transformer: torch.nn.Module) -> None:
        """Called before each timed generation."""

    def counted(self, transformer: torch.nn.Module) -> float | None:
        return None


def mixcache_trace(transformer: torch.nn.Module) -> list[dict[str, Any]]:
    """Every call the mixcache runtime recorded for ``transformer`` so far ([] before the first).

    The runtime's state lives on the model's parameters and outlives one generation (a new
    configuration compiled for the same model gets a fresh one at its first call), so a caller
    resets it (``dit_compile.reset``, which clears the records too) or slices off the records of
    the generation it ran."""
    import dit_compile
    try:
        return dit_compile.stats(transformer)["trace"]
    except ValueError:          # no state yet: nothing has run
        return []


def _copy_outputs(module: torch.nn.Module, args: Any, output: Any) -> Any:
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, output)


class MixCache(Method):
    """``torch.compile(transformer, backend="mixcache", options={**options, "cache": cache})``;
    ``options`` the backend's other options (default: ``{"regions": "eager"}``)."""
    family = "mixcache"

    def __init__(self, name: str, cache: Any, options: dict[str, Any] | None = None):
        super().__init__(name)
        self.cache, self.options = cache, {"regions": "eager", **(options or {})}
        self._seen = 0

    def attach(self, model: train.Trained, pipe) -> torch.nn.Module:
        torch._dynamo.reset()             # a fresh compile per method: no cache entry is shared
        # cache=None is passed, not left out: left out, the backend's default preset would cache.
        compiled = torch.compile(model.transformer, backend="mixcache",
                                 options={**self.options, "cache": self.cache})
        if self.options.get("mode") in ("reduce-overhead", "max-autotune"):
            # CUDA graphs replay into the same output buffers, and WanPipeline reads the
            # conditional prediction after the unconditional call has replayed: the caller keeps
            # a copy, as torch.compile's CUDA graphs ask of any caller that holds an output.
            compiled.register_forward_hook(_copy_outputs)
        return compiled

    def detach(self, model: train.Trained) -> None:
        torch._dynamo.reset()

    def before(self, transformer: torch.nn.Module) -> None:
        import dit_compile
        if self.cache is not None:
            dit_compile.reset(transformer)
            self._seen = len(mixcache_trace(transformer))

    def counted(self, transformer: torch.nn.Module) -> float | None:
        if self.cache is None:
            return 1.0
        trace = mixcache_trace(transformer)[self._seen:]
        return sum(r["flops"] for r in trace) / len(trace)


class FittedTeaCache(MixCache):
    """TeaCache with its polynomial: ``dit_compile.fit_teacache`` maps the change of the first
    block's modulated input to the output's on calibration seeds (MagCache's, not evaluation
    seeds), and the rule accumulates that. Fitted once per model, kept in ``fits``."""

    def __init__(self, name: str, threshold: float, steps: int, fits: dict[int, list[float]],
                 options: dict[str, Any] | None = None, seeds: tuple[int, ...] = (1000, 1001)):
        self.rule = {"rule": "teacache", "threshold": threshold, "start": 2}
        super().__init__(name, self.rule, options)
        self.steps, self.fits, self.seeds = steps, fits, seeds

    def attach(self, model: train.Trained, pipe) -> torch.nn.Module:
        import dit_compile
        if id(model) not in self.fits:
            pipe.transformer = super().attach(model, pipe)
            runs = [(data.Condition(0, i % len(data.COLOURS), 0, 0), seed)
                    for i, seed in enumerate(self.seeds)]
            try:
                self.fits[id(model)] = dit_compile.fit_teacache(pipe.transformer, lambda: [
                    model.sample(pipe, c, seed, steps=self.steps) for c, seed in runs])
            finally:
                pipe.transformer = model.transformer
            print(f"{self.name}: fitted coefficients {self.fits[id(model)]}", file=sys.stderr)
        self.cache = dict(self.rule, coefficients=self.fits[id(model)])
        return super().attach(model, pipe)


class DiffusersHook(Method):
    """diffusers' ``transformer.enable_cache(config)``; ``make_config(model, pipe)`` builds the
    config (it may run calibration generations first)."""
    family = "diffusers"

    def __init__(self, name: str, make_config: Callable[[train.Trained, Any], Any]):
        super().__init__(name)
        self.make_config = make_config

    def attach(self, model: train.Trained, pipe) -> torch.nn.Module:
        model.transformer.enable_cache(self.make_config(model, pipe))
        return model.transformer

    def detach(self, model: train.Trained) -> None:
        model.transformer.disable_cache()


class SketchRender(Method):
    """The sketch/render split: the model takes the high-noise steps and ``render`` (another
    trained model, made to read this one's condition: ``train.reading_condition_of``) the rest.
    ``rule``: a tolerance, for the boundary ``dit_compile.calibrate_split`` learns on calibration
    cases (seeds the evaluation never uses), or a ``dit_compile.Settle``, the online rule (no
    calibration; its switch steps per case go to stderr). With ``cache``, both run compiled with
    ``backend="mixcache"`` (each its own cache state) and the FLOPs come from their records,
    each call weighted by its model's share of a large call."""
    family = "sketch"

    def __init__(self, name: str, render: str, rule: Any, steps: int, cache: Any = None,
                 options: dict[str, Any] | None = None):
        super().__init__(name)
        self.render, self.rule, self.steps = render, rule, steps
        self.cache, self.options = cache, {"regions": "eager", **(options or {})}
        self._seen: dict[int, int] = {}
        self.split = None
        self._switches: list[tuple[int, float] | None] = []     # per timed case

    def attach(self, model: train.Trained, pipe) -> torch.nn.Module:
        import dit_compile
        from dit_compile.sketch import costs
        self.pipe = pipe
        small = train.reading_condition_of(
            train.load(self.render, device=model.device, dtype=model.dtype), model)
        online = isinstance(self.rule, dit_compile.Settle)
        if not online:
            cases = [Case(data.random_condition(random.Random(31 + i)), 3000 + i)
                     for i in range(4)]
            cal = dit_compile.calibrate_split(
                pipe, small,
                [model.sample_kwargs(pipe, c.condition, c.seed, self.steps) for c in cases],
                self.rule)
            self.name = f"{self.name} (boundary {cal.boundary:.3f}: {cal.small_steps} small steps)"
            print(f"{self.name}, calibration (sigma: distance, cost): " + ", ".join(
                f"{s:.3f}: {d:.3f}, {c:.4f}" for s, d, c in
                zip(cal.sigmas, cal.distances, costs(cal.sigmas, cal.distances))),
                file=sys.stderr)
        large = model.transformer
        if self.cache is not None:
            torch._dynamo.reset()
            self._share = _call_flops(small, model) / _call_flops(large, model)
            opts = {**self.options, "cache": self.cache}
            large = torch.compile(large, backend="mixcache", options=opts)
            small = torch.compile(small, backend="mixcache", options=opts)
        self.models = (large, small)
        if online:
            self.split, self._switches = dit_compile.OnlineSplit(large, small, self.rule), []
            return self.split
        pipe.register_modules(transformer_2=small)
        pipe.register_to_config(boundary_ratio=cal.boundary)
        return large

    def detach(self, model: train.Trained) -> None:
        if self.split is not None:
            print(f"{self.name}: small model from step (sigma) " + ", ".join(
                "never" if s is None else f"{s[0]} ({s[1] / 1000:.3f})" for s in self._switches),
                file=sys.stderr)
            self.split = None
        self.pipe.register_modules(transformer_2=None)
        self.pipe.register_to_config(boundary_ratio=None)
        torch._dynamo.reset()

    def before(self, transformer: torch.nn.Module) -> None:
        import dit_compile
        if self.cache is not None:
            for m in self.models:
                dit_compile.reset(m)
            self._seen = {id(m): len(mixcache_trace(m)) for m in self.models}

    def counted(self, transformer: torch.nn.Module) -> float | None:
        if self.split is not None:      # right after the timed case: its generation is the last
            self._switches.append(self.split.switches[-1])
        if self.cache is None:
            return None         # the FLOP-counting rerun counts both models' calls
        large, small = (mixcache_trace(m)[self._seen[id(m)]:] for m in self.models)
        done = sum(r["flops"] for r in large) + self._share * sum(r["flops"] for r in small)
        return done / (len(large) + len(small))


def _call_flops(transformer: torch.nn.Module, model: train.Trained) -> float:
    """FLOPs of one call of ``transformer`` at ``model``'s sample shape."""
    c = model.config
    x = torch.zeros(1, 3, c.frames, c.size, c.size, device=model.device, dtype=model.dtype)
    t = torch.tensor([500.0], device=model.device)
    text = model.condition.negative()
    return _count_flops(lambda: transformer(x, t, text, return_dict=False))


def sketch_methods(render: str, steps: int, options: dict[str, Any] | None = None) -> list[Method]:
    """The split at a few tolerances, and at the lowest with ``balanced`` caching on both; then
    the online rule at a few rates."""
    from dit_compile import Settle
    methods: list[Method] = [SketchRender(f"sketch/render {render} tolerance {tol}", render, tol,
                                          steps) for tol in (0.05, 0.15, 0.3)]
    methods.append(SketchRender(f"sketch/render {render} tolerance 0.05 + mixcache balanced",
                                render, 0.05, steps, "balanced", options))
    methods += [SketchRender(f"sketch/render {render} online, settle {rate}", render,
                             Settle(rate), steps) for rate in (0.9, 1.1, 1.3)]
    return methods


def _hooks():
    import diffusers.hooks as h
    return h


def _mag_ratios(model: train.Trained, pipe, steps: int, seeds: tuple[int, ...] = (1000, 1001)
                ) -> list[float]:
    """MagCache's per-step magnitude ratios for this model and step count, by diffusers' own
    calibration mode on ``seeds`` (not evaluation seeds). Calibration prints the ratios at the
    end of each branch's run; they are averaged over branches and calibration runs."""
    h = _hooks()
    model.transformer.enable_cache(h.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            for i, seed in enumerate(seeds):
                model.sample(pipe, data.Condition(0, i % len(data.COLOURS), 0, 0), seed, steps=steps)
    finally:
        model.transformer.disable_cache()
    runs = [json.loads(m) for m in re.findall(r"^\[[^\]]*\]$", buf.getvalue(), flags=re.M)]
    if not runs:
        raise RuntimeError("MagCache calibration printed no ratios; diffusers' output format changed?")
    return [sum(r[i] for r in runs) / len(runs) for i in range(steps)]


def default_methods(steps: int, options: dict[str, Any] | None = None) -> list[Method]:
    """Full compute, mixcache rules at several settings, and each diffusers hook at several.

    Thresholds were picked on the trained models to span light to aggressive reuse; ``start`` (no
    reuse before this step) follows the diffusers defaults' spirit of protecting the first steps,
    where the trajectory is decided."""
    h = _hooks()

    def with_timestep(factory: Callable[..., Any]) -> Callable[[train.Trained, Any], Any]:
        # PAB and FasterCache decide by the pipeline's current timestep, read through a callback.
        return lambda model, pipe: factory(current_timestep_callback=lambda: pipe.current_timestep)

    methods: list[Method] = [Method("full compute")]
    methods.append(MixCache("mixcache cache off", None, options))
    for th in (0.05, 0.1, 0.2):
        methods.append(MixCache(f"mixcache first_block {th}",
                                {"rule": "first_block", "threshold": th, "start": 2}, options))
    for th in (0.05, 0.1, 0.2):
        methods.append(MixCache(f"mixcache teacache {th}",
                                {"rule": "teacache", "threshold": th, "start": 2}, options))
    fits: dict[int, list[float]] = {}
    for th in (0.05, 0.1, 0.2):
        methods.append(FittedTeaCache(f"mixcache teacache fitted {th}", th, steps, fits, options))
    for th in (0.05, 0.1, 0.2):
        methods.append(MixCache(f"mixcache easycache {th}", {"rule": "teacache", "signal": "output",
                                                             "threshold": th, "start": 2}, options))
    for every, start in ((2, 2), (3, 2), (2, 6)):
        methods.append(MixCache(f"mixcache fastercache every {every} from step {start}",
                                {"rule": "fastercache", "every": every, "start": start}, options))
    # 'start' is one for the whole list (the runtime refuses two values since baeae6b); before,
    # the last one given, 6, applied to both rules, so the row keeps measuring what it always did.
    methods.append(MixCache("mixcache first_block 0.05 + fastercache 2 from step 6",
                            [{"rule": "first_block", "threshold": 0.05},
                             {"rule": "fastercache", "every": 2, "start": 6}], options))
    for th in (0.05, 0.1, 0.2):
        methods.append(DiffusersHook(f"diffusers FirstBlockCache {th}",
                                     lambda m, p, th=th: h.FirstBlockCacheConfig(threshold=th)))
    for skip in (2, 3):
        methods.append(DiffusersHook(
            f"diffusers PAB spatial {skip}",
            with_timestep(lambda skip=skip, **kw: h.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip, **kw))))
    for skip in (2, 3):
        # Attention-level FasterCache only: its unconditional-branch skip expects both branches
        # batched into one call, and WanPipeline makes two calls (is_guidance_distilled turns
        # that part off).
        methods.append(DiffusersHook(
            f"diffusers FasterCache attn {skip}",
            with_timestep(lambda skip=skip, **kw: h.FasterCacheConfig(
                spatial_attention_block_skip_range=skip, is_guidance_distilled=True, **kw))))
    for interval in (2, 3, 5):
        # TaylorSeer's default module patterns ("^blocks.*attn", matched with re.fullmatch) name
        # no module of Wan, whose attentions are attn1 / attn2: without explicit patterns it
        # hooks nothing and silently computes everything. Name the attentions and feed-forwards
        # of every block, the features the TaylorSeer paper forecasts.
        methods.append(DiffusersHook(
            f"diffusers TaylorSeer interval {interval}",
            lambda m, p, interval=interval: h.TaylorSeerCacheConfig(
                cache_interval=interval, disable_cache_before_step=3, max_order=1,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"])))
    methods.append(DiffusersHook(
        "diffusers TaylorSeer lite interval 3",
        lambda m, p: h.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3,
                                             max_order=1, taylor_factors_dtype=torch.float32,
                                             use_lite_mode=True)))
    ratios: dict[int, list[float]] = {}
    for th in (0.03, 0.06, 0.12):
        def mag(m: train.Trained, p, th=th) -> Any:
            key = id(m)
            if key not in ratios:
                ratios[key] = _mag_ratios(m, p, steps)
            return h.MagCacheConfig(threshold=th, num_inference_steps=steps, mag_ratios=ratios[key])
        methods.append(DiffusersHook(f"diffusers MagCache {th}", mag))
    return methods


# -- the run ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One method's results over all cases."""
    name: str
    family: str
    seconds: list[float] = field(default_factory=list)     # per case, wall time
    cpu: list[float] = field(default_factory=list)         # per case, this process's CPU time
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)       # fraction of full compute's FLOPs
    error: str | None = None

    def summary(self, ref_seconds: float, ref_cpu: float) -> dict[str, Any]:
        t, c = sum(self.seconds), sum(self.cpu)
        # A method that failed part way has times for fewer cases than the reference's: no
        # speedup (its ratio would count the cases it never ran as free).
        whole = self.error is None
        return {"method": self.name, "family": self.family, "seconds_total": round(t, 3),
                "cpu_seconds_total": round(c, 3),
                "speedup": round(ref_seconds / t, 3) if t and whole else None,
                "speedup_cpu": round(ref_cpu / c, 3) if c and whole else None,
                "flops_fraction": round(sum(self.flops) / len(self.flops), 4) if self.flops else None,
                "psnr_mean": round(sum(self.psnr) / len(self.psnr), 2) if self.psnr else None,
                "psnr_min": round(_least(self.psnr), 2) if self.psnr else None,
                "ssim_mean": round(sum(self.ssim) / len(self.ssim), 4) if self.ssim else None,
                "ssim_min": round(_least(self.ssim), 4) if self.ssim else None,
                "error": self.error}


def _least(values: list[float]) -> float:
    """The smallest value, NaN where any is (``min`` returns a finite one unless NaN is first)."""
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """``fn()``, and the wall and process CPU seconds it took. On CUDA the clock is read only
    after the device's queue is drained, at the start (so earlier work is not charged to ``fn``)
    and at the end (so all of ``fn``'s kernels are)."""
    train.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    train.synchronize(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _count_flops(fn: Callable[[], Any]) -> float:
    # torch's FlopCounterMode, with the CPU's attention kernel counted (torch counts only CUDA's):
    # the backend's own count, so both kinds of row count the same operations.
    from dit_compile.flops import flop_counter
    with flop_counter() as fc:
        fn()
    return float(fc.get_total_flops())


def evaluate(model: train.Trained, methods: list[Method], cases: list[Case], steps: int,
             progress: bool = True, count_flops: bool = True,
             on_row: Callable[[list[Row], dict[str, Any]], None] | None = None
             ) -> tuple[list[Row], dict[str, Any]]:
    """Run every method on every case; returns the rows (full compute first, and its repeat
    last) and run metadata. A method that raises is recorded with its error, not fatal.

    ``count_flops=False`` skips the untimed second run per case that counts what a method without
    its own record (diffusers' hooks) executed: on a GPU that rerun costs more device time than the
    timed runs, and the fractions do not depend on the machine (the CPU run has them); such rows
    then have no FLOPs. ``on_row(rows, meta)`` is called after each method, so a run cut short
    still leaves what it finished."""
    from tqdm.auto import tqdm
    pipe = model.pipeline()
    warm = Case(data.Condition(0, 0, 0, 0), 999)
    refs: list[torch.Tensor] = []
    full_flops = 0.0
    rows: list[Row] = []
    meta = {"model": model.config.name, "cases": len(cases), "steps": steps,
            "guidance": model.config.guidance, "shift": model.config.shift,
            "threads": torch.get_num_threads(), **train.runtime_info(model.device),
            "dtype": str(model.dtype).removeprefix("torch.")}
    plan = [methods[0]] + methods[1:] + [Method("full compute (again)")]
    bar = tqdm(total=len(plan) * len(cases), desc=f"quality {model.config.name}", disable=not progress)
    for method in plan:
        row = Row(method.name, method.family)
        rows.append(row)
        try:
            pipe.transformer = method.attach(model, pipe)
            row.name = method.name      # attach may name what it chose (a calibrated boundary)
            model.sample(pipe, warm.condition, warm.seed, steps=steps)      # warm-up, untimed
            for i, case in enumerate(cases):
                method.before(pipe.transformer)
                out, wall, cpu = timed(lambda: model.sample(pipe, case.condition, case.seed,
                                                            steps=steps), model.device)
                row.seconds.append(wall)
                row.cpu.append(cpu)
                frac = 1.0 if method.family == "full" else method.counted(pipe.transformer)
                if method is methods[0]:
                    refs.append(out)
                    if i == 0 and count_flops:  # every case has the same shapes and full FLOPs
                        full_flops = _count_flops(
                            lambda: model.sample(pipe, case.condition, case.seed, steps=steps))
                elif frac is None and count_flops:
                    frac = _count_flops(
                        lambda: model.sample(pipe, case.condition, case.seed, steps=steps)) / full_flops
                if frac is not None:
                    row.flops.append(frac)
                row.psnr.append(psnr(out, refs[i]))
                row.ssim.append(ssim(out, refs[i]))
                bar.update(1)
        except Exception as e:            # noqa: BLE001 - one broken method must not end the run
            # Dynamo wraps the backend's own error, and BackendCompilerFailed's first line names
            # only the backend: report the error it wraps, which says what went wrong.
            e = getattr(e, "inner_exception", None) or e
            row.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            bar.update(len(cases) - len(row.seconds))
        finally:
            method.detach(model)
            pipe.transformer = model.transformer
        meta["full_flops_per_generation"] = full_flops or None
        if on_row is not None:
            on_row(rows, meta)
    bar.close()
    return rows, meta


def reference_seconds(rows: list[Row]) -> tuple[float, float]:
    """Full compute's (wall, CPU) time over all cases: the means of its first and repeated runs."""
    full = [r for r in rows if r.family == "full" and r.seconds]
    return (sum(sum(r.seconds) for r in full) / len(full),
            sum(sum(r.cpu) for r in full) / len(full))


def _on_gpu(meta: dict[str, Any]) -> bool:
    # Runs saved before the device was recorded all ran on the CPU.
    return meta.get("device", "cpu").startswith("cuda")


def _platform(meta: dict[str, Any]) -> str:
    """Where a run ran, for headers: device (its name on a GPU), dtype, versions, threads."""
    device = f"{meta['device_name']} ({meta['device']})" if _on_gpu(meta) else "cpu"
    diffusers = f", diffusers {meta['diffusers']}" if "diffusers" in meta else ""
    storage = f" (weights stored in {meta['storage']})" if meta.get("storage") else ""
    return (f"{device}, {meta.get('dtype', 'float32')}{storage}, torch {meta['torch']}{diffusers}, "
            f"{meta['threads']} CPU thread(s)")


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results as a markdown table (one row per method). On a GPU run the CPU-time speedup
    column is left out (see the module docstring)."""
    ref, ref_cpu = reference_seconds(rows)
    gpu = _on_gpu(meta)
    columns = ["method", "speedup (wall)", *([] if gpu else ["speedup (CPU time)"]),
               "FLOPs computed", "PSNR dB mean (min)", "SSIM mean (min)"]
    lines = ([f"`{meta['command']}`", ""] if meta.get("command") else []) + [
             f"model `{meta['model']}`, {meta['cases']} cases, {meta['steps']} steps, CFG "
             f"{meta['guidance']}, shift {meta['shift']}, {_platform(meta)}; full compute "
             f"{ref / meta['cases']:.3f} s/generation "
             + ("(wall, CUDA-synchronized; CPU time not shown: on a GPU it is launch and wait "
                "time)" if gpu else "(wall)"),
             "",
             "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        s = r.summary(ref, ref_cpu)
        if r.error:     # a partial row's figures are of the cases before the failure: none shown
            lines.append(f"| {r.name} | failed after {len(r.psnr)} of {meta['cases']} cases: "
                         f"{r.error} |" + " |" * (len(columns) - 2))
            continue
        cpu = [] if gpu else [f"{s['speedup_cpu']:.2f}x"]
        flops = "-" if s["flops_fraction"] is None else f"{s['flops_fraction']:.2f}"
        cells = [r.name, f"{s['speedup']:.2f}x", *cpu, flops,
                 f"{s['psnr_mean']:.1f} ({s['psnr_min']:.1f})",
                 f"{s['ssim_mean']:.4f} ({s['ssim_min']:.4f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], meta: dict[str, Any], out: str) -> None:
    """Speedup (wall time, CPU time (not on a GPU run), and 1 / FLOPs fraction) against mean PSNR,
    one point per method, as a PNG.
    Skipped with a message when matplotlib is not installed (it is not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot written to {out} (pip install matplotlib)")
        return
    ref = reference_seconds(rows)
    colours = {"full": "black", "mixcache": "tab:blue", "diffusers": "tab:orange",
               "sketch": "tab:green"}
    gpu = _on_gpu(meta)
    panels = {"speedup": f"speedup, wall time ({meta['device_name'] if gpu else 'CPU machine'})",
              **({} if gpu else {"speedup_cpu": "speedup, CPU time"}),
              "flops": "1 / FLOPs fraction (machine-independent)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(19 * len(panels) / 3, 6), dpi=100)
    for ax, (what, label) in zip(axes, panels.items()):
        for r in rows:
            if not r.psnr or r.error or r.name == "full compute (again)":
                continue            # (a method that failed part way: no figure of all cases)
            s = r.summary(*ref)
            if what == "flops" and s["flops_fraction"] is None:
                continue            # not counted in this run (--no-flop-count)
            y = s[what] if what != "flops" else 1 / max(s["flops_fraction"], 1e-9)
            ax.scatter(s["psnr_mean"], y, c=colours[r.family], s=25)
            ax.annotate(r.name.replace("diffusers ", "").replace("mixcache ", "mc "),
                        (s["psnr_mean"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"PSNR vs full compute, dB (mean of {meta['cases']} cases, capped at "
                      f"{PSNR_CAP:.0f})", ylabel=label)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", c=c, label=f) for f, c in colours.items()]
    # Centre right: the PSNR range between the cached methods and the capped exact ones is empty.
    axes[0].legend(handles=handles, loc="center right")
    fig.suptitle(f"model {meta['model']}: {meta['cases']} cases, {meta['steps']} steps, "
                 f"{_platform(meta)}")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def save_json(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    """The per-method summaries and per-case values, for ``--from-json`` and for RESULTS.md."""
    ref = reference_seconds(rows)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [{**r.summary(*ref), "seconds": r.seconds, "cpu": r.cpu,
                                           "psnr": r.psnr, "ssim": r.ssim, "flops": r.flops}
                                          for r in rows]}, f, indent=1)
        f.write("\n")


def load_json(path: str) -> tuple[list[Row], dict[str, Any]]:
    """The rows and metadata of a ``--json`` file written by an earlier run."""
    with open(path) as f:
        saved = json.load(f)
    rows = [Row(r["method"], r["family"], r["seconds"], r["cpu"], r["psnr"], r["ssim"], r["flops"],
                r["error"]) for r in saved["rows"]]
    return rows, saved["meta"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="a directory under bench/models")
    ap.add_argument("--cases", type=int, default=16, help="(condition, seed) cases, at least 16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="*", help="run only methods whose name contains one of these "
                                             "(full compute always runs: it is the reference)")
    ap.add_argument("--regions", default="eager", choices=("eager", "inductor"),
                    help="how mixcache compiles its regions (eager: the same math as full compute, "
                         "so speedups are the caching's own)")
    ap.add_argument("--mode", help="Inductor's mode for mixcache's regions, with --regions inductor "
                                    "(e.g. reduce-overhead: CUDA graphs)")
    ap.add_argument("--mixcache", action="append", default=[], metavar="NAME=JSON",
                    help="add a mixcache configuration, e.g. 'fb 0.15={\"rule\": \"first_block\", "
                         "\"threshold\": 0.15}' (the JSON is the cache option); repeatable; these "
                         "run first, after full compute")
    ap.add_argument("--render", metavar="MODEL",
                    help="add the sketch/render split with this trained model (under bench/models) "
                         "taking the low-noise steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", type=train.device_arg, default="cpu",
                    help="cpu (default), cuda, cuda:N, or auto (cuda where available)")
    ap.add_argument("--dtype", choices=sorted(train.DTYPES), default="fp32",
                    help="the model's dtype (the reference, full compute, runs in it too)")
    ap.add_argument("--storage", choices=("bf16", "fp8"),
                    help="store the weights in this dtype with diffusers' layerwise casting "
                         "(enable_layerwise_casting; computed in --dtype): every method, full "
                         "compute (the reference) included, runs the model so stored")
    ap.add_argument("--plot", help="write the speedup-vs-PSNR plot here (PNG)")
    ap.add_argument("--json", help="write the per-method summaries and per-case values here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-flop-count", action="store_true",
                    help="do not rerun each case of diffusers' hooks under FlopCounterMode to count "
                         "their FLOPs (machine-independent: take them from a CPU run); saves most "
                         "of the device time of a GPU run")
    ap.add_argument("--from-json", metavar="JSON",
                    help="run nothing: re-render the table (and --plot) from a saved --json file")
    args = ap.parse_args(argv)
    if args.from_json:
        rows, meta = load_json(args.from_json)
        print(markdown(rows, meta))
        if args.plot:
            plot(rows, meta, args.plot)
        return
    if args.cases < 16:
        ap.error("--cases must be at least 16 (the evaluation protocol's minimum)")
    torch.set_num_threads(args.threads)
    model = train.load(args.model, device=args.device, dtype=train.DTYPES[args.dtype])
    if args.storage is not None:
        storage = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[args.storage]
        model.transformer.enable_layerwise_casting(storage_dtype=storage,
                                                   compute_dtype=train.DTYPES[args.dtype])
    options: dict[str, Any] = {"regions": args.regions}
    if args.mode is not None:
        options["mode"] = args.mode
    named = []
    for spec in args.mixcache:
        name, sep, cache = spec.partition("=")
        if not sep:
            ap.error(f"--mixcache {spec!r}: expected NAME=JSON")
        named.append(MixCache(f"mixcache {name}", json.loads(cache), options))
    # The configurations the command names run right after full compute: a run cut short (a
    # device call's time limit) has them first.
    full, *others = default_methods(args.steps, options)
    sketch = sketch_methods(args.render, args.steps, options) if args.render else []
    methods = [full, *named, *others, *sketch]
    if args.only:
        methods = [methods[0]] + [m for m in methods[1:] if any(s in m.name for s in args.only)]
    command = "python bench/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def on_row(rows: list[Row], meta: dict[str, Any]) -> None:
        # A run cut short (a device call's time limit) keeps every method it finished.
        meta["command"] = command
        if args.storage is not None:
            meta["storage"] = args.storage
        if args.json:
            save_json(args.json, rows, meta)
        if args.no_progress:
            s = rows[-1].summary(*reference_seconds(rows))
            print(f"done: {s['method']}: {s['seconds_total']:.2f} s, PSNR {s['psnr_mean']}, "
                  f"FLOPs {s['flops_fraction']}{', ' + s['error'] if s['error'] else ''}",
                  file=sys.stderr, flush=True)

    with torch.no_grad():
        rows, meta = evaluate(model, methods, make_cases(args.cases), args.steps,
                              progress=not args.no_progress, count_flops=not args.no_flop_count,
                              on_row=on_row)
    print(markdown(rows, meta))
    if args.plot:
        plot(rows, meta, args.plot)


if __name__ == "__main__":
    main()
