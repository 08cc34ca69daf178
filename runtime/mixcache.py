"""The MixCache policy: a context-aware trigger, then at each call the granularity that saves the
most compute for the error it is expected to add.

Signals, all of which the runtime already has (no extra forward):

* ``probe``: relative L1 change of the probe residual (first block(s)) since the last call of the
  same branch, the block-reuse error estimate (First-Block-Cache's proxy for how much the deep
  blocks' residual moved). It runs only where blocks may be reused. It is neither the step
  estimate nor the trigger: ranked against the damage of reusing single steps on the trained
  models (``bench/signal_study.py``, 144 single-step reuses per model), the probe's change orders
  them with Spearman 0.28 / 0.35 (small / large), the input latent's 0.38 / 0.31, the first
  block's timestep-modulated input's (TeaCache's signal) 0.29 / 0.37, the output's own change
  0.67 / 0.61. The output predicts best, so the step estimate and the trigger are built from it.
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

* Conditions (``Step.conditions``): the mean magnitude per sample of the model's other inputs
  (ControlNet residuals, pooled text, image embeddings). None of the estimates above can see a
  condition switched on or off (ControlNet's ``control_guidance_start`` / ``_end``), since they
  are read off outputs computed before it: a sample where one moved by more than ``SWITCH``
  since its branch computed computes, and the branch's history starts again from there.

Every estimate is an output error times the step length, so they add up to the error the reuse
leaves in the latent. Decision: the error already spent since the last full compute counts
against ``budget``; among the granularities whose estimate fits in what is left, step or cfg reuse
(which save the whole call) beat block reuse (which saves the span), and the smaller estimate wins
a tie. ``max_reuse`` bounds consecutive reuse, so drift never runs unchecked. Step reuse is one
decision per step for both guidance branches (each branch's estimate must fit), so the errors the
two predictions carry largely cancel in their difference.

Per sample: every signal, the error spent and the consecutive-reuse count are kept per sample, and
step and block decisions are each sample's own, the ones it would take alone. A call skipped
whole needs every sample to reuse; where only some may, the batch is computed and those samples
take their prediction (or cached residual), and only the others' outputs enter the history, so
later estimates and extrapolations stay each sample's own. cfg reuse is a decision for the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cache import RUN_ROUNDING, BranchCache, CacheState, Step, per_sample_view, sample_times
from .policy import (CFG, COMPUTE, STEP, PolicyError, cfg_ready, rel_l1, tie_groups,
                     warn_unread_keys)

GRANULARITIES = ("step", "cfg", "block")
# A condition whose magnitude moves by more than this share of the larger value was switched.
# ControlNet's residuals drift by 1-2% a step (tiny Flux ControlNet, 8 and 20 steps: at most 6%
# over four steps, the longest gap a preset's reuse run leaves); one of two ControlNets switched
# off moves their sum by about 40% (FluxMultiControlNetModel, SD3MultiControlNetModel).
SWITCH = 0.2

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
    span: tuple[int | None, int | None] = (None, None)     # as Policy's
    step_mode: str = "output"
    extrapolate: int = 2
    # Its step and block decisions' signals are both estimated errors: a computed call shows the
    # smaller (the executor compares them).
    signals_are_errors = True

    @property
    def reuses_blocks(self) -> bool:
        return "block" in self.granularities

    @property
    def uses_blocks(self) -> bool:
        """The probe runs (and the call stops at the block guard) only where blocks may be reused:
        the trigger reads the output."""
        return self.reuses_blocks

    @property
    def reuses_cfg(self) -> bool:
        """cfg reuse, on separate calls per branch and on batched-CFG calls (both branches as
        batch halves of one call), whose rebuilt half is estimated as on separate calls, from
        its own difference's rate."""
        return "cfg" in self.granularities

    @property
    def watches_conditions(self) -> bool:
        """The other conditions' magnitudes come with each call (``Step.conditions``): a
        condition switched on or off since a branch last computed (ControlNet's
        ``control_guidance_start`` / ``_end``) moves the output in a way its history cannot
        foresee, so a call where one did computes."""
        return True

    def _moved(self, s: Step, bc: BranchCache, n: int) -> np.ndarray | None:
        """Per sample (bool, host): a condition's magnitude moved by more than ``SWITCH`` of the
        larger of its two values since this branch last computed. Conditions that follow the
        latent step by step (ControlNet's residuals while it is on) move by far less than that.
        None where there is nothing to compare (no op on the reused call's path)."""
        now, then = s.conditions, bc.signals.get("conditions")
        if now is None or then is None:
            return None
        if then.shape != now.shape:
            return np.ones(n, dtype=bool)
        return (np.abs(now - then) > SWITCH * np.maximum(now, then)).any(0)

    @property
    def ties_groups(self) -> bool:
        per_sample = self.per_sample and bool({"step", "block"} & set(self.granularities))
        return self.reuses_cfg or per_sample

    def _allowed(self, s: Step, st: CacheState, bc: BranchCache, n: int) -> np.ndarray:
        """Per sample (bool, host): past the warm-up, settled, under the bound on consecutive
        reuse."""
        _fold_pending(bc.signals, st)
        settled = _host(bc.signals.get("settled_mask", bc.signals.get("settled", False)))
        below = bc.below(self.max_reuse)    # a bool while the batch reused alike
        if self._warming_up(s, st) or settled.size not in (1, n) or below is False:
            return np.zeros(n, dtype=bool)
        settled = settled if settled.shape == (n,) else np.full(n, settled.item())
        return settled if below is True else settled & _host(below)

    def _warming_up(self, s: Step, st: CacheState) -> bool:
        """Whether the noise level has not yet fallen by ``warmup`` of the generation's range."""
        return s.t > st.t_first - self.warmup * (st.t_first - st.t_floor)

    @staticmethod
    def _step_length(s: Step, st: CacheState, bc: BranchCache) -> float:
        """The sampler step about to use this call's output, as a fraction of the noise range: the
        last spacing of timesteps, capped at what is left above the range's floor
        (``CacheState.t_floor``: no step goes below it). A second call at one timestep (Heun's
        corrector evaluates there again, on the corrected latent) steps on from there: its
        spacing is the last one that was not zero. A call at ``t`` = 0 (DDPM's last)
        still has its output used, for x0: its step is the spacing, never free."""
        last = bc.outputs[-1][0] if bc.outputs else s.t
        prev = bc.signals.get("prev_t", max(last) if isinstance(last, tuple) else last)
        spacing = abs(s.t - prev) or bc.signals.get("spacing", 0.0)
        return ((min(spacing, s.t - st.t_floor) or spacing)
                / max(st.t_first - st.t_floor, 1e-12))

    def _left(self, bc: BranchCache) -> np.ndarray | float:
        return self.budget - bc.signals.get("spent", 0.0)

    def _step_error(self, s: Step, st: CacheState, bc: BranchCache, n: int
                    ) -> np.ndarray | None:
        """Per sample, the expected error of reusing this branch's last output (extrapolated) at
        ``s.t``, inf where that sample may not reuse yet; None where nothing says what it costs."""
        sig = bc.signals
        _fold_pending(sig, st)
        if "out_rate" not in sig or not bc.outputs:
            return None
        prev = sig.get("prev_t")
        if prev is not None and abs(s.t - prev) <= RUN_ROUNDING * max(abs(st.t_first), abs(s.t)):
            # The estimate measures how far the timestep moved. Here only the latent did (Heun's
            # second evaluation at one timestep; KDPM2's at one within rounding), and any reuse
            # would hand back the very output of the last call: nothing says what that costs,
            # so compute.
            return None
        # Reusing the last output is off by how fast it moves; extrapolating from the last two is
        # off by how fast that slope itself changes (until the slope has changed once, three
        # computed calls in, the first rate stands in for it).
        rate = _per_sample(sig["out_rate"], n)
        if self.extrapolate and "curvature" in sig:
            curvature = _per_sample(sig["curvature"], n)
            rate = np.where(np.isnan(curvature), rate, curvature)
        last = bc.outputs[-1][0]
        distance = np.abs(s.t - sample_times(last, n)) if isinstance(last, tuple) else abs(s.t - last)
        err = rate * (distance * self._step_length(s, st, bc))
        return np.where(self._allowed(s, st, bc, n), err, np.inf)

    def _shared_step_error(self, s: Step, st: CacheState, n: int
                           ) -> tuple[np.ndarray | None, np.ndarray]:
        """This branch's per-sample step estimates, and which samples reuse the step: decided once
        per step for all guidance branches, at the step's first call. A sample reuses where every
        branch called at the last step can reuse it within that branch's budget.

        Branches that reuse at different steps make errors that do not cancel in the guidance
        difference, which the pipeline multiplies by the guidance scale; reused together, both are
        extrapolated over the same steps and their errors largely do. On the trained models' tuning
        cases, tying the branches raised the mean PSNR by 0.5-2.6 dB and the worst case by up to
        6.6 dB, for at most 0.013 more of the FLOPs (bench/RESULTS.md). Guidance branches batched
        in one call (CFG's halves, PAG's thirds) are tied the same way."""
        decided = st.signals.get("step_errors")
        if decided is not None and decided[0] == s.step:
            fit = decided[1]
            return decided[2].get(s.branch), fit if fit.shape == (n,) else np.full(n, fit.all())
        lead = st.branch(s.branch).signals.get("prev_t")
        estimates: dict[int, np.ndarray | None] = {}
        fit = np.ones(n, dtype=bool)
        for b, bc in st.branches.items():
            if b != s.branch and bc.signals.get("prev_t") != lead:
                continue        # not called at the last step (guidance off there): not tied
            # A guidance pass of another batch (LTX-2's) has samples of its own: tied as a whole.
            nb = n if b == s.branch or bc.samples is None else bc.samples
            estimates[b] = e = self._step_error(s, st, bc, nb)
            ok = e <= self._left(bc) if e is not None else np.zeros(nb, dtype=bool)
            fit = fit & (ok if nb == n else ok.all())
        fit = tie_groups(s, fit)
        if not self.per_sample:
            fit = np.full(n, fit.all())
        # The estimates are kept either way: a computed call's trace shows the one that did not fit.
        st.signals["step_errors"] = (s.step, fit, estimates)
        return estimates.get(s.branch), fit

    def step(self, s: Step, st: CacheState, latent: torch.Tensor) -> tuple[str, float | None]:
        bc = st.branch(s.branch)
        bc.signals.pop("step_mask", None)
        bc.signals.pop("mask", None)
        n = latent.shape[0]
        # A sample whose conditions switched computes, whatever was decided for the step.
        bc.signals["moved"] = moved = self._moved(s, bc, n)
        if self.budget <= 0:
            return COMPUTE, None
        # Decided at the step's first call even when that branch may not reuse, so the others
        # follow it.
        err, fit = (self._shared_step_error(s, st, n) if "step" in self.granularities
                    else (None, np.zeros(n, dtype=bool)))
        allowed = self._allowed(s, st, bc, n)
        if moved is not None:
            fit, allowed = fit & ~moved, allowed & ~moved
        if not allowed.any():
            return COMPUTE, None
        if err is not None and bc.outputs and fit.all():
            # A step reuse that fits saves the whole call, the most any reuse saves: on batch
            # halves a cfg reuse computes one half (its smaller estimate took it over a step
            # reuse that fitted as well: SD3 at 20 steps under "fast" with cfg allowed computed
            # 0.65 of the FLOPs, 0.35 without). On per-branch calls, too, the step was decided
            # for every branch called at the last step: this one reuses it even where cfg reuse
            # would cost less. Rebuilt from branch 0's prediction and a stale difference, it
            # would carry that prediction's error as well, and the guidance difference would not
            # cancel the two branches' errors.
            self._spend(bc, err, n)
            return STEP, float(err.max())
        cfg, refused = st.signals.get("cfg", {}).get(s.branch, {}), []
        if ("cfg" in self.granularities and allowed.all() and cfg_ready(s, st)
                and "rate" in cfg and cfg["t"] != s.t):
            estimate = _rate(cfg) * abs(s.t - cfg["t"]) * self._step_length(s, st, bc)
            if estimate <= float(_per_sample(self._left(bc), n).min()):
                self._spend(bc, estimate, n)
                return CFG, estimate
            refused.append(estimate)
        if err is not None and bc.outputs and fit.any():
            # Some samples may reuse the step, others not: the batch is computed (the graph is
            # compiled for it) and the samples that may reuse take their prediction, as each
            # would alone. No FLOPs saved; the decision is the sample's own, whatever its batch.
            bc.signals["step_mask"] = fit
            self._spend(bc, np.where(fit, err, 0.0), n)
            return STEP, float(err[fit].max())
        # The trace shows the smallest estimate that did not fit.
        estimates = refused + ([float(err.min())] if err is not None else [])
        estimates = [e for e in estimates if e != float("inf")]
        return COMPUTE, min(estimates) if estimates else None

    def _spend(self, bc: BranchCache, err: np.ndarray | float, n: int) -> None:
        """Charge ``err`` (per sample, or for all) to the branch's budget: kept per sample on the
        host, where the decisions are taken."""
        spent = bc.signals.get("spent", 0.0) + err
        bc.signals["spent"] = spent if isinstance(spent, float) else _per_sample(spent, n)

    def block(self, s: Step, st: CacheState, bc: BranchCache, probe: torch.Tensor
              ) -> tuple[bool | torch.Tensor, float | None]:
        sig = bc.signals
        _fold_pending(sig, st)
        sig.pop("mask", None)
        if bc.probe is None or bc.probe.shape != probe.shape:
            return False, None
        change = rel_l1(probe, bc.probe)
        n = change.shape[0]
        settled = _host(sig.get("settled_mask", False))
        if settled.size not in (1, n):
            settled = np.zeros(n, dtype=bool)
        if sig.get("moved") is not None:
            settled = settled & ~sig["moved"]
        settled = torch.tensor(settled, device=change.device)
        # The signal, as the step decision's: the estimated error of the reuse taken, or where
        # none is, the smallest that was not (the probe's change alone is no error).
        err = change * self._step_length(s, st, bc)
        if ("block" not in self.granularities or self.budget <= 0 or bc.span is None
                or self._warming_up(s, st) or not bool(settled.any())):
            return False, float(err.min())
        left = torch.tensor(_per_sample(self._left(bc), n), device=change.device)
        below = torch.as_tensor(bc.below(self.max_reuse)).to(change.device)
        mask = tie_groups(s, settled & (err <= left) & below)
        if "step_mask" in sig:      # those reuse the step: alone, they would not get here
            mask = mask & ~torch.as_tensor(sig["step_mask"], device=mask.device)
        if not self.per_sample:
            mask = mask.all().expand_as(mask)
        if not bool(mask.any()):
            return False, float(err.min())
        sig["mask"] = mask
        self._spend(bc, _host(torch.where(mask, err, torch.zeros_like(err))), n)
        return (True if bool(mask.all()) else mask), float(err[mask].max())

    def observe(self, s: Step, st: CacheState, bc: BranchCache, outs: list[torch.Tensor],
                kind: str) -> None:
        """Update the rates after a call, per sample from the samples that computed; a full
        compute clears the error spent (per sample)."""
        sig = bc.signals
        _fold_pending(sig, st)
        if sig.get("prev_t", s.t) != s.t:
            sig["spacing"] = abs(s.t - sig["prev_t"])
        sig["prev_t"] = s.t     # noise levels only under cache.NOISE_KEYS (read again there)
        # The samples that reused: all for a step, cfg or block reuse of the whole call; some for
        # a partial one (the others computed); none for a compute.
        reused = {"compute": None, "block": sig.get("mask", True),
                  STEP: sig.get("step_mask", True)}.get(kind, True)
        if reused is None:
            sig["spent"] = 0.0
        elif reused is not True:
            reused = _host(reused)
            n = reused.shape[0]
            # After a partial step reuse, the others that reused the span keep their spend too.
            kept = reused | _host(sig["mask"]) if kind == STEP and "mask" in sig else reused
            sig["spent"] = np.where(kept, _per_sample(sig.get("spent", 0.0), n), 0.0)
        # The conditions the computed outputs were made under: a reuse is judged against them.
        now, then = s.conditions, sig.get("conditions")
        if now is not None and kind in ("compute", "block"):
            sig["conditions"] = now
        elif now is not None and kind == STEP and reused is not True:
            sig["conditions"] = (now if then is None or then.shape != now.shape
                                 else np.where(reused, then, now))
        computed = (kind in ("compute", "block") or (kind == STEP and reused is not True))
        moved = sig.get("moved")
        if computed and moved is not None and moved.any():
            # The outputs before a switch say nothing of those after it: rates and predictions
            # start again from this call's (else the next two calls compute on a rate or a
            # curvature measured across the switch).
            del bc.outputs[:-1]
            for key in ("out_rate", "curvature", "slope"):
                sig.pop(key, None)
        if computed and len(bc.outputs) >= 2:
            self._observe_rates(bc, None if kind == "block" or reused is None else ~reused)
        if (st.cfg_step.get(s.branch) == s.step and (s.branch >= 1 or s.halves)
                and kind in ("compute", "block")):
            # Per branch, in the shared signals: a new prompt on any branch clears them. On batch
            # halves the difference is per pair of samples, relative to the second half.
            cfg = st.signals.setdefault("cfg", {}).setdefault(s.branch, {})
            d = st.cfg_diff[s.branch][0]
            out = outs[0][d.shape[0]:] if s.halves else outs[0]
            if "prev" in cfg and cfg["t"] != s.t:
                dims = tuple(range(1, d.dim()))
                num = (d.float() - cfg["prev"].float()).abs().mean(dims)
                den = out.float().abs().mean(dims).clamp_min(1e-12)
                # Read at the next cfg decision, not now: a read here would make the host wait
                # for this call's kernels at every step that computes both branches.
                cfg["rate"] = _to_host((num / den).max() / abs(cfg["t"] - s.t))
            cfg["prev"], cfg["t"] = d, s.t

    def _observe_rates(self, bc: BranchCache, fresh: np.ndarray | None) -> None:
        """The output's rate, the trigger and the curvature from each sample's last two computed
        outputs; only for the samples in ``fresh`` (None: all), whose history just moved on.

        Computed on the outputs' device and copied to the host without waiting (``_Pending``);
        the next decision that reads them waits for that copy alone (``_fold_pending``). A host read
        here would make the host wait for the call's own kernels and leave the device idle while
        it then does the pipeline's work between calls; the next decision, a step later, finds
        the copy long done. The last call's pending values were folded in by ``observe``."""
        (tb, b), (ta, a) = bc.outputs[-2:]
        n = a[0].shape[0]
        dt = sample_times(ta, n) - sample_times(tb, n)
        valid = dt != 0      # two calls at one timestep (Heun) say nothing of the rate
        if fresh is not None:
            valid = valid & fresh
        if not valid.any():
            return
        dt = np.where(valid, dt, 1.0)
        sig = bc.signals
        change = rel_l1(a[0], b[0])
        uniform = bool((dt == dt[0]).all())
        slope = (a[0] - b[0]) / (float(dt[0]) if uniform else per_sample_view(
            torch.tensor(dt, device=a[0].device, dtype=a[0].dtype), a[0]))
        curvature = None
        if "slope" in sig:
            dims = tuple(range(1, slope.dim()))
            num = (slope - sig["slope"]).abs().mean(dims, dtype=torch.float32)
            den = a[0].abs().mean(dims, dtype=torch.float32).clamp_min(1e-12)
            curvature = num / den
        if not valid.all() and "slope" in sig:
            slope = torch.where(per_sample_view(torch.tensor(valid, device=slope.device), slope),
                                slope, sig["slope"])
        sig["slope"] = slope
        sig["pending"] = _Pending.start(change, curvature, valid, dt, self.settle)


@dataclass
class _Pending:
    """A computed call's change (and curvature) per sample, on its way to the host: ``values``
    [1 or 2, n] float32, on CUDA in pinned memory and valid once ``event`` has passed (None off
    CUDA, where the copy was made at once)."""
    values: torch.Tensor
    event: "torch.cuda.Event | None"
    valid: np.ndarray
    dt: np.ndarray
    settle: float

    @classmethod
    def start(cls, change: torch.Tensor, curvature: torch.Tensor | None, valid: np.ndarray,
              dt: np.ndarray, settle: float) -> "_Pending":
        values = torch.stack([change] if curvature is None else [change, curvature])
        return cls(*_to_host(values), valid, dt, settle)


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """``values`` copied to the host without waiting: on CUDA into pinned memory, valid once the
    event has passed (None off CUDA, where the copy is made at once)."""
    values = values.detach()
    if values.device.type != "cuda":
        return values.cpu(), None
    # The copy runs on the current stream of the values' device (not necessarily the current
    # device): the event marks that stream.
    stream = torch.cuda.current_stream(values.device)
    values = values.to("cpu", non_blocking=True)     # into pinned memory
    event = torch.cuda.Event()
    event.record(stream)
    return values, event


def _rate(cfg: dict) -> float:
    """The guidance difference's rate of change, on the host: waits, once, for its copy alone."""
    if isinstance(cfg["rate"], tuple):
        values, event = cfg["rate"]
        if event is not None:
            event.synchronize()
        cfg["rate"] = float(values.numpy())
    return cfg["rate"]


def _fold_pending(sig: dict, st: CacheState) -> None:
    """Fold a computed call's pending change and curvature into the branch's signals: the rate,
    the trigger and the curvature, per sample where ``valid`` (the others keep theirs). Waits for
    that copy alone, not for the device's whole queue. The trigger compares the change per unit
    of the noise range, the range as the state reads it now, not when the change was taken:
    Mochi's rising timestep shows its scale, [0, 1000], only as it passes 1 (its second or third
    step at 64 steps), and a change of its first steps read against [0, 1] settled the trigger at
    once, where any later generation, read on [0, 1000] from its start, did not."""
    pending = sig.pop("pending", None)
    if pending is None:
        return
    if pending.event is not None:
        pending.event.synchronize()
    values = pending.values.numpy().astype(np.float64)
    valid, dt, n = pending.valid, pending.dt, pending.valid.shape[0]
    change = values[0]
    rate = change / np.abs(dt)
    sig["out_rate"] = np.where(valid, rate, _per_sample(sig.get("out_rate", np.inf), n))
    # The trigger says when caching may start, not when it must stop: the output moves fastest
    # again over the last, longest steps, and re-arming there would compute the final step on top
    # of a forced compute before it (with the probe as the signal, 0.003-0.019 more of the FLOPs
    # for at most 0.8 dB; bench/RESULTS.md).
    _latch(sig, valid & (change * (st.t_first - st.t_floor) / np.abs(dt) < pending.settle))
    if values.shape[0] == 2:
        sig["curvature"] = np.where(valid, values[1], _per_sample(sig.get("curvature", np.nan), n))


def _per_sample(x: "np.ndarray | torch.Tensor | float", n: int) -> np.ndarray:
    """A number, or one per sample (a tensor on any device, or an array), as n float64 values on
    the host. NumPy, not one-element CPU tensors: the runtime's work in a reused call is mostly
    this bookkeeping, some thirty such ops, and NumPy's take a third of the time torch's do (a
    ``where``: 1.5 against 4.2 us on a 2-core CI-class CPU). Not copied where it already is
    that: nothing writes these in place."""
    x = _host(x).astype(np.float64, copy=False)
    return x if x.shape == (n,) else np.full(n, x.item())


def _host(x: "np.ndarray | torch.Tensor | bool") -> np.ndarray:
    """A per-sample value as a NumPy array on the host: a tensor is copied there (from a GPU, a
    sync; the only device tensors that come here are a block decision's mask, which that decision
    read already, and the consecutive-reuse counts after a reuse by only some samples)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)



def _latch(sig: dict, settled: np.ndarray) -> np.ndarray:
    """Per sample, settled now or before (the trigger stays on once settled)."""
    latched = sig.get("settled_mask")
    if latched is not None and np.shape(latched) == settled.shape:
        settled = settled | _host(latched)
    sig["settled_mask"] = settled
    sig["settled"] = bool(settled.all())
    return settled


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_VALID = {
    # Finite: an infinite budget would let an estimate of inf (a sample not yet allowed) fit.
    "budget": (lambda v: _number(v) and 0 <= v < float("inf"), "a finite number >= 0"),
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
    if not isinstance(preset, str) or preset not in PRESETS:
        raise PolicyError(f"mixcache preset {preset!r}: must be one of {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **spec}
    if spec.get("step_mode") == "residual" and "extrapolate" not in spec:
        # The preset's order extrapolates outputs; a residual step reuse has none to take.
        kw["extrapolate"] = 0
    valid = set(MixCache.__dataclass_fields__)
    unknown = set(kw) - valid
    if unknown:
        raise PolicyError(f"mixcache: unknown key(s) {sorted(unknown)}; valid: "
                          f"{sorted(valid | {'preset'})}")
    for key, (ok, what) in _VALID.items():
        if key in kw and not ok(kw[key]):
            raise PolicyError(f"mixcache {key}={kw[key]!r}: must be {what}")
    gran = kw.get("granularities", GRANULARITIES)
    if (not isinstance(gran, (list, tuple)) or not gran
            or not all(isinstance(g, str) for g in gran) or set(gran) - set(GRANULARITIES)):
        raise PolicyError(f"mixcache granularities={gran!r}: a non-empty list drawn from "
                          f"{list(GRANULARITIES)}")
    kw["granularities"] = tuple(gran)
    warn_unread_keys(spec, set(gran), "mixcache")
    return MixCache(**kw)
