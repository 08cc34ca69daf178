"""Sketch/render split (SRDiffusion): a large model sketches the high-noise steps, a small model of
the same family renders the rest, switched at a noise level learned by calibration.

    cal = dit_compile.calibrate_split(pipe, small, runs=[dict(prompt_embeds=..., ...)], tolerance=0.1)
    pipe = dit_compile.sketch_render(pipe, small, cal)

The switch itself is diffusers' own: Wan's pipelines take a second transformer (``transformer_2``)
for every step whose timestep is below ``boundary_ratio * num_train_timesteps``, the mechanism of
Wan 2.2's two experts. What is learned here is the boundary. It is a noise level, not a step index,
so it carries over to other step counts and schedule shifts.

Calibration runs the pipeline on the user's calibration inputs with the large model alone, and at
every transformer call also runs the small model on the very same inputs (latent, timestep, text).
A step's distance is the relative L2 distance of the two models' *guided* predictions (the
velocity the sampler steps with, ``uncond + g * (cond - uncond)``), worst over the runs. Its cost
is that distance times the step's length in noise level: what handing the step to the small model
adds to the latent, relative to the velocity's size (MixCache's budget is in the same unit). The
boundary gives the small model the longest tail of steps whose costs add up to at most
``tolerance``. The distances are largest at the lowest noise, where the two models render details
differently, but those steps are short; the tail is where the sum stays small.
Both models compiled with ``backend="mixcache"`` keep their own cache state, one per model.

Without calibration, ``Settle`` is the online rule (SRDiffusion's own: switch once the large
model's output settles). No noise level is fixed in advance, so the switch happens inside the
pipeline's call: ``sketch_render`` puts an ``OnlineSplit`` in the pipeline's ``transformer`` slot,
which places each call in its generation, step and branch as the mixcache runtime does (a
``CacheState`` is its clock), runs the large model until the rule holds and the small one for the
rest of the generation. Any diffusers pipeline with a ``transformer`` works this way, not only
Wan's.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .checks import expect_module, unwrap
from .runtime.cache import CacheState, find_state
from .runtime.policy import rel_l1
from .runtime.sampler import sampler_run

# What the small model must share with the large one to take over its latent mid-trajectory, and
# the widths of the conditions the pipeline hands to both, under each family's name for them
# (Wan's text_dim and image_dim, Flux's joint_attention_dim and pooled_projection_dim, PixArt's
# and HiDream's caption_channels, ...). A family whose name is not here is caught at the switch:
# see ``OnlineSplit._run_small``.
_SHARED = ("in_channels", "out_channels", "patch_size", "patch_size_t", "text_dim", "image_dim",
           "image_embed_dim", "joint_attention_dim", "pooled_projection_dim", "caption_channels",
           "text_embed_dim", "text_embed_2_dim", "text_emb_dim", "cap_feat_dim", "context_in_dim",
           "text_in_dim", "in_text_dim", "text_encoder_dim", "text_hidden_dim", "condition_dim")
# The latent's and the timestep's names in each family's forward (HiDream's `timesteps`,
# Z-Image's `x` and `t`), first found first.
_LATENT, _TIMESTEP = ("hidden_states", "x", "sample"), ("timestep", "timesteps", "t")


@dataclass
class Calibration:
    """``boundary``: the pipeline's ``boundary_ratio``; a step at noise level >= it runs the large
    model, below it the small one (0.0: the small model never runs). ``sigmas`` and ``distances``:
    each calibrated step's noise level (highest first) and the two models' worst distance there
    over the runs."""
    boundary: float
    tolerance: float
    sigmas: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)

    @property
    def small_steps(self) -> int:
        """Calibrated steps the small model takes at this boundary."""
        return sum(s < self.boundary for s in self.sigmas)


@dataclass(frozen=True)
class Settle:
    """The online rule: the small model takes over at the first step where the noise level has
    fallen by ``warmup`` of the generation's first (a share of the noise range, as mixcache's
    trigger reads it) and the large model's output has settled: its relative L1 change between
    its last two steps, per unit of the noise range, below ``rate`` for every guidance branch and
    sample. From there the small model takes every call of the generation.

    On the trained reference model ``large`` (20 steps, shift 3, CFG 4) the conditional branch's
    change runs at 2.1-2.9 over the first steps, falls to 0.8-1.2 in the middle and rises again
    over the last, shortest steps (``bench/RESULTS.md``): ``rate`` picks where in the middle the
    render starts. The rule sees the large model alone, never how the small one would render
    (``calibrate_split`` does). Deciding needs the change on the host: one sync a step until
    the switch. The change is the model's own from one step to the next: where the large
    model's mixcache cache reuses a call (compiled or loaded with caching on), none is taken
    across it, and the branch's change is unknown until two computed steps in a row read it
    again: a reuse never reads as settled."""
    rate: float
    warmup: float = 0.1

    def __post_init__(self) -> None:
        # warmup below 1, as mixcache's: at 1 the noise would have to reach zero, where no
        # sampler calls the model, so the small model would never take over.
        real = [isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (self.rate, self.warmup)]
        if not (real[0] and 0 <= self.rate <= math.inf):
            raise ValueError(f"Settle: rate={self.rate!r} must be a number from 0 to inf")
        if not (real[1] and 0 <= self.warmup < 1):
            raise ValueError(f"Settle: warmup={self.warmup!r} must be a number in [0, 1)")


def calibrate_split(pipe: Any, small: torch.nn.Module, runs: Sequence[dict[str, Any]],
                    tolerance: float) -> Calibration:
    """Learn where ``small`` may take over from ``pipe.transformer`` (module docstring).

    ``runs``: keyword arguments of ``pipe(...)``, one dict per calibration case (prompt embeddings,
    latents or generator, steps, guidance); each must run the same timesteps. ``tolerance``: the
    summed cost (distance times step length) allowed over the steps the small model takes. Both
    models run eagerly (``torch.compile``'s wrapper is looked through, a compile in place set
    aside), so no cache reuses
    anything while they are measured; a loaded export (``dit_compile.load``) runs uncached, its
    cache left as it was. A step where a prediction is not finite (NaN, inf) is infinitely far:
    neither it nor any step above it goes to the small model, and a warning names them."""
    _check_pipeline(pipe)
    if not (isinstance(tolerance, numbers.Real) and not isinstance(tolerance, bool)
            and tolerance >= 0):
        raise ValueError(f"calibrate_split: tolerance={tolerance!r} must be a number >= 0")
    if (not isinstance(runs, (list, tuple)) or not runs
            or not all(isinstance(r, dict) for r in runs)):
        raise ValueError("calibrate_split: runs must be a list of at least one calibration run, "
                         f"each a dict of pipeline keyword arguments (got {type(runs).__name__})")
    if any(r.get("guidance_scale_2") is not None for r in runs):
        # diffusers takes it only with a boundary, which calibration turns off; said here, not
        # as diffusers' complaint about a boundary_ratio the user did set.
        raise ValueError("calibrate_split: a calibration run gives guidance_scale_2; the large "
                         "model takes every step while calibrating, at the run's guidance_scale: "
                         "drop guidance_scale_2 from the runs")
    large = unwrap(pipe.transformer)
    small = unwrap(small)
    check_compatible(large, small)
    _warn_if_an_expert_goes(pipe, small, "calibration measures `transformer` at every step "
                            "against `small`")
    with _uncached(large, small):
        return _calibrate(pipe, large, small, runs, tolerance)


@contextlib.contextmanager
def _uncached(*models: torch.nn.Module) -> Iterator[None]:
    """What ``unwrap`` cannot look through, run uncached: a loaded export runs through its
    cache, and a model compiled in place (``model.compile(...)``, diffusers' way) runs its compiled
    call: their distances would be their caches', and calibration's calls would count as a
    generation of them (and Dynamo would trace the recording hook)."""
    from .export import Exported
    with contextlib.ExitStack() as stack:
        for m in models:
            if isinstance(m, Exported):
                stack.enter_context(m.uncached())
            if getattr(m, "_compiled_call_impl", None) is not None:
                stack.callback(setattr, m, "_compiled_call_impl", m._compiled_call_impl)
                m._compiled_call_impl = None
        yield


def _calibrate(pipe: Any, large: torch.nn.Module, small: torch.nn.Module,
               runs: Sequence[dict[str, Any]], tolerance: float) -> Calibration:
    """``calibrate_split``'s measurement, of models that run uncached."""
    scale = float(pipe.scheduler.config.num_train_timesteps)
    default_g = inspect.signature(pipe.__call__).parameters["guidance_scale"].default

    saved = (pipe.transformer, pipe.config.boundary_ratio)
    calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    caller = threading.current_thread()

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if threading.current_thread() is not caller:    # another thread's generation
            return
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        calls.append((float(t.max()) / scale, _sample(output).float(),
                      _sample(small(*args, **kwargs)).float()))

    worst: list[float] = []
    sigmas: list[float] = []
    handle = large.register_forward_hook(record, with_kwargs=True)
    try:
        pipe.transformer = large
        pipe.register_to_config(boundary_ratio=None)   # the large model takes every step
        for run in runs:
            calls.clear()
            with torch.no_grad():
                pipe(**run)
            g = float(run.get("guidance_scale", default_g))
            steps = _steps(calls)
            if sigmas and [s for s, _ in steps] != sigmas:
                raise ValueError("calibrate_split: every calibration run must take the same "
                                 "timesteps (same step count and scheduler)")
            sigmas = [s for s, _ in steps]
            # Wan's pipelines make two calls a step (conditional, unconditional) where g > 1.
            per_step = 2 if g > 1 else 1
            dist = [_distance(branches, g, per_step) for _, branches in steps]
            worst = dist if not worst else [max(a, b) for a, b in zip(worst, dist)]
    finally:
        handle.remove()
        pipe.transformer = saved[0]
        pipe.register_to_config(boundary_ratio=saved[1])
    bad = [s for s, d in zip(sigmas, worst) if not math.isfinite(d)]
    if bad:
        warnings.warn(f"calibrate_split: the two models' predictions were not both finite at "
                      f"noise level(s) {', '.join(f'{s:.4g}' for s in bad)} (NaN or inf, often a "
                      "half-precision overflow): those steps and every one above them stay with "
                      "the large model", stacklevel=3)
    return Calibration(_boundary(sigmas, worst, tolerance), float(tolerance), sigmas, worst)


def sketch_render(pipe: Any, small: torch.nn.Module, boundary: float | Calibration | Settle
                  ) -> Any:
    """A pipeline of ``pipe``'s class and components in which ``small`` takes every step whose
    noise level is below ``boundary`` (a noise level, or a ``Calibration``), or, with
    ``Settle``, every step from where the large model's output settled (an ``OnlineSplit`` in
    the ``transformer`` slot; any pipeline with one). ``pipe`` itself is left as it was; the
    new pipeline shares its modules (compiled ones included) but has its own copy of the
    scheduler, which holds a run's state."""
    if isinstance(boundary, Settle):
        return _online(pipe, small, boundary)
    _check_pipeline(pipe)
    b = boundary.boundary if isinstance(boundary, Calibration) else boundary
    if not (isinstance(b, numbers.Real) and not isinstance(b, bool) and b >= 0):
        raise ValueError(f"sketch_render: boundary={b!r} must be a noise level >= 0 (0: the small "
                         "model never runs; above the first step's: it takes every step)")
    check_compatible(unwrap(pipe.transformer), unwrap(small))
    _warn_if_an_expert_goes(pipe, small, "the split pipeline has `small` in its place")
    params = inspect.signature(type(pipe).__init__).parameters
    components = {**_own_schedulers(pipe.components), "transformer_2": small}
    config = {k: pipe.config[k] for k in params if k in pipe.config and k not in components}
    new = type(pipe)(**components, **{**config, "boundary_ratio": float(b)})
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


def _own_schedulers(components: dict[str, Any]) -> dict[str, Any]:
    """``components`` with a copy of each scheduler: a scheduler holds its run's state
    (``set_timesteps``'s timesteps and sigmas, the step index), so one shared with ``pipe`` would
    be reset under it by a run of the new pipeline, and two pipelines running at once (two
    threads, or one run inside another's callback) would step each other's runs."""
    return {k: copy.deepcopy(v) if hasattr(v, "set_timesteps") and not isinstance(
        v, torch.nn.Module) else v for k, v in components.items()}


def _online(pipe: Any, small: torch.nn.Module, rule: Settle) -> Any:
    large = getattr(pipe, "transformer", None)
    if not isinstance(large, torch.nn.Module):
        raise TypeError(f"sketch/render: {type(pipe).__name__} has no `transformer` to split")
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("sketch/render: the pipeline already switches to its transformer_2 at a "
                         "noise boundary; Settle replaces that switch: pass a pipeline without one")
    check_compatible(unwrap(large), unwrap(small))
    params = inspect.signature(type(pipe).__init__).parameters
    components = {**_own_schedulers(pipe.components),
                  "transformer": OnlineSplit(large, small, rule)}
    config = {k: pipe.config[k] for k in params if k in pipe.config and k not in components}
    new = type(pipe)(**components, **config)
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


class OnlineSplit(torch.nn.Module):
    """The pipeline's transformer under ``Settle``: each call runs ``large`` until the rule holds
    at a step's first call, then ``small`` for the rest of the generation. Everything else the
    pipeline reads (``config``, ``dtype``, ``device``) is the large model's, as
    ``torch.compile``'s wrapper reads through to its model.

    ``switches``: per generation, the (step, t) where ``small`` took over, or None where it
    never did (the last ``KEEP`` generations); ``t`` is the noise level on the timestep's own
    scale, as in ``stats``' trace (Wan's 0 to 1000, not a calibration boundary's [0, 1])."""
    KEEP = 64

    def __init__(self, large: torch.nn.Module, small: torch.nn.Module, rule: Settle):
        super().__init__()
        for role, model in (("large", large), ("small", small)):
            expect_module(model, f"OnlineSplit's {role} model must be")
        self.large, self.small, self.rule = large, small, rule
        self.switches: list[tuple[int, float] | None] = []
        self._last: dict[int, tuple[float, list[torch.Tensor]]] = {}  # branch: (level, outputs)
        # branch: (dt, change), or None where a reuse left it unknown
        self._change: dict[int, tuple[float, torch.Tensor] | None] = {}
        self.clock = _Clock(self._last)
        self._told = False
        self._names = _argument_names(large)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Not ``_orig_mod``: read through, it made the split look like torch.compile's wrapper
            # of the large model, and stats, reset, explain and export took that model alone.
            if name in ("large", "_modules", "_parameters", "_buffers", "_orig_mod"):
                raise
            return getattr(self.large, name)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """diffusers' cache hooks name the branch and the step (Wan's pipelines): both models
        hear it."""
        with contextlib.ExitStack() as stack:
            for m in (self.large, self.small):
                if hasattr(m, "cache_context"):
                    stack.enter_context(m.cache_context(name, **kwargs))
            yield

    # Never traced: the placing and the host read are Python, and Dynamo tracing them fails deep
    # inside the clock. Compiled models called from here run compiled all the same.
    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        given = {**dict(zip(self._names, args)), **kwargs}
        latent, timestep = (next((given[k] for k in keys if k in given), None)
                            for keys in (_LATENT, _TIMESTEP))
        latents = _tensors(latent)
        if latents is None or not isinstance(timestep, torch.Tensor):
            raise TypeError("OnlineSplit: the pipeline called the transformer without tensors as "
                            f"its latent ({' or '.join(f'`{k}`' for k in _LATENT)}: a tensor, or "
                            "a list of one per sample) and its timestep "
                            f"({' or '.join(f'`{k}`' for k in _TIMESTEP)}); the online rule reads "
                            "both to place the call in its step")
        # A list is one batch to the clock, stacked as the executor stacks it: guidance turned
        # off mid-generation (Z-Image's cfg_truncation) halves it, which the clock tells from a
        # new generation only on a batch (else the rest of the generation would go back to the
        # large model). Latents of different shapes: each one's shape is the signature.
        batch = latent if isinstance(latent, torch.Tensor) else _stacked(latents)
        st = self.clock
        level = st.noise_level(timestep, run := sampler_run())
        step = st.begin(level, (tuple(batch.shape), batch.dtype, batch.device) if batch is not None
                        else tuple((tuple(x.shape), x.dtype, x.device) for x in latents),
                        latent=latents[0] if batch is None else batch, timestep=timestep, run=run)
        if step.step == 0 and step.branch == 0:
            self._last.clear()
            self._change.clear()
            self.switches = [*self.switches[-(self.KEEP - 1):], None]
            if not self._told and _compiled_whole(self):
                self._told = True
                warnings.warn("dit-compile: torch.compile was called on the OnlineSplit itself, "
                              "which compiles nothing (it places calls in Python); compile the "
                              "two models before sketch_render instead, each keeps its own "
                              "cache. Running the models as they are", stacklevel=2)
        if self.switches[-1] is None and step.branch == 0 and self._settled(step.t):
            self.switches[-1] = (step.step, step.t)
        if self.switches[-1] is not None:
            return self._run_small(step.step == self.switches[-1][0] and step.branch == 0,
                                   args, kwargs)
        start = time.monotonic_ns()
        out = self.large(*args, **kwargs)
        if _served_from_cache(self.large, start):
            # A reused output is the cache's, not the model's: its change from the last step
            # (zero, for a step reused as it was) would read as settled, and the next step's
            # change from it is the cache's error. The rule reads the model's own change from
            # one step to the next: none is taken across a reused call, and the branch's change
            # is unknown (not the one read before the reuse, which is older than this step's
            # rule would read uncached) until two computed steps in a row read it again.
            self._last.pop(step.branch, None)
            self._change[step.branch] = None
            return out
        samples = _tensors(out[0] if isinstance(out, (tuple, list)) else out.sample)
        if samples is None or len(samples) != len(latents):
            raise TypeError("OnlineSplit: the large model's output is not its prediction as a "
                            "tensor (or a list of one per sample, as its latent came): the "
                            "online rule reads its change")
        last = self._last.get(step.branch)
        # No change across a change of layout (guidance turned off mid-generation: half the
        # samples, or a half batch): no sample of one is known to be which of the other.
        if (last is not None and last[0] != step.t and len(last[1]) == len(samples)
                and all(x.shape == y.shape for x, y in zip(samples, last[1]))):
            # A list holds one sample a tensor, unbatched: each is one sample's change.
            listed = not isinstance(latent, torch.Tensor)
            change = torch.stack([(rel_l1(x[None], y[None]) if listed else rel_l1(x, y)).amax()
                                  for x, y in zip(samples, last[1])]).amax()
            self._change[step.branch] = (abs(last[0] - step.t), change)
        # A copy: CUDA graphs' replays write into the same output buffer.
        self._last[step.branch] = (step.t, [x.detach().clone() for x in samples])
        return out

    def _run_small(self, first: bool, args: tuple, kwargs: dict) -> Any:
        """The small model's call; its first in a generation failing on inputs made for the large
        one is told as the two configs' differences (a condition width under a name
        ``check_compatible`` does not know), not as a shape error deep inside the small model."""
        if not first:
            return self.small(*args, **kwargs)
        try:
            return self.small(*args, **kwargs)
        except RuntimeError as e:
            a, b = unwrap(self.large).config, unwrap(self.small).config
            differ = [f"{k}: {a[k]!r} vs {b.get(k)!r}" for k in a
                      if not k.startswith("_") and _as_tuples(a[k]) != _as_tuples(b.get(k))]
            raise ValueError("sketch/render: the small model failed on its first call, on the "
                             "inputs the pipeline made for the large one; their configs differ "
                             f"in {'; '.join(differ) or 'nothing'} (large vs small): one of "
                             "these is a width the two must share") from e

    def _settled(self, t: float) -> bool:
        """At a step's first call: below the warm-up, with every branch's last change per unit
        of the noise range under the rule's rate (one host read). A branch whose change a reuse
        left unknown is not settled."""
        # The noise range: the first call's level down to 0, or to the sampler run's lowest
        # where its timesteps go below 0 (EDM's ln(sigma) / 4: CacheState.t_floor).
        span = (self.clock.t_first - self.clock.t_floor) or 1.0
        if (t > self.clock.t_first - self.rule.warmup * span or not self._change
                or None in self._change.values()):
            return False
        rates = torch.stack([c / (dt / span) for dt, c in self._change.values()])
        return float(rates.max()) < self.rule.rate


def _argument_names(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s forward arguments in order (a loaded export's as its model's
    forward named them), for the calls that pass some by position."""
    plain = unwrap(model)
    if hasattr(plain, "positional"):    # dit_compile.load's model
        names = list(plain.positional)
    else:
        try:
            names = [k for k, p in inspect.signature(plain.forward).parameters.items()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
    # A forward of ``*args`` (a wrapper's): latent and timestep first, as diffusers' forwards
    # mostly take them.
    return names or [_LATENT[0], _TIMESTEP[0]]


def _tensors(x: Any) -> list[torch.Tensor] | None:
    """``x`` as a list of tensors: a tensor alone, or a non-empty list or tuple of them
    (Z-Image's latents and predictions, one per sample); None where it is neither."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    return None


def _stacked(xs: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-sample tensors as one batch, where they stack (one shape, dtype and device)."""
    first = xs[0]
    if all(x.shape == first.shape and x.dtype == first.dtype and x.device == first.device
           for x in xs):
        return torch.stack(xs)
    return None


class _Clock(CacheState):
    """The online split's clock: a ``CacheState`` that reads the split's kept levels again
    where it reads its own again. A pipeline whose timestep rises (``1 - sigma``: Lumina's,
    Z-Image's, Mochi's) shows it only at a run's second step, where the clock reads the first
    step's level again (and moves to Mochi's scale where a step passes 1); a level kept as read
    before would put the first change's step length far off (0.14 read as 0.86 on Lumina-Next,
    8 steps) and switch at step 2 whatever the rate. The changes kept are differences of
    levels, which neither reading moves."""

    def __init__(self, levels: dict[int, tuple[float, list[torch.Tensor]]]):
        super().__init__()
        self._levels = levels       # the split's own dict, read again in place

    def _map_noise_levels(self, fn: Any) -> None:
        super()._map_noise_levels(fn)
        for branch, (t, out) in list(self._levels.items()):
            self._levels[branch] = (fn(t), out)


def _served_from_cache(model: torch.nn.Module, since: int) -> bool:
    """Whether ``model``'s call begun after ``since`` (``time.monotonic_ns``) in this thread
    reused anything from its mixcache cache (compiled with ``backend="mixcache"``, or loaded):
    the last record of this thread's state that placed a call since then (another thread's
    state, whose calls interleave with this one's, says nothing of this call). A model that
    caches nothing has no state, or none that ran since."""
    state = find_state(model, threading.current_thread())
    if state is None or state.last_call < since or not state.records:
        return False
    record = state.records[-1]
    return record.action != "compute" or record.reused is not None


def refuse_split(model: Any, name: str) -> None:
    """A TypeError where ``model`` is an ``OnlineSplit``: ``dit_compile.<name>`` of one model
    would tell, or save, half of it."""
    if isinstance(unwrap(model), OnlineSplit):
        raise TypeError(f"dit_compile.{name}: an OnlineSplit runs its two models as they are, each "
                        f"compiled (or not) and cached on its own: {name} split.large and "
                        "split.small")


def _compiled_whole(split: OnlineSplit, depth: int = 12) -> bool:
    """Whether ``split`` is being called through ``torch.compile``'s wrapper of it: an
    ``OptimizedModule`` whose model it is, a few frames up."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return False
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
        if getattr(owner, "_orig_mod", None) is split:
            return True
    return False


def check_compatible(large: torch.nn.Module, small: torch.nn.Module) -> None:
    """The small model must be another model of the large one's class (the pipeline calls both
    alike) that reads and writes its latent, text and image condition: same channels, patch
    size, text and image widths (its depth and width are its own), and the same dtype and device
    (the pipeline casts its inputs to the first transformer's)."""
    a, b = getattr(large, "config", None), getattr(small, "config", None)
    if a is None or b is None:
        raise TypeError("sketch/render: both models must be diffusers transformers (with a config)")
    if unwrap(small) is unwrap(large):
        raise ValueError("sketch/render: the small model is the pipeline's transformer itself")
    kinds = [getattr(m, "model_name", type(m).__name__) for m in (large, small)]  # load()'s too
    if kinds[0] != kinds[1]:
        raise TypeError(f"sketch/render: the small model is a {kinds[1]}, the large one a "
                        f"{kinds[0]}: the pipeline calls both alike, so they must be of one class")
    # A config read from JSON (from_pretrained, dit_compile.load) holds lists where one built in
    # Python holds tuples.
    bad = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in _SHARED
           if _as_tuples(a.get(k)) != _as_tuples(b.get(k))]
    if large.dtype != small.dtype:
        bad.append(f"dtype: {large.dtype} vs {small.dtype}")
    if large.device != small.device:
        bad.append(f"device: {large.device} vs {small.device}")
    if bad:
        raise ValueError("sketch/render: the small model does not share the large one's latent and "
                         f"text spaces ({'; '.join(bad)}, large vs small)")


def _check_pipeline(pipe: Any) -> None:
    if "boundary_ratio" not in getattr(pipe, "config", {}) or not hasattr(pipe, "transformer_2"):
        raise TypeError(f"sketch/render at a noise level needs a pipeline that switches "
                        f"transformers at a boundary (diffusers' Wan pipelines: transformer_2 and "
                        f"boundary_ratio); {type(pipe).__name__} has none. The online rule, "
                        f"dit_compile.Settle, switches inside any pipeline")
    if getattr(pipe, "transformer", None) is None:
        raise ValueError("sketch/render: the pipeline's `transformer` (the large model) is missing")


def _warn_if_an_expert_goes(pipe: Any, small: torch.nn.Module, what: str) -> None:
    """Wan 2.2's pipelines hold a low-noise expert in ``transformer_2``, which a split replaces
    (Settle refuses such a pipeline; a noise-level split of one split before is at home there)."""
    expert = getattr(pipe, "transformer_2", None)
    if expert is not None and unwrap(expert) is not unwrap(small):
        warnings.warn(f"sketch/render: {type(pipe).__name__} already switches to its own "
                      f"transformer_2 (a low-noise expert, as Wan 2.2's) below boundary_ratio="
                      f"{pipe.config.boundary_ratio}; {what}, and the expert takes no step",
                      stacklevel=3)


def _as_tuples(value: Any) -> Any:
    return tuple(map(_as_tuples, value)) if isinstance(value, (list, tuple)) else value


def _sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _steps(calls: list[tuple[float, torch.Tensor, torch.Tensor]]
           ) -> list[tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Calls grouped into steps: consecutive calls at one noise level are its guidance branches."""
    steps: list[tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    for s, big, little in calls:
        if steps and steps[-1][0] == s:
            steps[-1][1].append((big, little))
        else:
            steps.append((s, [(big, little)]))
    return steps


def _distance(branches: list[tuple[torch.Tensor, torch.Tensor]], g: float,
              per_step: int = 2) -> float:
    """Relative L2 distance of the two models' guided predictions at one noise level, the worst
    where the sampler stepped there more than once (a second-order sampler's corrector, then the
    next step's predictor). ``per_step`` calls make one prediction: 2, Wan's conditional then
    unconditional one; 1, already the guided one."""
    worst = 0.0
    for k in range(0, len(branches), per_step):
        calls = branches[k:k + per_step]
        big, little = ((calls[0][i] if len(calls) == 1
                        else calls[1][i] + g * (calls[0][i] - calls[1][i])) for i in (0, 1))
        d = float((little - big).norm() / big.norm().clamp_min(1e-12))
        # A prediction that is not finite (a small model overflowing in half precision) is
        # infinitely far: a NaN would lose every comparison, read as no distance at all, and
        # hand the small model the step.
        worst = max(worst, d if math.isfinite(d) else math.inf)
    return worst


def costs(sigmas: list[float], distances: list[float]) -> list[float]:
    """Each step's distance times its length in noise level (to the next step's, the last to 0)."""
    return [d * (s - n) for d, s, n in zip(distances, sigmas, [*sigmas[1:], 0.0])]


def _boundary(sigmas: list[float], distances: list[float], tolerance: float) -> float:
    """The noise level above which the large model runs: just above the first step of the
    longest tail whose costs add up to at most ``tolerance`` (midway to the step before, so it
    sits between two calibrated steps, not on one)."""
    k, spent = len(sigmas), 0.0
    for cost in reversed(costs(sigmas, distances)):
        # Not finite: a prediction that was not (_distance); never handed over, whatever the
        # tolerance (an infinite one included), and a NaN cost must not pass for a small one.
        if not (math.isfinite(cost) and spent + cost <= tolerance):
            break
        spent += cost
        k -= 1
    if k == len(sigmas):
        return 0.0
    if k == 0:
        return sigmas[0] + 1e-3     # every step: above the first one's noise level
    return (sigmas[k - 1] + sigmas[k]) / 2
