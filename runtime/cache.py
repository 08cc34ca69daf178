"""Cache state of one compiled model: what was computed, what may be reused, and when it goes stale.

One ``CacheState`` per model and thread (attached to the module, reachable with
``dit_compile.stats(model)``), never a module global: two threads that generate at once with one
compiled model interleave their calls, which the inputs cannot tell from one generation, so each
thread keeps its own. Its lifecycle rules are the safety net under every policy:

* A *generation* is one run of the sampler. The runtime sees it only through the inputs: a
  timestep that goes up, or a new input signature (shapes, dtypes, device of the latent and the
  timestep), starts a new generation, and everything cached is dropped. "Up" is in noise level:
  most pipelines pass a timestep that falls with the noise (t, or sigma); some pass ``1 - sigma``,
  which rises (Lumina 2's, Z-Image's), and under ``timestep="rising"`` the runtime reads the noise
  level as ``1 - timestep`` (``1000 - timestep`` from the first that passes 1: Mochi's scheduler
  inverts its sigmas, and its pipeline passes ``1000 (1 - sigma)``). The default, ``"auto"``,
  reads the direction off each run of a diffusers sampler (below): a model timestep that rises
  between the run's first two steps is read as rising, one that falls as falling, and what the
  first step left is read again where the direction turned (``_learn_direction``). With no
  sampler to ask (a loop of the user's own), the last direction holds (falling at first): a
  rising timestep then makes every call a new generation (never a stale reuse; no reuse at
  all), and the runtime says so once.
* Within a generation a new, lower timestep is a new *step*; the same timestep again *on the same
  latent* is the next guidance *branch* (WanPipeline calls the transformer once for the conditional
  and once for the unconditional prediction at each step, on one latent). The same timestep on
  another latent is not a branch: at the first step it is a new generation (a one-step run followed
  by another run starts where the last one ended), later a new step (a sampler that evaluates twice
  at one timestep, as Heun's corrector does; timesteps cast to bf16, as Flux's pipelines do, that
  round two steps to one value). The latent is compared as the text is, below.
* A call that batches both guidance branches (CogVideoXPipeline: uncond half, cond half) is marked
  ``halves``; its branch difference is ``out[:k] - out[k:]``. A generation's layout is its first
  call's, so a branch difference never crosses from one layout to the other. Halves are told by
  equal latents and different texts, which prompts batched on one noise also show at their first
  step only: where a later call's halves differ, the generation goes on without the layout, and
  what was taken under it is dropped.
* A branch whose text condition changes within a generation (a new prompt, of any length) loses
  its cache and its branch difference (all of them, for branch 0): what was computed for the old
  prompt is never reused for the new one. The text is not part of the signature, so guidance
  branches whose prompts differ in length (Qwen-Image trims each to its own) stay one generation.
  The same tensor object as before, not modified in place, is the same value (no compare, no sync);
  another tensor is compared by value, so a pipeline that rebuilds equal embeddings at every step
  keeps its cache. Under ``torch.inference_mode`` tensors keep no in-place version, so there the
  runtime keeps a copy of the text, latent and timestep it last saw and compares against that: a
  prompt written into the same tensor is still a new prompt.
* A call at the step's timestep, in the same sampler run, whose input signature is another than
  the last call's is the step's next branch too, a guidance *pass* of another batch
  (LTX2Pipeline's: a batched-CFG call, then spatio-temporal and modality-isolation passes of one
  sample). The first step sets the signature at each branch position; at a later step a call of
  another signature than its position's, or one outside a sampler run (nothing to tell a pass from
  a new generation of another shape by), starts a new generation. A pass caches as a branch of its
  own; no branch difference is taken between calls of two batch shapes.
* A step has at most ``MAX_BRANCHES`` calls; one more at the same timestep starts a new generation
  (a one-step sampler called again looks like one endless step, whose branch caches would
  otherwise pile up without bound). No policy reuses anything at step 0, so this costs no reuse.
* A call from another run of a diffusers sampler than the last call's is a new generation
  (``sampler.sampler_run``: the pipeline's ``scheduler.timesteps``, a new tensor at each run).
  The inputs cannot tell a generation that starts below the last one's last timestep (img2img at
  a low strength after a 4-step generation, or after one stopped by an error) from that one's next
  step; without the pipeline to ask, it would reuse the last generation's cache.
* ``reset()`` drops everything explicitly.
* Cached tensors count against ``memory`` (bytes); a store that would exceed it raises
  ``CacheMemoryError`` rather than silently dropping what a policy relies on.
"""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..checks import expect_module, unwrap


# A tensor as the runtime keeps it to recognise its value later: (tensor, in-place version,
# copy); the copy only for inference tensors, which have no version (see _held).
Held = tuple[torch.Tensor, int | None, torch.Tensor | None]

STATE_ATTR = "_dit_compile_state"
TIMESTEP_DIRECTIONS = ("auto", "falling", "rising")
# Where policies keep noise levels among their signals (per branch, and nested in the shared
# ones): the only places besides the state's own that _flip_noise_levels reads again.
NOISE_KEYS = ("t", "prev_t")
# The tops of the scales a rising timestep is read on: 1 - sigma (Lumina 2's, Z-Image's), or
# 1000 (1 - sigma) (Mochi's, whose scheduler inverts its sigmas). The noise level is top - t.
RISING_TOPS = (1.0, 1000.0)
# One-step generations in a row, each timestep above the last, before the runtime says that the
# pipeline's timestep seems to rise (a sampler restarted once or twice is no such sign).
RISING_HINT_AFTER = 3
MAX_BRANCHES = 4    # calls per step; classifier-free guidance makes 2, a second guidance 3
# A rise within one sampler run this small, relative to the generation's first noise level, is
# float rounding, not a new generation: KDPM2's interpolated timesteps (554.99994, then 555.0).
RUN_ROUNDING = 1e-3
# The per-call trace keeps the last this many generations: a server that generates for days must
# not grow it without bound. The counts in ``stats`` cover every call since the last reset.
TRACE_GENERATIONS = 16


class CacheMemoryError(RuntimeError):
    """Storing a cached tensor would exceed the ``cache_memory`` bound."""


@dataclass
class Step:
    """Where the current call sits: generation, step index, branch, timestep, and whether the call
    carries both guidance branches as batch halves (and the runtime can compute one half alone)."""
    generation: int
    step: int
    branch: int
    t: float
    halves: bool = False
    # Guidance branches the batch carries as equal groups of samples (2: halves, 3: PAG's
    # [uncond, cond, perturbed]); 1 where none or not looked for. Per-sample decisions tie them.
    groups: int = 1
    # The call's other conditions' magnitudes, [conditions, samples] (executor._conditions),
    # where the policy watches them; None where not.
    conditions: np.ndarray | None = None


@dataclass
class Record:
    """One call as the trace keeps it (``stats(model)["trace"]``): where it fell and what ran."""
    generation: int
    step: int
    branch: int
    t: float
    action: str                 # "compute", "step", "cfg", "block"
    flops: float                # fraction of a full forward's FLOPs computed
    signal: float | None = None  # the deciding signal (rule threshold signal or estimated error)
    spent: float | None = None   # error spent since the last full compute (MixCache)
    reused: tuple[bool, ...] | None = None  # which samples reused, where only some did
    halves: bool = False         # the call carried both guidance branches as batch halves
    groups: int = 1              # guidance branches batched as equal groups (Step's)
    switched: tuple[bool, ...] | None = None  # samples whose other conditions switched (MixCache)
    # A dynamic-shape graph's call: (executor, sizes, work), its ``flops`` read at its sizes when
    # ``stats`` asks; ``flops`` above is at the compile's.
    sized: tuple | None = None


@dataclass
class BranchCache:
    """What one guidance branch of a generation keeps for reuse (the state holds one a branch)."""
    # The last computed outputs, oldest first, with their timestep: one for the batch, or one per
    # sample once samples have computed at different steps (see push_outputs).
    outputs: list[tuple[float | tuple[float, ...], list[torch.Tensor]]] = field(default_factory=list)
    latent: torch.Tensor | None = None          # input latent at the last computed step
    probe: torch.Tensor | None = None           # probe residual at the last computed span
    span: list[torch.Tensor] | None = None      # span residuals (or values) at that step
    accumulated: torch.Tensor | None = None     # accumulated signal since the last compute
    last_input: torch.Tensor | None = None      # latent at the previous call (for input signals)
    reused_in_a_row: int | torch.Tensor = 0     # per sample where only some reused the span
    signals: dict[str, Any] = field(default_factory=dict)   # the policy's own per-branch signals
    text: Held | None = None                     # last call's text condition
    graph: object | None = None                  # the executor whose values these are
    samples: int | None = None                   # the batch of its last call

    @property
    def most_reused(self) -> int:
        """The longest run of consecutive reuse among the samples: what bounds a reuse of the
        whole call."""
        n = self.reused_in_a_row
        return int(n.max()) if isinstance(n, torch.Tensor) else n

    def below(self, bound: int | None) -> bool | torch.Tensor:
        """Per sample (or for all): may reuse once more under ``bound`` consecutive reuses."""
        return True if bound is None else self.reused_in_a_row < bound


class CacheState:
    """One model's cache for one thread: the generation and step it is at, each branch's
    ``BranchCache``, the trace, the memory bound (the module's docstring gives its lifecycle).
    ``begin`` places each call; the executor stores and reads through it."""

    def __init__(self, memory: int | None = None, clone: bool = False, key: Any = None,
                 timestep: str = "auto"):
        self.memory = memory
        self.clone = clone              # CUDA graphs overwrite outputs on replay: keep copies
        self.key = key                  # the configuration that made it (see StateFactory)
        self.rising = timestep == "rising"  # the pipeline passes 1 - sigma (see the module doc)
        self.top = RISING_TOPS[0]           # ... on this scale: the noise level is top - t
        self._rising_run: weakref.ref | None = None     # the run that showed it, under "auto"
        self._auto = timestep == "auto"     # the direction read off each sampler run (begin)
        # One-step generations in a row, each started higher than the last: where the timestep
        # rises through a generation, each call is one. A call that falls after such a run is
        # the next generation's first (it would otherwise pass for the last one's next step);
        # at RISING_HINT_AFTER the user is told of the option.
        self._rises = 0
        self._rise_told = False
        self.records: list[Record] = []     # the trace: the last TRACE_GENERATIONS generations
        self.counts: dict[str, int] = {}    # calls per action since the last clear_stats()
        self.partial: dict[str, int] = {}   # of the others, calls where only some samples
                                            # reused and the batch was computed in full
        # FLOPs computed over those calls, and of a full forward each: a call's computed fraction
        # weighed by its forward's FLOPs (the guidance branches of Qwen-Image's true CFG, its
        # negative prompt of another length than the prompt, differ in cost fivefold).
        self.flops = 0.0
        self.flops_full = 0.0
        # Calls of dynamic-shape graphs, per (counter, sizes): [counter, sizes, fractions, calls]
        self._sized: dict[tuple[int, tuple], list] = {}
        self.generation = -1
        self._signature: Any = None         # the generation's: its branch 0's
        self._signatures: tuple = ()        # each branch position's, set at the first step
        self._last_signature: Any = None    # the last call's
        self._halves = False                # the generation's layout (see begin)
        self._last_t: float | None = None
        self._timestep: Held | None = None  # the last call's
        # The last noise level read, with the timestep it was read from and the direction it was
        # read in: the guidance branches of a step pass one timestep tensor, and reading it again
        # would cost another host sync (see noise_level).
        self._level: tuple[torch.Tensor, int, bool, float] | None = None
        # The sampler run's timesteps on the host: (run, its version, values); see noise_level.
        self._run_values: tuple[weakref.ref, int, list[float]] | None = None
        self._run: weakref.ref | None = None  # the last call's sampler run (runtime/sampler.py)
        self._step = 0
        self._branch = 0
        self._latent: Held | None = None  # this step's
        self._pass_latent: Held | None = None  # the last pass's (a call of another signature)
        self.branches: dict[int, BranchCache] = {}
        # Per branch b >= 1: out[b] - out[0], and the step it was taken at; on batch halves (one
        # call per step, branch 0) out[:k] - out[k:] under key 0.
        self.cfg_diff: dict[int, list[torch.Tensor]] = {}
        self.cfg_step: dict[int, int] = {}
        self.current: dict[int, list[torch.Tensor]] = {}   # this step's output per branch
        self.computed: set[int] = set()                    # branches computed (not reused) this step
        self.signals: dict[str, Any] = {}                  # the policy's own cross-branch signals
        self.t_first = 0.0                                 # timestep of the generation's first call
        self._lowest = 0.0                                 # see t_floor
        self.last_call = 0                                 # monotonic ns of the last call begun
        # While dit_compile.fit_teacache records: per call, the (signal's, output's) relative
        # change since the branch's last call; None otherwise. A new generation keeps it.
        self.calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        """Nothing cached, and the next call starts a generation."""
        self._drop_cache()
        self._signature = self._last_signature = None
        self._signatures = ()
        self._last_t = None

    def _drop_cache(self) -> None:
        self.branches.clear()
        self.cfg_diff.clear()
        self.cfg_step.clear()
        self._latent = self._pass_latent = None
        self.current.clear()
        self.computed.clear()
        self.signals.clear()

    def noise_level(self, timestep: torch.Tensor, run: torch.Tensor | None = None) -> float:
        """The call's noise level, on the timestep's own scale: the largest timestep (Wan 2.2's
        per-token timesteps are zero on the conditioning frame's tokens at every step), or under
        ``timestep="rising"`` one minus the smallest.

        Reading a device tensor is a host sync, which makes the host wait for the device's queue:
        the call that syncs cannot launch ahead, and the device idles while the host decides. So:
        where the timestep is one element of the sampler run's timesteps (``run``, see
        runtime/sampler.py), as a view (diffusers' pipelines iterate ``scheduler.timesteps`` and
        pass ``t.expand(batch)``), it is read off the run's copy on the host, made once per run;
        else a timestep passed again unmodified (WanPipeline's second guidance branch) keeps the
        level read from it; else it is read, one sync."""
        value = self._run_value(timestep, run)
        if value is not None:
            return self._level_of(value, value, run)
        kept = self._level
        if (kept is not None and kept[0] is timestep and kept[1] == timestep._version
                and kept[2] == (self.rising, self.top)):
            return kept[3]
        if self.rising:
            lo, hi = torch.stack(timestep.aminmax()).tolist()
            level = self._level_of(lo, hi, run)
        else:
            level = float(timestep.max())
        # An inference tensor has no version counter to tell an in-place write by: read each time.
        self._level = (None if timestep.is_inference()
                       else (timestep, timestep._version, (self.rising, self.top), level))
        return level

    def _run_value(self, timestep: torch.Tensor, run: torch.Tensor | None) -> float | None:
        """The value of ``timestep`` where all of it is a view of one element of ``run`` (a view of
        the same base, its dtype, every stride over more than one element zero), from ``run``
        copied to the host once while its version holds (views share it: a write to either is
        seen); None otherwise."""
        if run is None or timestep._base is None or timestep._base is not (
                run if run._base is None else run._base):
            return None
        if (run.dim() != 1 or run.stride(0) <= 0 or timestep.is_inference() or run.is_inference()
                or timestep.dtype != run.dtype
                or any(st and n > 1 for st, n in zip(timestep.stride(), timestep.shape))):
            return None
        i, rest = divmod(timestep.storage_offset() - run.storage_offset(), run.stride(0))
        if rest or not 0 <= i < run.numel():
            return None
        held = self._run_values
        if held is None or held[0]() is not run or held[1] != run._version:
            held = self._run_values = (weakref.ref(run), run._version, run.tolist())
        return float(held[2][i])

    def _level_of(self, lo: float, hi: float, run: torch.Tensor | None = None) -> float:
        """The noise level of a timestep whose values run from ``lo`` to ``hi``. A rising one
        read on [0, 1] that passes 1 is on Mochi's scale, [0, 1000] (its first steps, at 64,
        stay below 1): the levels kept are read again on that one, where the rising direction
        was asked for, or learned from this sampler run."""
        if not self.rising:
            return hi
        if (hi > self.top and self.top == RISING_TOPS[0] and 0.0 <= lo and hi <= RISING_TOPS[1]
                and (not self._auto or run is not None and self._rising_run is not None
                     and self._rising_run() is run)):
            self._map_noise_levels(lambda x: x + RISING_TOPS[1] - RISING_TOPS[0])
            self.top = RISING_TOPS[1]
        if (lo < 0.0 or hi > self.top) and self._auto:
            # Learned from another pipeline than this call's: read as falling again (this call
            # starts a generation, its timestep above the scale).
            self.rising = False
            return hi
        if lo < 0.0 or hi > self.top:
            raise ValueError(f"mixcache: timestep='rising' reads the timestep as 1 - sigma, in [0, 1]"
                             f" or [0, 1000], but this call's runs from {lo} to {hi}: a timestep "
                             "that falls through a generation needs no option (timestep='falling')")
        return self.top - lo

    @property
    def t_floor(self) -> float:
        """The lowest noise level of the generation: 0 (a timestep, sigma or 1 - sigma that falls
        to 0), or below, where its sampler run's timesteps go below 0 (EDM's ``ln(sigma) / 4``:
        StableAudioPipeline's run ends at -1.55), or a call's did. The noise range the policies
        measure steps against is [t_floor, t_first]."""
        return 0.0 if self.rising else self._lowest

    def _run_floor(self, t: float, run: torch.Tensor | None) -> float:
        """The lowest of 0, ``t`` and ``run``'s timesteps where its host copy is held (read for the
        noise level: no host read here)."""
        held = self._run_values
        values = held[2] if run is not None and held is not None and held[0]() is run else ()
        return min(0.0, t, *values)

    def begin(self, t: float, signature: Any, halves: bool = False, groups: int = 1,
              text: torch.Tensor | None = None, latent: torch.Tensor | None = None,
              timestep: torch.Tensor | None = None, graph: object | None = None,
              run: torch.Tensor | None = None) -> Step:
        """Place a call in its generation, step and branch; drop the cache on a new generation,
        and a branch's cache when its text condition or its graph changed. ``latent`` None
        (callers that have none, unit tests): a repeated timestep is the next branch.
        ``timestep``: the call's own (per sample or per token), where ``t`` is its noise level.
        ``graph``: the token of the executor making the call. ``groups``: see ``Step``.
        ``run``: the sampler run calling (``sampler.sampler_run``): another one is a new
        generation, whatever the timestep says."""
        self.last_call = time.monotonic_ns()
        if self._auto:
            t = self._learn_direction(t, timestep, run)
        if self._guidance_ended(t, signature, latent):
            # The pipeline stopped guidance mid-generation (Z-Image's cfg_truncation): the same
            # generation goes on at half the batch, with nothing cached under the old layout.
            self._end_guidance(signature)
        same_t = t == self._last_t
        repeat = same_t and signature == self._last_signature
        own = signature == self._signature      # branch 0's shape: not a pass
        new_run = run is not None and (self._run is None or self._run() is not run)
        branch = repeat and self._is_branch(own, text, latent, run, new_run)
        next_b = self._branch + 1
        passes = same_t and self._is_pass(signature, run, new_run, next_b)
        self._run = None if run is None else weakref.ref(run)
        if self._starts_generation(t, signature, timestep, run, new_run, own, repeat, branch,
                                   passes, next_b):
            self._note_rise(t, new_run)
            self._start_generation(t, signature, halves, run)
            own = True
        elif branch or passes:
            self._branch += 1
        else:
            self._next_step()
        self._settle_layout(signature, halves, own)
        self._remember(t, timestep, latent, own)
        self._check_branch(graph, text, latent)
        return Step(self.generation, self._step, self._branch, t, self._halves and own, groups)

    # -- begin's steps: each reads or moves the placement, as ``begin`` calls it -------------
    def _end_guidance(self, signature: Any) -> None:
        """Go on with the generation under the layout of ``signature`` (half the batch, no
        halves), nothing cached under the old one: the calls so far were its first step."""
        self._drop_cache()
        self._signature, self._halves = signature, False
        self._signatures, self._last_signature = (signature,), None

    def _is_branch(self, own: bool, text: torch.Tensor | None, latent: torch.Tensor | None,
                   run: torch.Tensor | None, new_run: bool) -> bool:
        """Whether a call that repeats the last one's timestep and signature is the step's next
        guidance branch rather than another step: on the step's latent (the pass's, ``own``
        False), or on any latent where its text differs within a sampler run."""
        return (latent is None or _same(self._latent if own else self._pass_latent, latent)
                # Within a sampler run, another text than the step's first call's
                # is a guidance branch even on another latent: Cosmos' video-to-world
                # noises its condition frames afresh for each branch. (A second-order
                # sampler's next evaluation at the level keeps the first's text.)
                or (run is not None and not new_run and text is not None
                    and (first := self.branches.get(0)) is not None
                    and first.text is not None and not _same(first.text, text)))

    def _is_pass(self, signature: Any, run: torch.Tensor | None, new_run: bool,
                 next_b: int) -> bool:
        """Whether a call at the last one's timestep, of another signature, is the step's
        guidance pass of another batch (see the module doc) at branch ``next_b``: where the
        first step gave that position this signature, or at the first step itself."""
        # Only within a sampler run, whose timesteps say that the same timestep is the same step.
        return (run is not None and not new_run and self._signature is not None
                and signature != self._last_signature and next_b < MAX_BRANCHES
                and (signature == self._signatures[next_b] if next_b < len(self._signatures)
                     else self._step == 0))

    def _starts_generation(self, t: float, signature: Any, timestep: torch.Tensor | None,
                           run: torch.Tensor | None, new_run: bool, own: bool, repeat: bool,
                           branch: bool, passes: bool, next_b: int) -> bool:
        """Whether the call is a new generation's first: of another signature than branch 0's
        and neither a pass nor a branch, the first call, a rise in the noise level, another
        sampler run, or one of the cases below. Evaluated in order: the later clauses may
        compare tensors."""
        return ((not own and not passes and not branch) or self._last_t is None
                or self._rose(t, run, new_run) or new_run
                # Below a run of one-step generations: the next one's first call, unless the
                # sampler says this run goes on (Wan 2.2's low-noise expert after one step).
                or (t < self._last_t and self._rises > 0 and run is None)
                or (branch and next_b >= MAX_BRANCHES)
                # A branch whose position the first step gave another signature.
                or (branch and next_b < len(self._signatures)
                    and self._signatures[next_b] != signature)
                # The same timestep on another latent at the first step, with no sampler to
                # ask: the next one-step generation's call. A sampler's run says whether it is
                # (a flow-shifted UniPC run may start 999, 999, 997 over 85 steps).
                or (repeat and not branch and self._step == 0 and run is None
                    and not self._fell_below_max(timestep)))

    def _start_generation(self, t: float, signature: Any, halves: bool,
                          run: torch.Tensor | None) -> None:
        """Nothing cached, the placement at a new generation's first step and branch, of
        ``signature``'s layout, its noise range begun at ``t``."""
        self.reset()
        self._signature, self._halves = signature, halves
        self.generation += 1
        self._step, self._branch = 0, 0
        self.t_first = t
        self._lowest = self._run_floor(t, run)

    def _next_step(self) -> None:
        """The placement at the generation's next step, its branch 0, nothing of this step's."""
        self._step += 1
        self._branch = 0
        self.current.clear()
        self.computed.clear()

    def _settle_layout(self, signature: Any, halves: bool, own: bool) -> None:
        """Record the call's signature (at the first step, as its branch position's), and drop
        the generation's halves layout where a call of branch 0's signature has none."""
        if self._step == 0 and self._branch == len(self._signatures):
            self._signatures += (signature,)
        self._last_signature = signature
        if self._halves and not halves and own:
            # Equal latent halves at the first step only: prompts batched on one noise, not
            # guidance branches. Nothing taken as a branch difference of halves holds.
            self._halves = False
            self.cfg_diff.clear()
            self.cfg_step.clear()
            self.signals.clear()

    def _remember(self, t: float, timestep: torch.Tensor | None, latent: torch.Tensor | None,
                  own: bool) -> None:
        """Keep what the next call is placed against: the noise level, the timestep, and the
        step's latent (branch 0's) or the pass's (``own`` False)."""
        self._last_t = t
        self._lowest = min(self._lowest, t)
        # Only a per-sample or per-token timestep is compared later (_fell_below_max).
        self._timestep = None if timestep is None or timestep.numel() == 1 else _held(timestep)
        if latent is not None and (self._branch == 0 or not own):
            if own:
                self._latent = _held(latent)
            else:
                self._pass_latent = _held(latent)

    def _check_branch(self, graph: object | None, text: torch.Tensor | None,
                      latent: torch.Tensor | None) -> None:
        """Drop the placed branch's cache where its graph or its text condition changed
        (``_check_graph``, ``_check_text``); note its batch."""
        if graph is not None:
            self._check_graph(self._branch, graph)
        if text is not None:
            self._check_text(self._branch, text)
        if latent is not None:
            self.branch(self._branch).samples = latent.shape[0]

    def placement(self) -> tuple:
        """Where the calls so far left the generation (``begin`` moves it on), for ``abandon``."""
        return (self.generation, self._step, self._branch, self._last_t, self._signature,
                self._signatures, self._last_signature, self._halves, self._latent,
                self._pass_latent, self._timestep, self._run, self.t_first, self._lowest,
                self._rises, self.top, self.rising)

    def abandon(self, placement: tuple, step: Step) -> None:
        """The call ``begin`` placed at ``step`` raised before it finished. The generation goes
        back to ``placement``, so that a retry is placed as that call was, and the call's branch
        drops what it may have stored or half-updated (policy signals, a span residual, outputs
        over the memory bound): the retry computes."""
        if self.rising != placement[-1]:    # the call learned a direction: unlearn it
            self._flip_noise_levels()
        (self.generation, self._step, self._branch, self._last_t, self._signature,
         self._signatures, self._last_signature, self._halves, self._latent, self._pass_latent,
         self._timestep, self._run, self.t_first, self._lowest, self._rises, self.top,
         self.rising) = placement
        # The branch's own state only: the other branches' differences were taken against
        # branch 0's outputs of the same prompt, which its retry computes again (a new prompt on
        # branch 0 voids them, _drop_branch).
        self.branches[step.branch] = BranchCache()
        self.cfg_diff.pop(step.branch, None)
        self.cfg_step.pop(step.branch, None)
        self.signals.clear()
        self.current.pop(step.branch, None)
        self.computed.discard(step.branch)

    def _guidance_ended(self, t: float, signature: Any, latent: torch.Tensor | None) -> bool:
        """A call with half the last one's batch, the latent otherwise alike, at a lower
        timestep, where the last call batched guidance (its latent halves equal): guidance turned
        off for the steps left (Z-Image's ``cfg_truncation``, SD3's ``SD3CFGCutoffCallback``).
        The halves are compared here, not only read off ``_halves``: that is known only where the
        policy looks for halves, and the generation must go on under every policy."""
        if (latent is None or self._latent is None or self._last_t is None
                or t >= self._last_t or signature == self._signature):
            return False
        old = self._latent[0]
        return (2 * latent.shape[0] == old.shape[0] and latent.shape[1:] == old.shape[1:]
                and latent.dtype == old.dtype and latent.device == old.device
                and (self._halves or _equal_halves(self._latent))
                # Still batched guidance, of fewer prompts (a callback dropped one): a new
                # layout, not guidance ended (which would go on without cfg reuse to its end).
                and not (latent.shape[0] % 2 == 0 and bool(torch.equal(
                    *latent.tensor_split(2)))))

    def _fell_below_max(self, timestep: torch.Tensor | None) -> bool:
        """Whether some of the call's per-token (or per-sample) timesteps fell since the last call
        while their largest stayed: a sampler that denoises parts of the latent in turn (SkyReels'
        asynchronous diffusion forcing holds its last frames at 999 while the first ones move).
        That is the next step, not a run begun anew where the last one ended."""
        return (timestep is not None and timestep.numel() > 1 and self._timestep is not None
                and not _same(self._timestep, timestep))

    def _learn_direction(self, t: float, timestep: torch.Tensor | None,
                         run: torch.Tensor | None) -> float:
        """Under ``timestep="auto"``: the call's noise level, read in the direction its sampler
        run shows. A diffusers sampler's timesteps fall, so where the model's timestep rises from
        the first step of a run to the second it is ``1 - sigma``, read as rising from there on,
        and where it falls, as falling; where that turns the direction, the levels the first step
        left are read again (``_flip_noise_levels``). Between those calls, and with no run to
        ask, the last direction holds (falling at first). A timestep in [0, 1] or [0, 1000]
        (Mochi's) whose smallest value rose and largest did not fall is read as rising, on the
        smaller scale that holds both steps' (``_level_of`` moves to the larger one if a later
        step passes 1). The batch may change there (guidance turned off after one step)."""
        if (run is None or self._run is None or self._run() is not run or self._step != 0
                or self._last_t is None):
            return t
        if self.rising:
            if t <= self._last_t:
                return t
            # Its level rose: its smallest value fell, a falling timestep after all.
            self.rising = False
            self._flip_noise_levels()
            return float(timestep.max()) if timestep is not None else self.top - t
        # Falling so far. Read no values (a host sync) where they cannot show a rise: a largest
        # value that fell, or one that stayed on the same timestep (the step's next branch) or
        # on a single value.
        if (timestep is None or t < self._last_t
                or (t == self._last_t and (timestep.numel() == 1 or self._timestep is None
                                           or _same(self._timestep, timestep)))):
            return t
        last = None
        if self._timestep is not None:     # a per-sample or per-token one (kept as in begin)
            old, _, copy = self._timestep
            last = old if copy is None else copy
        lo, hi = torch.stack(timestep.aminmax()).tolist()
        lo0, hi0 = (torch.stack(last.aminmax()).tolist() if last is not None
                    else (self._last_t, self._last_t))
        # Rising where the smallest value rose and the largest did not fall: a per-row timestep
        # (MiniMax-H3's, its conditioning rows held at 1, clean) keeps its largest value, and
        # a falling one never raises its smallest (Wan 2.2's conditioning frame stays at 0).
        if not (lo > lo0 and hi >= hi0) or lo0 < 0.0:
            return t
        top = next((top for top in RISING_TOPS if max(hi, hi0) <= top), None)
        if top is None:
            return t
        self.rising, self.top, self._rising_run = True, top, weakref.ref(run)
        # The first step's levels, read as its largest value, become one minus its smallest.
        self._map_noise_levels(lambda x: top - lo0 if x == hi0 else top - x)
        return top - lo

    def _flip_noise_levels(self) -> None:
        """Read every noise level kept as ``top - `` itself. Where the direction turned at a run's
        second step (``_learn_direction``), the levels the first step left become what the other
        direction would have read; applied twice, nothing changed (``abandon``)."""
        top = self.top
        self._map_noise_levels(lambda x: top - x)

    def _map_noise_levels(self, fn: Callable[[float], float]) -> None:
        """Pass every noise level kept through ``fn``: the state's, the generation's trace, each
        branch's outputs and the policies' signals under ``NOISE_KEYS``."""
        def remap(t):
            return tuple(fn(x) for x in t) if isinstance(t, tuple) else fn(t)

        def remap_signals(signals: dict) -> None:
            for key, value in signals.items():
                if isinstance(value, dict):
                    remap_signals(value)
                elif key in NOISE_KEYS and isinstance(value, (float, int, tuple)):
                    signals[key] = remap(value)

        if self._last_t is not None:
            self._last_t = remap(self._last_t)
        self.t_first = remap(self.t_first)
        self.records = [replace(r, t=remap(r.t)) if r.generation == self.generation else r
                        for r in self.records]
        for bc in self.branches.values():
            bc.outputs = [(remap(t), outs) for t, outs in bc.outputs]
            remap_signals(bc.signals)
        remap_signals(self.signals)

    def _rose(self, t: float, run: torch.Tensor | None, new_run: bool) -> bool:
        """Whether ``t`` is above the last call's noise level; within a sampler run, by more than
        the rounding of its own timesteps (``RUN_ROUNDING``)."""
        if self._last_t is None or t <= self._last_t:
            return False
        if run is None or new_run:
            return True
        return t - self._last_t > RUN_ROUNDING * max(abs(self.t_first), abs(t))

    def _note_rise(self, t: float, new_run: bool) -> None:
        """Count one-step generations that each start above the last; say once, when they keep
        coming, that the pipeline's timestep seems to rise through a generation. A rise into
        another sampler run is that run's start, no sign of a rising timestep."""
        rose = self._step == 0 and not new_run and self._rose(t, None, new_run)
        self._rises = self._rises + 1 if rose else 0
        if self._rises == RISING_HINT_AFTER and not self._rise_told:
            self._rise_told = True
            if self.rising:     # read as 1 - sigma (asked, or learned from another pipeline)
                warnings.warn(
                    f"mixcache: the timestep went down at each of the last {self._rises + 1} "
                    "steps, read as 1 - sigma (timestep='rising', or learned under 'auto' from a "
                    "pipeline that passes it), so each call starts a new generation and nothing is"
                    " reused. If this timestep falls through a generation, compile with "
                    "options={'timestep': 'falling'}", stacklevel=4)
                return
            warnings.warn(
                f"mixcache: the timestep went up at each of the last {self._rises + 1} steps, so "
                "each call starts a new generation and nothing is reused. If this pipeline's "
                "timestep rises through a generation (Lumina 2's and Z-Image's pass 1 - sigma), "
                "compile with options={'timestep': 'rising'}", stacklevel=4)

    def _check_text(self, b: int, text: torch.Tensor) -> None:
        bc = self.branch(b)
        if bc.text is not None and _same(bc.text, text):
            if bc.text[2] is None:      # held by version: the next call takes the fast path
                bc.text = _held(text)
            return
        if bc.text is not None:
            bc = self._drop_branch(b)
        bc.text = _held(text)

    def _check_graph(self, b: int, graph: object) -> None:
        """Another graph of the model in a generation's branch computes: what the branch holds
        is the other graph's, which may not even return as many values (SANA-WM's refiner
        captures its keys and values at the end of each block's steps, in a graph that returns
        them besides the output). ``graph`` is what the graph computes (``computation_key``):
        a recompile of the same forward for other sizes is not another graph."""
        bc = self.branch(b)
        if bc.graph is not None and bc.graph != graph:
            bc = self._drop_branch(b)
        bc.graph = graph

    def _drop_branch(self, b: int) -> BranchCache:
        """Branch ``b`` with nothing cached, and no difference taken against it."""
        bc = self.branches[b] = BranchCache()
        # Every difference is taken against branch 0: a new branch 0 voids them all.
        for k in (list(self.cfg_diff) if b == 0 else [b]):
            self.cfg_diff.pop(k, None)
            self.cfg_step.pop(k, None)
        self.signals.clear()
        return bc

    def branch(self, b: int) -> BranchCache:
        return self.branches.setdefault(b, BranchCache())

    # -- storage ---------------------------------------------------------------------------
    def keep(self, x: Any) -> Any:
        """``x`` as it may be cached: a copy under CUDA graphs. A size a block passes on (a text
        length known only at run time) is a number, kept as it is."""
        return x.clone() if self.clone and isinstance(x, torch.Tensor) else x

    def check_memory(self) -> None:
        if self.memory is None:
            return
        used = self.bytes()
        if used > self.memory:
            raise CacheMemoryError(
                f"mixcache: cached tensors need {used} bytes, over cache_memory={self.memory}; "
                "raise the bound, cache fewer granularities, or shrink the batch")

    def bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self._tensors():
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def _tensors(self):
        # Snapshots: stats() may read the state of a thread that is running a call.
        for bc in list(self.branches.values()):
            for _, outs in list(bc.outputs):
                yield from outs
            yield from (x for x in (bc.latent, bc.probe, bc.last_input, bc.accumulated)
                        if x is not None)
            yield from bc.span or ()
            yield from _tensor_leaves(bc.signals)
            if bc.text is not None and bc.text[2] is not None:
                yield bc.text[2]
        for diff in list(self.cfg_diff.values()):
            yield from diff
        yield from _tensor_leaves(dict(self.signals))
        for outs in list(self.current.values()):
            yield from outs
        # Copies of inference tensors (torch.inference_mode), kept to compare later calls with.
        yield from (held[2] for held in (self._timestep, self._latent)
                    if held is not None and held[2] is not None)

    # -- what happened ---------------------------------------------------------------------
    def record(self, step: Step, action: str, flops: float, signal: float | None = None,
               spent: Any = None, reused: torch.Tensor | None = None,
               switched: np.ndarray | None = None, forward_flops: float = 1.0,
               sized: tuple[Any, tuple, tuple[float, ...]] | None = None) -> None:
        """One call: ``flops`` the fraction of its forward's FLOPs computed, ``forward_flops``
        that forward's FLOPs (the weight of the call in the fraction ``stats`` reports), or where
        the graph has dynamic shapes, ``sized``: the executor (whose ``flops_at`` counts them at
        the call's sizes when ``stats`` asks), those sizes, and the call's work (``Work``),
        which the fraction computed at the compile's sizes only approximates."""
        if isinstance(spent, (torch.Tensor, np.ndarray)):
            spent = float(spent.max())
        if reused is not None:
            reused = tuple(bool(r) for r in reused.tolist())
        if switched is not None:
            switched = tuple(bool(r) for r in switched.tolist()) if bool(switched.any()) else None
        if self.records and self.records[-1].generation != step.generation:
            oldest = step.generation - TRACE_GENERATIONS + 1
            if self.records[0].generation < oldest:
                self.records = [r for r in self.records if r.generation >= oldest]
        self.records.append(Record(step.generation, step.step, step.branch, step.t, action, flops,
                                   signal, spent, reused, step.halves, step.groups, switched, sized))
        counts = self.partial if reused is not None and flops >= 1.0 else self.counts
        counts[action] = counts.get(action, 0) + 1
        if sized is None:
            self.flops += flops * forward_flops
            self.flops_full += forward_flops
        else:
            executor, sizes, work = sized
            if (id(executor), sizes) not in self._sized and not any(
                    held[0] is executor for held in self._sized.values()):
                self._fold_unrecorded()     # a new executor: its first call (a recompile's)
            held = self._sized.setdefault((id(executor), sizes), [executor, sizes, [0.0] * len(work), 0])
            held[2] = [h + w for h, w in zip(held[2], work)]
            held[3] += 1

    def _fold_unrecorded(self) -> None:
        """Count the work of executors no kept record holds, and let them go: each recompile
        (a torch._dynamo.reset(), new sizes) made one more, held here for ``stats`` until a
        ``reset``, graphs and compiled pieces and all. Those the trace holds stay, so the
        executors kept are those of its last ``TRACE_GENERATIONS`` generations."""
        kept = {id(r.sized[0]) for r in self.records if r.sized is not None}
        for key, (executor, sizes, work, calls) in list(self._sized.items()):
            if id(executor) not in kept:
                done, full = executor.flops_at(sizes, tuple(work), calls)
                self.flops, self.flops_full = self.flops + done, self.flops_full + full
                del self._sized[key]

    def clear_stats(self) -> None:
        self.records.clear()
        self.counts.clear()
        self.partial.clear()
        self.flops = self.flops_full = 0.0
        self._sized.clear()

    def _flops_fraction(self) -> float:
        done, full = self.flops, self.flops_full
        for executor, sizes, work, calls in list(self._sized.values()):
            d, f = executor.flops_at(sizes, tuple(work), calls)
            done, full = done + d, full + f
        return done / full if full else 1.0

    def stats(self) -> dict[str, Any]:
        """Counts of computed and reused work per granularity since the last ``clear_stats``, and
        the per-call trace of the last ``TRACE_GENERATIONS`` generations, for the user."""
        counts, partial = dict(self.counts), dict(self.partial)
        return {
            "calls": sum(counts.values()) + sum(partial.values()),
            "computed": counts.get("compute", 0),
            "reused": {k: v for k, v in counts.items() if k != "compute"},
            "partial": partial,
            "flops_fraction": self._flops_fraction(),
            "cached_bytes": self.bytes(),
            "trace": [_traced(r) for r in list(self.records)],
        }


def _traced(record: Record) -> dict[str, Any]:
    """A record as ``stats`` shows it: a dynamic-shape graph's call's ``flops`` at its sizes."""
    shown = record.__dict__.copy()
    sized = shown.pop("sized")
    if sized is not None:
        executor, sizes, work = sized
        done, full = executor.flops_at(sizes, work, 1)
        shown["flops"] = done / full
    return shown


class StateFactory:
    """Finds, or makes, the CacheState of the model whose parameter is ``anchor``, for the calling
    thread.

    The states hang on one of the model's own parameters (the model's, so ``stats(model)`` can
    find them, and per instance, so two models compiled to one graph never share one), one per
    thread: two pipelines running at once in two threads of a server call the model in turns, and
    one state would take the other's calls for its own steps and branches (and reuse across them).
    A state belongs to one configuration (``key``: the cache option as given, the memory bound,
    whether outputs are copied): a model compiled again with another one gets a fresh state, so
    neither the cache nor the counters of one configuration leak into the other, and a state made
    without CUDA graphs never serves one that needs copies of what it caches. Graphs of the same
    configuration share the state: a recompile for a new shape, or a graph with a block skipped
    (whose default span ends elsewhere); a branch that changes graphs drops its own cache."""

    def __init__(self, memory: int | None, clone: bool, key: Any = None, timestep: str = "auto"):
        self.memory, self.clone, self.timestep = memory, clone, timestep
        self.key = (key, memory, clone, timestep)
        self._orphans = ThreadStates()     # a traced function with no parameters

    def __call__(self, anchor: Any) -> CacheState:
        # Keyed by the thread, not its ident: a new thread may get an ended one's ident.
        thread = threading.current_thread()
        states = self._orphans if anchor is None else getattr(anchor, STATE_ATTR, None)
        state = None if states is None else states.get(thread)
        if state is None or state.key != self.key:
            with _THREADS:      # threads making their first calls at once
                states = self._orphans if anchor is None else getattr(anchor, STATE_ATTR, None)
                if states is None:
                    states = ThreadStates()
                    setattr(anchor, STATE_ATTR, states)
                _drop_ended_threads(states)
                state = states[thread] = self._new()
        return state

    def _new(self) -> CacheState:
        return CacheState(self.memory, self.clone, self.key, self.timestep)


class ThreadStates(dict):
    """A parameter's CacheStates, by thread. Runtime state, not the model's: a copy of the model
    (``copy.deepcopy``, ``torch.save(model)``) gets none, so it shares nothing with the original
    (and a Thread does not pickle)."""

    def __reduce__(self) -> tuple:
        return ThreadStates, ()


# Guards the ThreadStates of every model as threads add and drop theirs (a lock, not state: the
# states themselves hang on each model's parameters).
_THREADS = threading.Lock()


def _drop_ended_threads(states: ThreadStates) -> None:
    """Forget the states of threads that have ended (a server's worker threads come and go):
    their caches would otherwise outlive them."""
    for thread in [t for t in states if not t.is_alive()]:
        del states[thread]


def find_state(model: torch.nn.Module, thread: threading.Thread | None = None
               ) -> CacheState | None:
    """The CacheState the runtime attached to one of ``model``'s parameters and used last, if any
    (of ``thread``'s, where given).

    Graphs of one model may anchor their states on different parameters (each anchors on its
    first parameter input, and two graphs of a model need not trace its parameters in one order),
    and each thread has its own: the one that ran last is the model's current state, not the
    first found."""
    return max(model_states(model, thread), key=lambda s: s.last_call, default=None)


def model_states(model: torch.nn.Module, thread: threading.Thread | None = None
                 ) -> list[CacheState]:
    """Every CacheState attached to ``model``'s parameters (all threads', or ``thread``'s), once
    each."""
    model = unwrap(model)
    # torch.compile of a function returns a function: the state is on the model it calls.
    expect_module(model, "mixcache keeps its cache state on the model's parameters: pass",
                  " (for a compiled function, the model it calls)")
    states = {}
    for p in model.parameters():
        with _THREADS:
            owned = list(getattr(p, STATE_ATTR, {}).items())
        for owner, state in owned:
            if thread is None or owner is thread:
                states[id(state)] = state
    return list(states.values())


def sample_times(t: float | tuple[float, ...], n: int) -> np.ndarray:
    """An output's timestep, one per sample (float64, host)."""
    if isinstance(t, tuple):
        return np.array(t, dtype=np.float64)
    return np.full(n, t, dtype=np.float64)


def push_outputs(outputs: list[tuple[Any, list[torch.Tensor]]], t: float, outs: list[torch.Tensor],
                 keep: int, fresh: torch.Tensor | None = None) -> list[tuple[Any, list[torch.Tensor]]]:
    """The history of computed outputs with ``(t, outs)`` added, ``keep`` long at most; only for
    the samples in ``fresh`` (None: all), where only some of the batch computed.

    Each sample's history is then its own: entry ``-1`` is its last computed output, ``-2`` the one
    before, with that sample's timestep (a tuple of one per sample where they differ). A sample with
    fewer entries repeats its oldest at the front; the repeat shares a timestep, so an extrapolation
    through it drops to the lower order, as it would with that sample alone."""
    pushed = (outputs + [(t, outs)])[-keep:]
    if fresh is None or not outputs:
        return pushed
    kept = ([outputs[0]] * (len(pushed) - len(outputs)) + outputs)[-len(pushed):]
    fresh = fresh.cpu()
    history = []
    for (tn, yn), (to, yo) in zip(pushed, kept):
        n = yn[0].shape[0]
        times = np.where(fresh.numpy(), sample_times(tn, n), sample_times(to, n)).tolist()
        mask = per_sample_view(fresh.to(yn[0].device), yn[0])
        history.append((times[0] if len(set(times)) == 1 else tuple(times),
                        [torch.where(mask, a, b) for a, b in zip(yn, yo)]))
    return history


def extrapolate(outputs: list[tuple[Any, list[torch.Tensor]]], t: float, order: int
                ) -> list[torch.Tensor]:
    """The outputs at ``t`` predicted from the last ``order + 1`` computed ``(t_i, outputs_i)``:
    the polynomial in t through them (Lagrange form), of lower order where fewer are at hand or
    two share a timestep. Order 0 is the last output itself. Per sample where the samples' last
    computed steps differ (``push_outputs``)."""
    n = outputs[-1][1][0].shape[0]
    per_sample = any(isinstance(ti, tuple) for ti, _ in outputs)
    # weights[i][b]: the weight of entry i for sample b.
    weights = [[0.0] * (n if per_sample else 1) for _ in outputs]
    entries: set[int] = set()
    for b in range(len(weights[0])):
        points: list[tuple[float, int]] = []
        for i in reversed(range(len(outputs))):
            ti = outputs[i][0][b] if isinstance(outputs[i][0], tuple) else outputs[i][0]
            if len(points) <= order and all(ti != tj for tj, _ in points):
                points.append((ti, i))
        for ti, i in points:
            w = 1.0
            for tj, j in points:
                if j != i:
                    w *= (t - tj) / (ti - tj)
            weights[i][b] = w
            entries.add(i)
    used = sorted(entries)
    if used == [len(outputs) - 1]:     # copies: the caller may write into what it is handed
        return [y.clone() for y in outputs[-1][1]]
    # The weights are large and of both signs (1, -3, 3 for the next point of an evenly spaced
    # sequence at order 2): summed in bf16 the roundings of the terms add up to several ulps of the
    # result, so the sum is taken in float32 at least. Accumulated in place (add_ promotes a bf16
    # term itself): a reused call of a launch-bound model pays per kernel, and this is half of them.
    out = []
    for k, y0 in enumerate(outputs[used[-1]][1]):
        acc = None
        for i in reversed(used):
            y = outputs[i][1][k]
            if per_sample:
                w = torch.tensor(weights[i], dtype=torch.float32, device=y.device)
                term = y * per_sample_view(w, y)
                acc = term if acc is None else acc.add_(term)
            elif acc is None:
                acc = y.to(torch.promote_types(y.dtype, torch.float32)) * weights[i][0]
            else:
                acc.add_(y, alpha=weights[i][0])
        out.append(acc.to(y0.dtype))
    return out


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(tree) if isinstance(v, torch.Tensor)]


def _held(x: torch.Tensor) -> Held:
    """``x`` as the runtime keeps it to tell later whether a tensor holds the same value: with its
    in-place version counter, or, for an inference tensor (``torch.inference_mode``: no counter),
    with a copy, since the object itself may have been written to since."""
    if x.is_inference():
        return x, None, x.clone()
    return x, x._version, None


def _equal_halves(kept: Held) -> bool:
    """Whether a kept batch's two halves were equal when it was kept (a sync; only on a change
    of batch size). One written to since is taken as unequal."""
    x, version, copy = kept
    if copy is None and version is not None and x._version != version:
        return False
    x = x if copy is None else copy
    k = x.shape[0] // 2
    return bool(torch.equal(x[:k], x[k:]))


def _same(kept: Held | None, x: torch.Tensor) -> bool:
    """Whether ``x`` holds the value ``kept`` held: the same object not modified in place since
    (no compare, no sync), or another tensor of equal shape, dtype, device and values; against the
    copy, where one was kept."""
    if kept is None:
        return False
    old, version, copy = kept
    if copy is None:
        if old is x:
            return x._version == version
        if old._version != version:     # written to since: what it held is gone
            return False
        copy = old
    return (copy.shape == x.shape and copy.dtype == x.dtype and copy.device == x.device
            and torch.equal(copy, x))


def per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` (one value per sample) viewed to broadcast over ``like``'s other dimensions."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))
