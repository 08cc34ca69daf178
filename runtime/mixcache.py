"""The MixCache policy: a context-aware trigger, then at each call the granularity that saves the
most compute for the error it is expected to add.

Signals, all of which the runtime already has (no extra forward):

* ``probe``: relative L1 change of the probe residual (first block(s)) since the last call of the
  same branch, the block-reuse error estimate (First-Block-Cache's proxy for how much the deep
  blocks' residual moved). It runs only where blocks may be reused. It is neither the step
  estimate nor the trigger: ranked against the damage of reusing single steps on the trained
  models (``bench/signal_study.py``, 144 single-step reuses per model), the probe's change orders
  them with Spearman 0.28 / 0.35 (small / large), the input latent's (TeaCache's signal) 0.38 /
  0.31, the output's own change 0.67 / 0.61. The output predicts best, so the step estimate and
  the trigger are built from it.
* The trigger: caching may start once the noise level has fallen below ``1 - warmup`` of where the
  generation started and the output has settled: its relative change between the last two
  computed calls, per unit of the noise range, below ``settle`` (per sample; once settled it stays
  on for the generation, and from there the budget decides). On the trained models the output
  moves at 1.5-2.6 per unit over the first steps and 0.5-1.0 in the middle
  (``bench/RESULTS.md``). A trigger that holds caching off over those first steps costs FLOPs and
  fidelity at once there (tuning cases, `balanced`: at ``settle`` 1.0 0.72-0.78 of the FLOPs at
  29.8 / 31.4 dB, against 0.40 at 31.5 / 33.9 dB where it does not bind): the budget's estimate is
  weighted by the step length, and the first steps are the shortest, so the reuse an early hold
  forbids is the cheapest there is, and what the budget then spends late costs more. So
  ``settle`` = 3.0 is a guard for models whose outputs move faster than these do, not a brake on
  them; the warm-up in noise level and the budget decide when caching starts.
* ``out_rate``: relative change of the output per unit of timestep between the last two computed
  calls of the branch; reusing the last output at ``t`` is off by ``out_rate * |t - t_last|``.
  With ``extrapolate`` (first order, from the last two computed outputs) the error is that of a
  linear predictor: ``curvature`` (change of that slope, relative to the output) times the distance.
  The same estimate stands for second order (``extrapolate=2``, through the last three): it is the
  size of the term the parabola corrects, a conservative stand-in for that predictor's error, and
  the budgets of the presets that use it were tuned with it.
  The sampler then multiplies that output error by its step length, so the estimate is weighted by
  the step about to be taken: the last spacing of timesteps, and never more than ``t`` itself (no
  step goes below zero). With 20 flow-matching steps at shift 3 the steps grow from 0.02 to 0.14
  of the noise range, and on `small` reusing the penultimate step alone left the video at 33.7 dB
  where a middle step left it at 51-53 dB (the same study). The weighting orders single steps less
  well (Spearman 0.51 / 0.41 against 0.69 / 0.61), yet as the budget of a policy that reuses many
  steps it chose better schedules in the tuning sweeps (reuse early, where steps are short; compute
  late, where they are long): one step's damage is not the whole of a schedule's.
* ``cfg_rate``: change of the guidance-branch difference per unit of timestep, relative to the
  output; rebuilding a branch from the other is expected to be off by ``cfg_rate * |t - t_diff|``.
  Where a pipeline batches both branches into one call (CogVideoX), the same estimate holds for
  the unconditional half rebuilt from the conditional one; that reuse saves half the call.

Every estimate is an output error times the step length, so they add up to the error the reuse
leaves in the latent. Decision: the error already spent since the last full compute counts
against ``budget``; among the granularities whose estimate fits in what is left, step or cfg reuse
(which save the whole call) beat block reuse (which saves the span), and the smaller estimate wins
a tie. ``max_reuse`` bounds consecutive reuse, so drift never runs unchecked. Block decisions are
per sample; step and cfg reuse skip the whole call, so they need every sample's estimate to fit,
and step reuse is one decision per step for both guidance branches (each branch's estimate must
fit), so the errors the two predictions carry largely cancel in their difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import BranchCache, CacheState, Step
from .policy import CFG, COMPUTE, STEP, PolicyError, cfg_ready, rel_l1

GRANULARITIES = ("step", "cfg", "block")

# Budgets: relative error of the output times the fraction of the noise range it is used over.
# Chosen with bench/tune_presets.py on 16 cases disjoint from the evaluation cases (numbers in
# bench/RESULTS.md). There, whole-step reuse with extrapolation gave the best PSNR for the FLOPs
# saved; cfg reuse lost 5-20 dB for the same FLOPs (with CFG 4 an error in the guidance difference
# is amplified threefold) and block reuse more, so the presets reuse steps only and the other
# granularities stay available through `granularities`. The reuse bound sets the rhythm (one in
# two, two in three, three in four at most) and the budget where the rhythm breaks. Second-order
# extrapolation (through the last three computed outputs) pays where reuse runs are one or two
# steps long: on the tuning cases, at the same FLOPs or fewer, 1.2-3.0 dB more for `quality` and
# 0.2-2.0 dB for `balanced`; with runs of three, at `fast`'s budget, it lost 1.3 dB on `small` (a
# parabola through points three steps apart, carried three more), so `fast` stays first order.
_STEP = dict(granularities=("step",), warmup=0.03)
PRESETS: dict[str, dict] = {
    "quality": dict(_STEP, extrapolate=2, budget=0.008, max_reuse=1),
    "balanced": dict(_STEP, extrapolate=2, budget=0.02, max_reuse=2),
    "fast": dict(_STEP, extrapolate=1, budget=0.024, max_reuse=3),
}


@dataclass
class MixCache:
    budget: float = 0.02
    warmup: float = 0.03
    settle: float = 3.0
    max_reuse: int = 2
    granularities: tuple[str, ...] = GRANULARITIES
    per_sample: bool = True
    probe: int = 1
    span: tuple[int, int | None] = (1, None)
    step_mode: str = "output"
    extrapolate: int = 2

    @property
    def reuses_blocks(self) -> bool:
        return "block" in self.granularities

    @property
    def uses_blocks(self) -> bool:
        """The probe runs (and the call stops at the block guard) only where blocks may be reused:
        the trigger reads the output."""
        return self.reuses_blocks

    @property
    def cfg_on_halves(self) -> bool:
        """cfg reuse on batched-CFG calls (both branches as batch halves of one call): the half
        that is rebuilt is estimated as on separate calls, from its own difference's rate."""
        return "cfg" in self.granularities

    def _triggered(self, s: Step, st: CacheState, bc: BranchCache) -> bool:
        return (s.t <= (1.0 - self.warmup) * st.t_first and bc.signals.get("settled", False)
                and bc.most_reused < self.max_reuse)

    @staticmethod
    def _step_length(s: Step, st: CacheState, bc: BranchCache) -> float:
        """The sampler step about to use this call's output, as a fraction of the noise range: the
        last spacing of timesteps, capped at ``t`` (no step goes below zero). A second call at one
        timestep (Heun's corrector evaluates there again, on the corrected latent) steps on from
        there: its spacing is the last one that was not zero. A call at ``t`` = 0 (DDPM's last)
        still has its output used, for x0: its step is the spacing, never free."""
        prev = bc.signals.get("prev_t", bc.outputs[-1][0] if bc.outputs else s.t)
        spacing = abs(s.t - prev) or bc.signals.get("spacing", 0.0)
        return (min(spacing, abs(s.t)) or spacing) / max(abs(st.t_first), 1e-12)

    def _left(self, bc: BranchCache) -> torch.Tensor | float:
        return self.budget - bc.signals.get("spent", 0.0)

    def _step_error(self, s: Step, st: CacheState, bc: BranchCache) -> float | None:
        """Expected error of reusing this branch's last output at ``s.t``; None while it may not."""
        if not self._triggered(s, st, bc) or "out_rate" not in bc.signals or not bc.outputs:
            return None
        if s.t == bc.signals.get("prev_t"):
            # The estimate measures how far the timestep moved. Here only the latent did (Heun's
            # second evaluation at one timestep), and any reuse would hand back the very output
            # of the last call: nothing says what that costs, so compute.
            return None
        # Reusing the last output is off by how fast it moves; extrapolating from the last two is
        # off by how fast that slope itself changes (until the slope has changed once, three
        # computed calls in, the first rate stands in for it).
        rate = (bc.signals.get("curvature", bc.signals["out_rate"]) if self.extrapolate
                else bc.signals["out_rate"])
        return rate * abs(s.t - bc.outputs[-1][0]) * self._step_length(s, st, bc)

    def _shared_step_error(self, s: Step, st: CacheState) -> float | None:
        """Step reuse is one decision per step for all guidance branches, taken at the step's first
        call: every branch called at the last step must be able to reuse within its budget.

        Branches that reuse at different steps make errors that do not cancel in the guidance
        difference, which the pipeline multiplies by the guidance scale; reused together, both are
        extrapolated over the same steps and their errors largely do. On the trained models' tuning
        cases, tying the branches raised the mean PSNR by 0.5-2.6 dB and the worst case by up to
        6.6 dB, for at most 0.013 more of the FLOPs (bench/RESULTS.md)."""
        decided = st.signals.get("step_errors")
        if decided is not None and decided[0] == s.step:
            return decided[1].get(s.branch)
        lead = st.branch(s.branch).signals.get("prev_t")
        estimates: dict[int, float | None] = {}
        for b, bc in st.branches.items():
            if b != s.branch and bc.signals.get("prev_t") != lead:
                continue        # not called at the last step (guidance off there): not tied
            estimates[b] = self._step_error(s, st, bc)
        fit = all(e is not None and e <= float(torch.as_tensor(self._left(st.branches[b])).min())
                  for b, e in estimates.items())
        # The estimates are kept either way: a computed call's trace shows the one that did not fit.
        st.signals["step_errors"] = (s.step, estimates if fit else {}, estimates)
        return estimates.get(s.branch) if fit else None

    def step(self, s: Step, st: CacheState, latent: torch.Tensor) -> tuple[str, float | None]:
        bc = st.branch(s.branch)
        if self.budget <= 0:
            return COMPUTE, None
        # Decided at the step's first call even when that branch may not reuse, so the others
        # follow it.
        err = self._shared_step_error(s, st) if "step" in self.granularities else None
        if not self._triggered(s, st, bc):
            return COMPUTE, None
        left = float(torch.as_tensor(self._left(bc)).min())
        options = [] if err is None or not bc.outputs else [(err, STEP)]
        cfg = st.signals.get("cfg", {}).get(s.branch, {})
        if "cfg" in self.granularities and cfg_ready(s, st) and "rate" in cfg and cfg["t"] != s.t:
            h = self._step_length(s, st, bc)
            options.append((cfg["rate"] * abs(s.t - cfg["t"]) * h, CFG))
        fits = sorted(o for o in options if o[0] <= left)
        if not fits:    # the trace shows the smallest estimate that did not fit
            decided = st.signals.get("step_errors")
            refused = [e for e, _ in options] + (
                [decided[2].get(s.branch)] if decided is not None and decided[0] == s.step else [])
            refused = [e for e in refused if e is not None]
            return COMPUTE, min(refused) if refused else None
        err, action = fits[0]
        bc.signals["spent"] = bc.signals.get("spent", 0.0) + err
        return action, err

    def block(self, s: Step, st: CacheState, bc: BranchCache, probe: torch.Tensor
              ) -> tuple[bool | torch.Tensor, float | None]:
        sig = bc.signals
        sig.pop("mask", None)
        if bc.probe is None or bc.probe.shape != probe.shape:
            return False, None
        change = rel_l1(probe, bc.probe)
        settled = sig.get("settled_mask")
        if settled is None or settled.shape != change.shape:
            settled = torch.zeros_like(change, dtype=torch.bool)
        err = change * self._step_length(s, st, bc)
        if ("block" not in self.granularities or self.budget <= 0 or bc.span is None
                or s.t > (1.0 - self.warmup) * st.t_first or not bool(settled.any())):
            return False, float(change.max())
        mask = (settled & (err <= torch.as_tensor(self._left(bc), device=change.device))
                & bc.below(self.max_reuse))
        if not self.per_sample:
            mask = mask.all().expand_as(mask)
        if not bool(mask.any()):
            return False, float(change.max())
        sig["mask"] = mask
        sig["spent"] = sig.get("spent", 0.0) + torch.where(mask, err, torch.zeros_like(err))
        return (True if bool(mask.all()) else mask), float(change.max())

    def observe(self, s: Step, st: CacheState, bc: BranchCache, outs: list[torch.Tensor],
                kind: str) -> None:
        """Update the rates after a call; a full compute clears the error spent (per sample)."""
        sig = bc.signals
        if sig.get("prev_t", s.t) != s.t:
            sig["spacing"] = abs(s.t - sig["prev_t"])
        sig["prev_t"] = s.t
        if kind == "compute":
            sig["spent"] = 0.0
        elif kind == "block" and "mask" in sig:
            m = sig["mask"]
            sig["spent"] = torch.where(m, sig["spent"], torch.zeros_like(sig["spent"]))
        if kind in ("compute", "block") and len(bc.outputs) >= 2:
            (tb, b), (ta, a) = bc.outputs[-2:]
            if ta != tb:
                change = rel_l1(a[0], b[0])
                sig["out_rate"] = float(change.max()) / abs(ta - tb)
                # The trigger says when caching may start, not when it must stop: the output
                # moves fastest again over the last, longest steps, and re-arming there would
                # compute the final step on top of a forced compute before it (with the probe as
                # the signal, 0.003-0.019 more of the FLOPs for at most 0.8 dB; bench/RESULTS.md).
                _latch(sig, change * abs(st.t_first) / abs(ta - tb) < self.settle)
                slope = (a[0] - b[0]) / (ta - tb)
                if "slope" in sig:
                    dims = tuple(range(1, slope.dim()))
                    num = (slope - sig["slope"]).abs().mean(dims, dtype=torch.float32)
                    den = a[0].abs().mean(dims, dtype=torch.float32).clamp_min(1e-12)
                    sig["curvature"] = float((num / den).max())
                sig["slope"] = slope
        if (st.cfg_step.get(s.branch) == s.step and (s.branch >= 1 or s.halves)
                and kind in ("compute", "block")):
            # Per branch, in the shared signals: a new prompt on any branch clears them. On batch
            # halves the difference is per pair of samples, relative to the conditional half.
            cfg = st.signals.setdefault("cfg", {}).setdefault(s.branch, {})
            d = st.cfg_diff[s.branch][0]
            out = outs[0][d.shape[0]:] if s.halves else outs[0]
            if "prev" in cfg and cfg["t"] != s.t:
                dims = tuple(range(1, d.dim()))
                num = (d.float() - cfg["prev"].float()).abs().mean(dims)
                den = out.float().abs().mean(dims).clamp_min(1e-12)
                cfg["rate"] = float((num / den).max()) / abs(cfg["t"] - s.t)
            cfg["prev"], cfg["t"] = d, s.t


def _latch(sig: dict, settled: torch.Tensor) -> torch.Tensor:
    """Per sample, settled now or before (the trigger stays on once settled)."""
    latched = sig.get("settled_mask")
    if latched is not None and latched.shape == settled.shape:
        settled = settled | latched
    sig["settled_mask"] = settled
    sig["settled"] = bool(settled.all())
    return settled


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_VALID = {
    "budget": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "warmup": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "settle": (lambda v: _number(v) and v > 0, "a number > 0"),
    "max_reuse": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  "an integer >= 1"),
    "per_sample": (lambda v: isinstance(v, bool), "true or false"),
}


def make_mixcache(spec: dict) -> MixCache:
    """``{"rule": "mixcache", "preset": "balanced", ...overrides}`` or a preset name alone."""
    spec = dict(spec)
    spec.pop("rule", None)
    preset = spec.pop("preset", "balanced")
    if preset not in PRESETS:
        raise PolicyError(f"mixcache preset {preset!r}: must be one of {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **spec}
    valid = set(MixCache.__dataclass_fields__)
    unknown = set(kw) - valid
    if unknown:
        raise PolicyError(f"mixcache: unknown key(s) {sorted(unknown)}; valid: "
                          f"{sorted(valid | {'preset'})}")
    for key, (ok, what) in _VALID.items():
        if key in kw and not ok(kw[key]):
            raise PolicyError(f"mixcache {key}={kw[key]!r}: must be {what}")
    gran = tuple(kw.get("granularities", GRANULARITIES))
    if not gran or set(gran) - set(GRANULARITIES):
        raise PolicyError(f"mixcache granularities={list(gran)}: a non-empty subset of {GRANULARITIES}")
    kw["granularities"] = gran
    return MixCache(**kw)
