"""Policies: at each guard point, compute or reuse, and at which granularity.

A policy answers two questions per call, from signals the executor hands it:

* ``step(...)``: before anything runs: ``"compute"``, ``"step"`` (reuse the whole forward) or
  ``"cfg"`` (rebuild this guidance branch from the other one; on a call that batches both branches,
  ``step.halves``, compute the conditional half and rebuild the unconditional one), with an
  optional per-sample mask when samples of a batch disagree.
* ``block(...)``: after the probe blocks ran: reuse the cached residual of the span, per sample.

Forced schedules and the threshold rules that reproduce known single-granularity caches
(First-Block-Cache, TeaCache and EasyCache, FasterCache's cfg reuse) are all policies over the same
guard points. ``make_policy`` parses the user's ``cache`` option into one.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .cache import BranchCache, CacheState, Step

if TYPE_CHECKING:
    from .mixcache import MixCache

COMPUTE, STEP, CFG = "compute", "step", "cfg"
RULES = ("mixcache", "schedule", "first_block", "teacache", "fastercache")


class PolicyError(ValueError):
    """The ``cache`` option names something that does not exist or a value out of range."""


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L1 change ``mean|a - b| / mean|b|`` over all but the batch dim."""
    dims = tuple(range(1, a.dim()))
    # Accumulate in fp32 without materialising fp32 copies of bf16 activations.
    num = (a - b).abs().mean(dim=dims, dtype=torch.float32)
    return num / b.abs().mean(dim=dims, dtype=torch.float32).clamp_min(1e-12)


@dataclass
class Policy:
    """Composite of the rules the user turned on; every field has a no-reuse default."""
    # forced schedule
    step_steps: frozenset[int] = frozenset()
    cfg_steps: frozenset[int] = frozenset()
    block_steps: frozenset[int] = frozenset()
    # threshold rules
    first_block: float | None = None        # FBCache threshold on the probe residual
    teacache: float | None = None           # accumulated-change threshold for step reuse
    teacache_signal: str = "modulated"      # what changes: "modulated" (the first block's
                                            # timestep-modulated input: TeaCache), "input" (the
                                            # latent) or "output" (EasyCache)
    teacache_coefficients: tuple[float, ...] | None = None  # TeaCache's polynomial over that
                                            # change, highest degree first (fit_teacache)
    cfg_every: int | None = None            # FasterCache: recompute cfg every N steps
    start: int = 0                          # no threshold-rule reuse before this step
    # shared knobs
    probe: int = 1                          # blocks run before the block decision
    span: tuple[int | None, int | None] = (None, None)  # flat block indices the block guard may
                                            # skip; None: from the probe's end, to the last
    step_mode: str = "output"               # "output" | "residual" (over the latent)
    extrapolate: int = 0                    # step reuse: order of the polynomial through the
                                            # last computes (True: 1, first order)
    max_reuse: int | None = None            # bound on consecutive reuses per branch
    per_sample: bool = True                 # decisions per sample of a batch
    _told_schedule: bool = field(default=False, repr=False, compare=False)

    @property
    def uses_blocks(self) -> bool:
        """Whether calls stop at the block guard (the probe runs and ``block`` is asked)."""
        return bool(self.block_steps) or self.first_block is not None

    @property
    def reuses_blocks(self) -> bool:
        """Whether the block span's residual may be reused (and so is kept)."""
        return self.uses_blocks

    @property
    def reads_modulation(self) -> bool:
        """Whether ``step`` is handed the first block's modulated input instead of the latent
        (the pieces before that block then run ahead of the decision)."""
        return self.teacache is not None and self.teacache_signal == "modulated"

    @property
    def reuses_cfg(self) -> bool:
        """Whether cfg reuse may be asked, of separate calls per branch or of batched-CFG calls."""
        return bool(self.cfg_steps) or self.cfg_every is not None

    @property
    def ties_groups(self) -> bool:
        """Whether guidance branches batched in one call must be told apart (a compare of the
        latent's halves and thirds at every call): for cfg reuse on batched-CFG halves, or where
        decisions are per sample, so that a sample's copies in the branches decide as one
        (``tie_groups``)."""
        return self.reuses_cfg or (self.per_sample and self.first_block is not None)

    @property
    def _fits_teacache(self) -> bool:
        """A signal the rule's coefficients rescale: EasyCache's ("output") is an estimate of the
        output's change already, and takes none (so fit_teacache records nothing for it)."""
        return self.teacache is not None and self.teacache_signal != "output"

    def _bounded(self, bc: BranchCache) -> bool:
        """A reuse of the whole call would exceed the bound for some sample."""
        return self.max_reuse is not None and bc.most_reused >= self.max_reuse

    def step(self, s: Step, state: CacheState, latent: torch.Tensor) -> tuple[str, float | None]:
        """(action, signal) before the forward runs."""
        if s.step == 0 and s.branch == 0 and not self._told_schedule:
            self._check_schedule(s, state)
        bc = state.branch(s.branch)
        if state.calibration is not None:
            # fit_teacache records: every call computes, and keeps the signal's raw change.
            if self._fits_teacache and bc.last_input is not None:
                bc.signals["fit_change"] = rel_l1(latent, bc.last_input)
            return COMPUTE, None
        have_out = bool(bc.outputs)
        signal = None
        if self.teacache is not None and bc.last_input is not None:
            change = self._change(bc, latent)
            if change is not None:
                bc.accumulated = change if bc.accumulated is None else bc.accumulated + change
                signal = float(bc.accumulated.max())
        if self._bounded(bc):
            return COMPUTE, signal
        if s.step in self.step_steps and have_out:
            return STEP, signal
        if cfg_ready(s, state):
            if s.step in self.cfg_steps:
                return CFG, signal
            if (self.cfg_every is not None and s.step >= self.start
                    and (s.step - self.start) % self.cfg_every != 0):
                return CFG, signal
        if self.teacache is not None and have_out and s.step >= self.start and bc.accumulated is not None:
            # A whole forward is skipped only when every sample of the batch may skip it: a
            # sample whose input moved computes, and so does the batch with it.
            if bool((bc.accumulated < self.teacache).all()):
                return STEP, signal
        return COMPUTE, signal

    def _check_schedule(self, s: Step, state: CacheState) -> None:
        """A schedule is checked against a generation only once one has ended (its length and
        branches are known at its end): steps past the last one, and cfg reuse where every step
        called the transformer with one guidance branch, never applied. Saying so once beats a
        schedule that silently reuses less than it says."""
        last = state.records[-1] if state.records else None
        if last is None or last.generation == s.generation:
            return
        named = {"step": self.step_steps, "cfg": self.cfg_steps, "block": self.block_steps}
        beyond = {k: sorted(v for v in steps if v > last.step) for k, steps in named.items()}
        beyond = {k: v for k, v in beyond.items() if v}
        if beyond:
            self._told_schedule = True
            warnings.warn(f"mixcache: the forced schedule names steps {beyond}, past the last step "
                          f"({last.step}, counting from 0) of the generation that just ended: they "
                          "never applied", stacklevel=4)
        ended = list(itertools.takewhile(lambda r: r.generation == last.generation,
                                         reversed(state.records)))
        if self.reuses_cfg and not any(r.branch or r.halves for r in ended):
            self._told_schedule = True
            calls = ("batched its guidance branches in a way cfg reuse does not take (perturbed-"
                     "attention guidance's [uncond, cond, perturbed] in one call, or [cond, "
                     "perturbed] without CFG: rebuilding a branch would need the pipeline's own "
                     "attention processors)" if any(r.groups > 1 for r in ended) else
                     "called the transformer with one guidance branch per step (guidance off, "
                     "e.g. guidance_scale <= 1, or a guidance-distilled model such as Flux): "
                     "there is no other branch to rebuild one from")
            warnings.warn(f"mixcache: cfg reuse is asked for, but the generation that just ended "
                          f"{calls}, so it never applied", stacklevel=4)
            return
        guided = {r.step for r in ended if r.branch or r.halves}
        missed = sorted(v for v in self.cfg_steps if v <= last.step)
        if missed and not guided & set(missed):
            # Guidance on for some steps only (Z-Image's cfg_truncation, Lumina 2's
            # cfg_trunc_ratio): each named step fell where it was off.
            self._told_schedule = True
            warnings.warn(f"mixcache: the forced schedule's cfg steps {missed} fell where the "
                          "generation that just ended called the transformer with one guidance "
                          f"branch (guidance on at steps {sorted(guided)} only, e.g. truncated): "
                          "they never applied", stacklevel=4)

    def block(self, s: Step, st: CacheState, bc: BranchCache, probe: torch.Tensor
              ) -> tuple[bool | torch.Tensor, float | None]:
        """Reuse the span? True/False for the batch, or a per-sample mask; plus the signal."""
        if bc.span is None or st.calibration is not None:
            return False, None
        if s.step in self.block_steps:
            return not self._bounded(bc), None
        if self.first_block is None or bc.probe is None or s.step < self.start:
            return False, None
        change = rel_l1(probe, bc.probe)
        signal = float(change.max())
        mask = tie_groups(s, (change <= self.first_block) & bc.below(self.max_reuse))
        if not self.per_sample:
            return bool(mask.all()), signal
        if bool(mask.all()):
            return True, signal
        return (mask if bool(mask.any()) else False), signal

    def _change(self, bc: BranchCache, latent: torch.Tensor) -> torch.Tensor | None:
        """Per sample, how far this call is from the last: the relative change of what ``step``
        was handed, the first block's modulated input (TeaCache) or the latent, or the latent's
        change times the output's rate of change per input change between the last two computed
        calls, an estimate of the output's own change (EasyCache). None while there is no rate
        yet. TeaCache's coefficients map the change through their polynomial, clamped at zero: a
        fitted polynomial can dip below it near zero change, and a negative change would shrink
        the accumulated one, reusing ever after."""
        change = rel_l1(latent, bc.last_input)
        if self.teacache_signal == "output":
            rate = bc.signals.get("output_rate")
            return None if rate is None else change * rate
        if self.teacache_coefficients is not None:
            change = polyval(self.teacache_coefficients, change).clamp_min(0)
        return change

    def observe(self, s: Step, st: CacheState, bc: BranchCache, outs: list[torch.Tensor],
                kind: str) -> None:
        """After a call: under fit_teacache, the pair (signal's change, output's change) since the
        branch's last call; EasyCache's rate, taken at each computed call: the output's relative
        change over the input's, since the last computed call (``bc.last_input`` is this call's
        latent here)."""
        sig = bc.signals
        if st.calibration is not None and self._fits_teacache:
            change, last = sig.pop("fit_change", None), sig.get("fit_output")
            if change is not None and last is not None:
                st.calibration.append((change, rel_l1(outs[0], last)))
            sig["fit_output"] = st.current[s.branch][0]
            return
        if self.teacache_signal != "output" or kind not in ("compute", "block"):
            return
        if "input_at_compute" in sig and len(bc.outputs) >= 2:
            out_change = rel_l1(bc.outputs[-1][1][0], bc.outputs[-2][1][0])
            sig["output_rate"] = out_change / rel_l1(bc.last_input, sig["input_at_compute"]
                                                     ).clamp_min(1e-12)
        sig["input_at_compute"] = bc.last_input


def polyval(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """The polynomial with ``coefficients`` (highest degree first) at ``x`` (Horner), in ``x``'s
    dtype and device. Evaluated in float64: a polynomial fitted over small changes has large
    coefficients whose terms cancel (degree 7 over changes of 0.013-0.026: coefficients up to
    1.8e15, terms near 1e3, a value near 0.1), which float32 loses (off by 0.015, a tenth of the
    value). On the model's device, so no copy to the host and back (MPS, which has no float64,
    on the host)."""
    x64 = x.detach().to("cpu" if x.device.type == "mps" else x.device, torch.float64)
    y = torch.zeros_like(x64)
    for c in coefficients:
        y = y * x64 + c
    return y.to(x.device, x.dtype)


def tie_groups(s: Step, mask: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """A per-sample decision with the guidance branches batched in one call tied (``s.groups``:
    batched CFG's two halves, PAG's three thirds): a sample reuses only where its copy in every
    branch may. Branches that reuse apart make errors that do not cancel in the guidance
    differences, which the pipeline multiplies by its scales; a call whose branches decide apart
    would also compute the whole batch for one branch's sake."""
    n, g = mask.shape[0], s.groups
    if g < 2 or n % g:
        return mask
    tied = mask.reshape(g, n // g).all(0)
    return np.concatenate([tied] * g) if isinstance(tied, np.ndarray) else tied.repeat(g)


def cfg_ready(s: Step, state: CacheState) -> bool:
    """A branch difference to rebuild this call from: on batch halves, the one taken at the last
    computed step (halves are part of the signature, so it is of this layout); per-branch calls
    need their own branch's difference and this step's branch 0."""
    if s.branch not in state.cfg_diff:
        return False
    if s.halves:
        return True
    return s.branch >= 1 and state.current.get(0) is not None


def _steps(value: Any, what: str) -> frozenset[int]:
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PolicyError(f"schedule {what!r} must be a list of step indices, got {value!r}")
    if any(v < 1 for v in value):
        raise PolicyError(f"schedule {what!r}={sorted(value)}: step indices start at 0 and step 0 "
                          "cannot reuse anything (nothing is cached before the first step)")
    return frozenset(value)


def _threshold(spec: dict, name: str) -> float:
    v = spec.get("threshold")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 10:
        raise PolicyError(f"{name} threshold={v!r}: must be a number in (0, 10]")
    return float(v)


_KEYS = {
    "schedule": {"rule", "step", "cfg", "block"},
    "first_block": {"rule", "threshold"},
    "teacache": {"rule", "threshold", "signal", "coefficients"},
    "fastercache": {"rule", "every"},
}
_COMMON = {"probe", "span", "step_mode", "extrapolate", "max_reuse", "per_sample", "start"}


def make_policy(cache: Any, n_blocks: int | None) -> "Policy | MixCache | None":
    """Parse the ``cache`` option against a model of ``n_blocks`` blocks: ``None`` (reuse
    nothing), a MixCache preset name, ``{"rule": "mixcache", ...}``, or a rule dict / list of them.
    ``n_blocks`` None (before the model is seen): every check but the block indices'."""
    from .mixcache import PRESETS, make_mixcache
    if cache is None:
        return None
    cache = native(cache)
    if isinstance(cache, str):
        if cache not in PRESETS:
            raise PolicyError(f"cache={cache!r}: a preset is one of {sorted(PRESETS)}")
        cache = {"rule": "mixcache", "preset": cache}
    if isinstance(cache, (list, tuple)) and len(cache) == 1 and isinstance(cache[0], dict):
        cache = cache[0]            # a list of one rule is that rule
    if isinstance(cache, dict) and cache.get("rule") == "mixcache":
        policy = make_mixcache(cache)
    else:
        policy = _rules(cache)
    return _check_blocks(policy, n_blocks)


def native(value: Any) -> Any:
    """NumPy values as Python's (``list(np.arange(3))``, a float32 threshold, an array ``span``),
    and tuples as lists, so that a value given twice compares as the user meant it."""
    if isinstance(value, dict):
        return {k: native(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [native(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {native(v) for v in value}
    if isinstance(value, np.ndarray):
        return native(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# Keys that do something only with some rules, and their defaults: another value given without
# those rules does nothing, which the user did not mean.
_NEEDS = {
    "start": ({"first_block", "teacache", "fastercache"}, 0, "the threshold rules' first step"),
    "probe": ({"block", "first_block"}, 1, "block reuse's probe"),
    "span": ({"block", "first_block"}, [None, None], "the blocks block reuse may skip"),
    "step_mode": ({"step", "teacache"}, "output", "how a step is reused"),
    "extrapolate": ({"step", "teacache"}, 0, "how a step is reused"),
}


def warn_unread_keys(given: dict[str, Any], reuses: set[str], where: str) -> None:
    """Warn of each key in ``given`` that none of the reuses asked for (``reuses``: rule names,
    schedule or MixCache granularities) reads."""
    for key in sorted(set(given) & set(_NEEDS)):
        needs, default, what = _NEEDS[key]
        if not reuses & needs and given[key] != default:
            warnings.warn(f"mixcache: {where}: {key}={given[key]!r} sets {what}, which only "
                          f"{sorted(needs)} read, and none of them is asked for: it does nothing",
                          stacklevel=3)


def _rules(cache: Any) -> Policy:
    specs = [cache] if isinstance(cache, dict) else cache
    if (not isinstance(specs, (list, tuple)) or not specs
            or not all(isinstance(s, dict) for s in specs)):
        raise PolicyError(f"cache must be None, a preset name, a dict or a non-empty list of "
                          f"dicts with a 'rule' in {RULES}")
    kw: dict[str, Any] = {}
    seen: set[str] = set()
    for spec in specs:
        rule = spec.get("rule")
        if rule not in RULES:
            raise PolicyError(f"cache rule {rule!r}: must be one of {RULES}")
        if rule == "mixcache":
            raise PolicyError("the mixcache rule decides every granularity itself: give it "
                              "alone, not in a list with other rules")
        if rule in seen:
            # A second dict of a rule would replace the first's settings, not add to them.
            raise PolicyError(f"cache rule {rule!r} given twice: give each rule once (a "
                              "schedule's 'step', 'cfg' and 'block' lists go in one dict)")
        seen.add(rule)
        unknown = set(spec) - _KEYS[rule] - _COMMON
        if unknown:
            raise PolicyError(f"cache rule {rule!r}: unknown key(s) {sorted(unknown)}; valid: "
                              f"{sorted(_KEYS[rule] | _COMMON)}")
        for k in _COMMON & set(spec):
            if k in kw and kw[k] != spec[k]:
                raise PolicyError(f"cache key {k!r} is given twice, {kw[k]!r} and {spec[k]!r}: "
                                  "it applies to every rule of the list, so give it once")
            kw[k] = spec[k]
        if rule == "schedule":
            kw["step_steps"] = _steps(spec.get("step", []), "step")
            kw["cfg_steps"] = _steps(spec.get("cfg", []), "cfg")
            kw["block_steps"] = _steps(spec.get("block", []), "block")
        elif rule == "first_block":
            kw["first_block"] = _threshold(spec, rule)
        elif rule == "teacache":
            kw["teacache"] = _threshold(spec, rule)
            kw["teacache_signal"] = spec.get("signal", "modulated")
            if kw["teacache_signal"] not in ("modulated", "input", "output"):
                raise PolicyError(f"teacache signal={kw['teacache_signal']!r}: must be "
                                  "'modulated' (the change of the first block's timestep-"
                                  "modulated input, TeaCache), 'input' (the input latent's) or "
                                  "'output' (the output's change estimated from the latent's, "
                                  "EasyCache)")
            kw["teacache_coefficients"] = _coefficients(spec.get("coefficients"),
                                                        kw["teacache_signal"])
        elif rule == "fastercache":
            every = spec.get("every")
            if not isinstance(every, int) or every < 2:
                raise PolicyError(f"fastercache every={every!r}: must be an integer >= 2")
            kw["cfg_every"] = every
    reuses = seen - {"schedule"} | {g for g in ("step", "cfg", "block") if kw.get(f"{g}_steps")}
    warn_unread_keys({k: v for k, v in kw.items() if k in _COMMON}, reuses, "cache")
    return Policy(**kw)


def _coefficients(value: Any, signal: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if signal == "output":
        raise PolicyError("teacache coefficients rescale the change of signal 'modulated' or "
                          "'input'; signal 'output' (EasyCache) is already an estimate of the "
                          "output's change")
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                       and math.isfinite(c) for c in value)):
        raise PolicyError(f"teacache coefficients={value!r}: must be a list of 1 to 8 finite "
                          "numbers, highest degree first (numpy.polyfit's order, TeaCache's), as "
                          "dit_compile.fit_teacache returns them")
    return tuple(float(c) for c in value)


def _check_blocks(policy: Any, n_blocks: int | None) -> Any:
    # The forms first, so that these are said before any trace; the ranges wait for the blocks.
    if not (_integer(policy.probe) and policy.probe >= 1):
        raise PolicyError(f"probe={policy.probe!r}: must be an integer >= 1 (the blocks run "
                          "before the block decision)")
    span = policy.span
    if not (isinstance(span, (list, tuple)) and len(span) == 2
            and all(v is None or _integer(v) for v in span)):
        raise PolicyError(f"span={span!r}: must be [start, end], the block indices the block "
                          "guard may skip (None: from the probe's end, to the last block)")
    if n_blocks is not None:
        _check_span(policy, n_blocks)
    if policy.step_mode not in ("output", "residual"):
        raise PolicyError(f"step_mode={policy.step_mode!r}: must be 'output' or 'residual'")
    order = policy.extrapolate
    if not isinstance(order, int) or order not in (0, 1, 2):
        raise PolicyError(f"extrapolate={order!r}: must be false (reuse the last output), true or 1 "
                          "(first order, from the last two computed outputs) or 2 (second order, "
                          "from the last three)")
    policy.extrapolate = int(order)
    if policy.step_mode == "residual" and policy.extrapolate:
        raise PolicyError(f"extrapolate={order!r} with step_mode='residual': extrapolation is of "
                          "the outputs (step_mode='output'); a residual step reuse adds the last "
                          "computed change over the latent as it is, so give extrapolate=0 with it")
    if policy.max_reuse is not None and not (_integer(policy.max_reuse) and policy.max_reuse >= 1):
        raise PolicyError(f"max_reuse={policy.max_reuse!r}: must be a positive integer or None")
    if not isinstance(policy.per_sample, bool):
        raise PolicyError(f"per_sample={policy.per_sample!r}: must be true or false")
    start = getattr(policy, "start", 0)    # MixCache's trigger decides its own start
    if not (_integer(start) and start >= 0):
        raise PolicyError(f"start={start!r}: must be a step index (an integer >= 0)")
    return policy


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_span(policy: Any, n_blocks: int) -> None:
    probe, (a, b) = policy.probe, tuple(policy.span)
    a = probe if a is None else a
    b = n_blocks if b is None else b
    if not probe < n_blocks:
        raise PolicyError(f"probe={probe!r}: must be between 1 and {n_blocks - 1} (the model has "
                          f"{n_blocks} blocks)")
    if not probe <= a < b <= n_blocks:
        raise PolicyError(f"span={list(policy.span)}: must satisfy probe ({probe}) <= start < end <= "
                          f"{n_blocks} (the model has {n_blocks} blocks, numbered 0..{n_blocks - 1})")
    policy.span = (a, b)
