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
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

# What the small model must share with the large one to take over its latent mid-trajectory (and
# the image condition of Wan's image-to-video models, which the pipeline hands to both).
_SHARED = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim")


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


def calibrate_split(pipe: Any, small: torch.nn.Module, runs: Sequence[dict[str, Any]],
                    tolerance: float) -> Calibration:
    """Learn where ``small`` may take over from ``pipe.transformer`` (module docstring).

    ``runs``: keyword arguments of ``pipe(...)``, one dict per calibration case (prompt embeddings,
    latents or generator, steps, guidance); each must run the same timesteps. ``tolerance``: the
    summed cost (distance times step length) allowed over the steps the small model takes. Both
    models run eagerly (``torch.compile``'s wrapper is looked through), so no cache reuses
    anything while they are measured."""
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
    large = _plain(pipe.transformer)
    small = _plain(small)
    check_compatible(large, small)
    scale = float(pipe.scheduler.config.num_train_timesteps)
    default_g = inspect.signature(pipe.__call__).parameters["guidance_scale"].default

    saved = (pipe.transformer, pipe.config.boundary_ratio)
    calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
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
    return Calibration(_boundary(sigmas, worst, tolerance), float(tolerance), sigmas, worst)


def sketch_render(pipe: Any, small: torch.nn.Module, boundary: float | Calibration) -> Any:
    """A pipeline of ``pipe``'s class and components in which ``small`` takes every step whose
    noise level is below ``boundary`` (a noise level, or a ``Calibration``). ``pipe`` itself
    is left as it was; the new pipeline shares its modules (compiled ones included)."""
    _check_pipeline(pipe)
    b = boundary.boundary if isinstance(boundary, Calibration) else boundary
    if not (isinstance(b, numbers.Real) and not isinstance(b, bool) and b >= 0):
        raise ValueError(f"sketch_render: boundary={b!r} must be a noise level >= 0 (0: the small "
                         "model never runs; above the first step's: it takes every step)")
    check_compatible(_plain(pipe.transformer), _plain(small))
    params = inspect.signature(type(pipe).__init__).parameters
    components = {**pipe.components, "transformer_2": small}
    config = {k: pipe.config[k] for k in params if k in pipe.config and k not in components}
    new = type(pipe)(**components, **{**config, "boundary_ratio": float(b)})
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


def check_compatible(large: torch.nn.Module, small: torch.nn.Module) -> None:
    """The small model must be another model of the large one's class (the pipeline calls both
    alike) that reads and writes its latent, text and image condition: same channels, patch
    size, text and image widths (its depth and width are its own), and the same dtype and device
    (the pipeline casts its inputs to the first transformer's)."""
    a, b = getattr(large, "config", None), getattr(small, "config", None)
    if a is None or b is None:
        raise TypeError("sketch/render: both models must be diffusers transformers (with a config)")
    if _plain(small) is _plain(large):
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
        raise TypeError(f"sketch/render needs a pipeline that switches transformers at a noise "
                        f"boundary (diffusers' Wan pipelines: transformer_2 and boundary_ratio); "
                        f"{type(pipe).__name__} has none")
    if getattr(pipe, "transformer", None) is None:
        raise ValueError("sketch/render: the pipeline's `transformer` (the large model) is missing")


def _as_tuples(value: Any) -> Any:
    return tuple(map(_as_tuples, value)) if isinstance(value, (list, tuple)) else value


def _plain(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "_orig_mod", m)


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
        worst = max(worst, float((little - big).norm() / big.norm().clamp_min(1e-12)))
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
        if spent + cost > tolerance:
            break
        spent += cost
        k -= 1
    if k == len(sigmas):
        return 0.0
    if k == 0:
        return sigmas[0] + 1e-3     # every step: above the first one's noise level
    return (sigmas[k - 1] + sigmas[k]) / 2
