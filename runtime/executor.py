"""The stitched callable that Dynamo runs in place of the traced graph.

Contract: ``Executor(plan, fns)(*graph_inputs)`` returns what the traced graph returns, running
``fns[i]`` (the compiled form of ``plan.pieces[i]``) over one value table. Everything that can be
decided at compile time (which slots each piece reads and writes, when a slot is dead) is decided in
``__init__``; a call is indexing and the compiled pieces, nothing else.
"""
from __future__ import annotations

import operator
import warnings
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..passes.modulation import Modulation
from ..passes.regions import BLOCK
from ..passes.split import Plan, output_keys, residual_sources
from .cache import (BranchCache, CacheState, StateFactory, Step, extrapolate, per_sample_view,
                    push_outputs)
from .halves import HalfBatch, guidance_groups, is_batched_cfg
from .policy import CFG, COMPUTE, STEP, Policy, PolicyError
from .sampler import sampler_run


# The work a call did, as (base, span, pre): ``base`` shares of a whole forward, less ``span`` times
# the reused block span's share, plus ``pre`` times the share of the pieces before the first block.
# Shares differ by sizes (attention grows with the sequence faster than the rest), so a graph with
# dynamic shapes weighs each call's work at its own sizes (GuardedExecutor.flops_at).
Work = tuple[float, float, float]


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The devices autocast is on for, with their dtypes, as this graph is compiled."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                 if torch.is_autocast_enabled(d))


def kept_outputs(fn: Callable[..., Any], keep: tuple[int, ...], single: bool) -> Callable[..., Any]:
    """``fn`` (a mate's compile or program) returning its outputs ``keep`` (one value where
    ``single``): what the pruned twin (``split.pruned_twins``) that runs it returns."""
    def call(*args: Any) -> Any:
        out = fn(*args)
        return out[keep[0]] if single else [out[k] for k in keep]
    return call


class Executor:
    """A plan's compiled pieces run in order over one value table per call: the stitched graph,
    caching nothing (``GuardedExecutor`` asks a cache policy at each guard point)."""

    # What __init__ decides from the plan, all of it plain data (slot numbers, flags, FLOP shares):
    # an exported model (dit_compile.export) saves it and is rebuilt from it, with no graph.
    LAYOUT: tuple[str, ...] = ("wiring", "n_pad", "out_leaves")

    def __init__(self, plan: Plan, fns: Sequence[Callable[..., Any]]):
        out_slots = {s for s in plan.out_leaves if isinstance(s, int)}
        # Free each slot after the last piece that reads it, so block outputs of a 40-layer stack
        # are not all alive at once; outputs and graph inputs are never freed here.
        last_read: dict[int, int] = {}
        for i, p in enumerate(plan.pieces):
            for s in p.args:
                last_read[s] = i
        frees: list[list[int]] = [[] for _ in plan.pieces]
        for s, i in last_read.items():
            if s >= plan.n_inputs and s not in out_slots:
                frees[i].append(s)
        self.wiring = [(p.args, p.outs, p.single, tuple(f)) for p, f in zip(plan.pieces, frees)]
        self.n_pad = plan.n_slots - plan.n_inputs
        self.out_leaves, self.out_spec = list(plan.out_leaves), plan.out_spec
        self._bind(fns)
        # What the graph computes, not which compile made it: a recompile of the same forward
        # for other sizes takes the cache on where the last left it. Dynamo also recompiles when
        # autocast is switched on or off, and that graph returns other dtypes: its own values.
        self.token: object = (plan.computation, autocast_state())

    def _bind(self, fns: Sequence[Callable[..., Any]]) -> None:
        self.fns = list(fns)
        self._pad = [None] * self.n_pad
        self.calls = [(fn, *w) for fn, w in zip(self.fns, self.wiring)]

    def layout(self) -> dict[str, Any]:
        """The compile-time decisions (``LAYOUT``), for ``rebuild``."""
        return {k: getattr(self, k) for k in self.LAYOUT}

    @classmethod
    def rebuild(cls, layout: dict[str, Any], out_spec: pytree.TreeSpec,
                fns: Sequence[Callable[..., Any]], **runtime: Any) -> "Executor":
        """The executor ``layout`` describes, running ``fns``; ``runtime``: what a guarded one
        holds beside its layout (policy, states, halves)."""
        ex = cls.__new__(cls)
        ex.__dict__.update(layout, out_spec=out_spec, **runtime)
        ex._bind(fns)
        # This graph's values in a cache state are its own: another graph's are not reused here.
        # A rebuilt (exported) executor has no graph to key, so it is a graph of its own.
        ex.token = object()
        return ex

    def run(self, env: list[Any], start: int = 0, stop: int | None = None) -> None:
        """Run pieces ``start:stop`` over ``env`` in place."""
        for fn, args, outs, single, frees in self.calls[start:stop]:
            r = fn(*[env[i] for i in args])
            if single:
                env[outs[0]] = r
            else:
                for o, v in zip(outs, r):
                    env[o] = v
            for s in frees:
                env[s] = None

    def output(self, env: list[Any]) -> Any:
        leaves = [env[s] if isinstance(s, int) else s[1] for s in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)

    def __call__(self, *args: Any) -> Any:
        env = [*args, *self._pad]
        self.run(env)
        return self.output(env)


class GuardedExecutor(Executor):
    """The executor with MixCache guard points: step and cfg at entry, block after the probe.

    Compile time fixes where the guards sit (piece indices) and which slots the block span reads
    and writes; per call, the policy's answers pick one of three paths over the same pieces.
    """
    LAYOUT = Executor.LAYOUT + (
        "anchor", "flops", "forward_flops", "latent", "t", "text", "_detect", "sig_slots", "first",
        "probe_end", "span", "probe_out", "probe_in", "span_pairs", "span_flops", "_copy_probe_in",
        "_copy_span_in", "out_slots", "_keep_latent", "_keep_input", "_n_outputs",
        "sample_slots", "sample_outs", "text_slots", "cond_slots")

    # Not part of the layout (a graph, not data): an exported model saves it as a program.
    modulation: Modulation | None = None
    _pre_flops = 0.0
    forward_flops = 1.0     # a full forward's FLOPs (an export saved before it was: one)
    sized: Any = None       # not part of the layout: an exported graph's shapes are static
    # A latent given as a list of per-sample tensors (passes.inputs.sample_list): the list's
    # input slots, and the positions in out_slots of the per-sample outputs. The policy sees
    # both stacked, so that dim 0 is the samples there too. Empty: the latent is one tensor.
    sample_slots: Sequence[int] = ()
    sample_outs: Sequence[int] = ()
    text_slots: Sequence[int] = ()     # the text condition as a list beside them, or empty
    # The other conditions (inputs.conditions) where the policy watches them for a switch.
    cond_slots: Sequence[int] = ()
    _held_conditions: tuple | None = None   # (batch, [(weakref, version)], magnitudes): _conditions
    # The parameter inputs: two models that share the anchor's module share its state, and
    # these tell their calls apart (see ``_call``). Empty where the parameters cannot be another
    # model's (a loaded export's own weights).
    partners: Sequence[int] = ()
    _told_unstackable = False

    def __init__(self, plan: Plan, fns: Sequence[Callable[..., Any]], policy: Policy,
                 states: StateFactory, anchor: int | None, flops: Sequence[float],
                 halves: HalfBatch | str | None = None, modulation: Modulation | None = None,
                 partners: Sequence[int] = (), roles: dict[str, int] | None = None,
                 sized: Any = None):
        """``roles``: the slots of the latent, timestep and text where they are not the graph's
        own inputs (runtime.relay); the graph's other inputs are then not read as conditions."""
        super().__init__(plan, fns)
        # ``flops``: each piece's FLOPs (dit_compile.flops.piece_flops); kept as shares of the
        # forward, what a call computes, and the forward's, what the call weighs in ``stats``.
        self.forward_flops = float(sum(flops)) or 1.0
        self.flops = [f / self.forward_flops for f in flops]
        # A dynamic-shape graph's FLOPs at a call's sizes (dit_compile.flops.SizedFlops), or None
        self.sized = sized
        self.policy, self.states, self.anchor = policy, states, anchor
        self.partners = list(partners)
        # Read at every call, in C (about 10 us for 800 parameters; a tuple even for one).
        self._partners_of = (operator.itemgetter(*self.partners) if len(self.partners) > 1
                             else lambda env: tuple(env[i] for i in self.partners))
        names, own = plan.input_names, roles is None
        if own:
            roles = {role: names.index(name) for role, name in plan.rmap.inputs.items()}
        self.latent = roles["latent"]
        self.t = roles["timestep"]
        # Batched CFG: the half-batch forward, or why there is none (said once, when a batched-CFG
        # call shows up and the policy would reuse on it). Told apart only where the policy may
        # reuse cfg on it and the text input is known.
        self.text = roles.get("text")
        self.halves = halves if isinstance(halves, HalfBatch) else None
        self._no_halves = halves if isinstance(halves, str) else None
        if own:
            self.sample_slots = [names.index(n) for n in plan.rmap.samples]
            self.sample_outs = list(plan.rmap.sample_outs)
            self.text_slots = [names.index(n) for n in plan.rmap.texts]
            if getattr(policy, "watches_conditions", False):
                self.cond_slots = [names.index(n) for n in plan.rmap.conditions]
        self._detect = self.text is not None and bool(getattr(policy, "ties_groups", False))
        # The text is not in the signature: its changes are the branch's own (CacheState).
        self.sig_slots = [*(self.sample_slots or [self.latent]), self.t]
        guarded = plan.rmap.guarded
        blocks = [i for i, p in enumerate(plan.pieces) if any(p.region is r for r in guarded)]
        a, b = policy.span
        self.first = blocks[0]
        self.probe_end = blocks[policy.probe - 1] + 1
        self.span = (blocks[a], blocks[b - 1] + 1)
        ex = plan.slot_examples
        streams = Streams(plan)
        # The probe's residual: its first stream output minus the same stream into block 0 (or the
        # output itself where none is found).
        probe_outs = plan.pieces[self.probe_end - 1].outs
        first_ins = [s for s in plan.pieces[self.first].args if s >= plan.n_inputs]
        pairs = streams.pair(probe_outs, self.first, first_ins, ex)
        self.probe_out, self.probe_in = pairs[0] if pairs else (probe_outs[0], None)
        # The span: its outputs, each paired with the same stream entering it (residual reuse) or
        # unpaired (the value itself is reused).
        s0, s1 = self.span
        later = {i for p in plan.pieces[s1:] for i in p.args} | {
            s for s in plan.out_leaves if isinstance(s, int)}
        outs = [o for p in plan.pieces[s0:s1] for o in p.outs if o in later]
        # Fallback candidates: region outputs alive at the span start, the most recent first (the
        # stream the previous block left beats an older value of the same shape).
        alive = {i for p in plan.pieces[s0:] for i in p.args} | later
        before = [o for p in plan.pieces[:s0] for o in p.outs if o in alive]
        self.span_pairs = streams.pair(outs, s0, before[::-1], ex, keep_unpaired=True)
        self.span_flops = sum(self.flops[s0:s1])
        # The first block's modulated input, where the policy decides on it (TeaCache): computed
        # after the pieces before that block, which then count in every call.
        if modulation is not None:
            self.set_modulation(modulation)
        # Streams read before the probe and the span are kept as they were: copied where a block
        # writes into its input in place (decided here, once).
        self._copy_probe_in = any(p.writes_in_place() for p in plan.pieces[self.first:self.probe_end])
        self._copy_span_in = any(p.writes_in_place() for p in plan.pieces[s0:s1])
        self.out_slots = [s for s in plan.out_leaves if isinstance(s, int)]
        # Keep the latent only for the policies that read it, decided once here.
        self._keep_latent = policy.step_mode == "residual"
        self._keep_input = getattr(policy, "teacache", None) is not None
        # The computed outputs an extrapolation of this order reads; two at least (rates).
        self._n_outputs = max(2, policy.extrapolate + 1)
        if self._keep_latent and own:
            check_residual_shapes(ex.get(self.latent), [ex.get(s) for s in self.out_slots])

    def set_modulation(self, modulation: Modulation) -> None:
        """Decide on the first block's modulated input (TeaCache): the pieces before that block
        then run in every call, reused or not."""
        assert modulation.piece == self.first, "the modulation belongs to the first block"
        self.modulation, self._pre_flops = modulation, sum(self.flops[:self.first])

    def __call__(self, *args: Any) -> Any:
        return self._call([*args, *self._pad])

    def _call(self, env: list[Any]) -> Any:
        st = self.states(None if self.anchor is None else env[self.anchor])
        if self.sample_slots and len({env[i].shape for i in self.sample_slots}) > 1:
            return self._unstackable(env, st)
        x = (torch.stack([env[i] for i in self.sample_slots]) if self.sample_slots
             else env[self.latent])
        groups = (guidance_groups(x, env[self.t], self._per_sample_text(env)) if self._detect
                  else 1)
        placement = st.placement()
        run = sampler_run()
        step = st.begin(st.noise_level(env[self.t], run), tuple(
            (tuple(env[i].shape), env[i].dtype, env[i].device) for i in self.sig_slots),
            halves=groups == 2 and self._halves_call(env, x.shape[0]), groups=groups,
            text=self._text_key(env), latent=x, timestep=env[self.t],
            # A model sharing the anchor's module with this one (Wan 2.2's experts, sharing
            # their patch embedding; a copy with one layer of its own) runs the same graph on
            # other weights: to the branch's cache, that is another graph, and nothing it holds
            # is handed to the other model.
            graph=(self.token, tuple(map(id, self._partners_of(env)))) if self.partners
            else self.token,
            run=run)
        if self.cond_slots:
            step.conditions = self._conditions(env, x.shape[0])
        try:
            return self._decide_and_run(env, st, step, x)
        except BaseException:
            # An OOM, an interrupt, CacheMemoryError: the call never finished, and its retry
            # must be placed as it was, not as the step's next branch (which would leave this
            # branch's cache a step behind its schedule).
            st.abandon(placement, step)
            raise

    def _decide_and_run(self, env: list[Any], st: CacheState, step: Step, x: torch.Tensor) -> Any:
        """The call ``step`` places: the policy's decision, then reuse or compute."""
        pol = self.policy
        bc = st.branch(step.branch)
        ran, seen, pre = 0, x, 0.0     # pre: 1 where the pieces before the first block ran
        if self.modulation is not None:
            # TeaCache decides on the first block's modulated input: the pieces before that block
            # run ahead of the decision (a reuse wastes them, as TeaCache's does), then the
            # block's norm and modulation alone.
            self.run(env, 0, self.first)
            ran, pre = self.first, 1.0
            seen = self.modulation.module(*[env[i] for i in self.modulation.args])
        action, signal = pol.step(step, st, seen)
        if self._keep_input:        # a copy: a sampler may update its latent in place
            bc.last_input = seen.clone()

        if action == CFG and step.halves:
            outs = self._cfg_halves(env, st.cfg_diff[step.branch])
            if outs is not None:
                return self._finish(st, env, step, bc, outs, CFG, (0.5, 0.0, pre), signal, x)
            action = COMPUTE
        if action == CFG:
            outs = [o0 + d for o0, d in zip(st.current[0], st.cfg_diff[step.branch])]
            return self._finish(st, env, step, bc, outs, CFG, (0.0, 0.0, pre), signal, x)
        if action == STEP:
            outs = self._reuse_step(bc, x, step.t)
            reused = bc.signals.get("step_mask")
            if reused is None:
                return self._finish(st, env, step, bc, outs, STEP, (0.0, 0.0, pre), signal, x)
            # Only some samples reuse: the batch runs (the graph is compiled for it, and the
            # others need it), each of the others as alone it would (its block decision
            # included), and those take their prediction.
            reused = torch.from_numpy(reused).to(x.device)
            computed, _, flops, _, spanned = self._compute(env, st, step, bc, ran, reused)
            outs = [torch.where(per_sample_view(reused, p), p, o) for p, o in zip(outs, computed)]
            return self._finish(st, env, step, bc, outs, STEP, flops, signal, x, reused, spanned)

        outs, kind, flops, bsig, mask = self._compute(env, st, step, bc, ran)
        if (bsig is not None and signal is not None and kind == "compute"
                and getattr(self.policy, "signals_are_errors", False)):
            bsig = min(bsig, signal)    # the smallest estimate that did not fit
        return self._finish(st, env, step, bc, outs, kind, flops,
                            bsig if bsig is not None else signal, x, mask)

    def _compute(self, env: list[Any], st: CacheState, step: Step, bc: BranchCache, ran: int,
                 held: torch.Tensor | None = None
                 ) -> tuple[list[Any], str, Work, float | None, torch.Tensor | bool | None]:
        """Compute the call from piece ``ran`` on, with the block guard between the probe and the
        span: the outputs, "compute" or "block", the work done, the block decision's signal,
        and the samples that reused the span where only some did. ``held``: the samples whose
        output is their step prediction (a partial step reuse); alone they would not have run,
        so the cached residual and probe stay theirs, and where the others all reuse the span,
        nobody computes it."""
        self.run(env, ran, self.first)
        stream0 = None if self.probe_in is None else env[self.probe_in]
        if stream0 is not None and self._copy_probe_in:
            stream0 = stream0.clone()
        self.run(env, self.first, self.probe_end)
        pol = self.policy
        flops, kind, mask, bsig = (1.0, 0.0, 0.0), "compute", None, None
        if pol.uses_blocks:
            probe = env[self.probe_out] if stream0 is None else env[self.probe_out] - stream0
            self.run(env, self.probe_end, self.span[0])
            skip, bsig = pol.block(step, st, bc, probe)
            mask = None if skip is True or skip is False else skip
            if held is not None and bc.span is not None and bc.probe is not None and (
                    bc.probe.shape == probe.shape):
                skip = held if skip is False else held | skip
                skip = True if bool(skip.all()) else skip
            ins = [None if i is None else env[i].clone() if self._copy_span_in else env[i]
                   for _, i in self.span_pairs]
            if skip is True:
                for (o, _), v, r in zip(self.span_pairs, ins, bc.span):
                    env[o] = r if v is None else _laid_out_as(r, torch.add, v, r)
                flops, kind = (1.0, 1.0, 0.0), "block"
            else:
                self.run(env, *self.span)
                if pol.reuses_blocks:   # else the span's residual is never read: not kept
                    # Residuals in the layout of the span's own outputs, so that a reused
                    # stream enters the next compiled piece as a computed one does.
                    fresh = [env[o] if v is None else _laid_out_as(env[o], torch.sub, env[o], v)
                             for (o, _), v in zip(self.span_pairs, ins)]
                    if skip is not False:
                        # Per sample: the samples that may reuse take the cached residual and
                        # keep it; the others take and cache what was just computed, as alone
                        # they would. The batch computed the span: block reuse at full FLOPs.
                        fresh = [_laid_out_as(f, torch.where, per_sample_view(skip, f), r, f)
                                 for f, r in zip(fresh, bc.span)]
                        for (o, _), v, f in zip(self.span_pairs, ins, fresh):
                            env[o] = f if v is None else _laid_out_as(f, torch.add, v, f)
                        probe = torch.where(per_sample_view(skip, probe), bc.probe, probe)
                        kind = "block" if mask is not None else kind
                    bc.span = [st.keep(f) for f in fresh]
                # The probe is compared with its value when the cached residual was taken (as
                # First-Block-Cache does), so slow drift adds up instead of hiding step by step.
                bc.probe = st.keep(probe)
            self.run(env, self.span[1])
        else:
            self.run(env, self.probe_end)
        return self._outs(env), kind, flops, bsig, mask

    def _unstackable(self, env: list[Any], st: CacheState) -> Any:
        """A call whose per-sample latents differ in shape (traced with dynamic sizes) cannot be
        decided on as one batch: computed in full, and nothing cached before it is reused after
        it. Said once per graph."""
        if not self._told_unstackable:
            self._told_unstackable = True
            warnings.warn("mixcache: the latent comes as a list of per-sample tensors of different "
                          f"shapes {[tuple(env[i].shape) for i in self.sample_slots]}, which "
                          "cannot be decided on as one batch: such calls are computed without "
                          "caching", stacklevel=3)
        st.reset()
        self.run(env)
        return self.output(env)

    def _outs(self, env: list[Any]) -> list[Any]:
        """The call's outputs as the policy sees them: per-sample outputs stacked first."""
        outs = [env[s] for s in self.out_slots]
        if not self.sample_outs:
            return outs
        return [torch.stack([outs[j] for j in self.sample_outs]),
                *(o for j, o in enumerate(outs) if j not in self.sample_outs)]

    def _slot_values(self, outs: list[Any]) -> list[Any]:
        """``_outs`` undone: the value of each of out_slots."""
        if not self.sample_outs:
            return outs
        rest = iter(outs[1:])
        samples = dict(zip(self.sample_outs, outs[0].unbind(0)))
        return [samples[j] if j in samples else next(rest) for j in range(len(self.out_slots))]

    def _text_key(self, env: list[Any]) -> torch.Tensor | None:
        """The text condition, compared from call to call: a list's captions as one flat tensor
        (each of its own length; a new one compares unequal by size or value)."""
        if self.text_slots:
            return torch.cat([env[i].reshape(-1) for i in self.text_slots])
        return None if self.text is None else env[self.text]

    def _conditions(self, env: list[Any], n: int) -> np.ndarray:
        """The mean magnitude of each other condition, per sample where its dim 0 is the batch
        (else one for all): [conditions, n], float64 on the host (NumPy), where the policy
        decides. A magnitude is enough to see a condition switched on or off, and costs no copy to
        keep.
        Where they are the very tensors of the last call, not written to since (a pipeline's
        pooled text and masks, passed as they are at every step), the last result stands: a
        reused call of a launch-bound model pays per op (on the CPU, 70 us of a 670 us reused
        call of a tiny Flux for its one pooled input)."""
        now = [env[i] for i in self.cond_slots]
        held = self._held_conditions
        if held is not None and held[0] == n and all(
                ref() is v and version == v._version for (ref, version), v in zip(held[1], now)):
            return held[2]
        rows = []
        for v in now:
            per_sample = v.dim() > 0 and v.shape[0] == n and v.numel() > 0
            v = v.detach().reshape(n, -1) if per_sample else v.detach().reshape(1, -1)
            rows.append(v.abs().mean(1, dtype=torch.float32).expand(n) if v.numel()
                        else torch.zeros(n, device=v.device))
        result = torch.stack(rows).nan_to_num().to("cpu", torch.float64).numpy()
        # Held by weak reference and version: a ControlNet's residuals are not kept alive for it.
        # An inference tensor has no version to tell a write by.
        self._held_conditions = None if any(v.is_inference() for v in now) else (
            n, [(weakref.ref(v), v._version) for v in now], result)
        return result

    def _per_sample_text(self, env: list[Any]) -> torch.Tensor | list[torch.Tensor]:
        """The text condition per sample: one tensor, or a list of one per sample."""
        return [env[i] for i in self.text_slots] if self.text_slots else env[self.text]

    def _halves_call(self, env: list[Any], batch: int) -> bool:
        """A batched-CFG call: both guidance branches as the halves of one batch. Without a
        half-batch forward (the user is told why, once) cfg reuse cannot take it, and no branch
        difference is kept for it; its halves still decide as one."""
        if not is_batched_cfg(self._per_sample_text(env), batch):
            return False
        if self.halves is None and self._no_halves is not None:
            warnings.warn(f"mixcache: a batched-CFG call (both guidance branches in one batch), "
                          f"but no half-batch forward: {self._no_halves}; cfg reuse computes the "
                          "full batch instead", stacklevel=3)
            self._no_halves = None
        return True

    def flops_at(self, key: tuple[int, ...], work: Work, calls: int) -> tuple[float, float]:
        """FLOPs computed, and those of full forwards, by ``calls`` calls of this dynamic-shape
        graph at sizes ``key`` whose ``Work`` adds up to ``work`` (counted on the first ask)."""
        pieces = self.sized.pieces(key)
        full = sum(pieces) or 1.0
        base, span, pre = work
        s0, s1 = self.span
        return (base * full - span * sum(pieces[s0:s1]) + pre * sum(pieces[:self.first]),
                calls * full)

    def _cfg_halves(self, env: list[Any], diff: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The conditional half computed, the unconditional half rebuilt from it and the
        difference ``first - second`` of the last full compute, in the call's order."""
        k = (len(self.sample_slots) if self.sample_slots else env[self.latent].shape[0]) // 2
        cond = self.halves(env, k)
        if cond is None:
            return None
        if self.halves.conditional_first:
            return [torch.cat([c, c - d]) for c, d in zip(cond, diff)]
        return [torch.cat([c + d, c]) for c, d in zip(cond, diff)]

    def _conditional(self, n: int) -> torch.Tensor:
        """Which samples of a batch of guidance halves are the conditional half (computed on a
        cfg reuse); on the host, where the history reads it (no device read)."""
        half = torch.arange(n) < n // 2
        return half if self.halves.conditional_first else ~half

    def _reuse_step(self, bc: BranchCache, x: torch.Tensor, t: float) -> list[torch.Tensor]:
        if self.policy.step_mode == "residual":
            return [x + (o - bc.latent) for o in bc.outputs[-1][1]]
        return extrapolate(bc.outputs, t, self.policy.extrapolate)

    def _finish(self, st: CacheState, env: list[Any], step: Step, bc: BranchCache,
                outs: list[torch.Tensor], kind: str, work: Work, signal: float | None,
                x: torch.Tensor, mask: torch.Tensor | None = None,
                spanned: torch.Tensor | None = None) -> Any:
        """Cache what this call produced and record it. ``mask``: the samples that reused (the
        block span, or the step) when only some did: their consecutive-reuse count goes on, the
        others' ends; after a partial step reuse, only the others' outputs enter the history.
        ``spanned``: after a partial step reuse, the others that reused the block span.
        ``work``: what the call computed (``Work``)."""
        fresh = ~mask if kind == STEP and mask is not None else None
        if kind == CFG and step.halves:
            # The half-batch forward computed the conditional half: it enters the history, as a
            # conditional branch computed alone would (a step reuse next extrapolates from it);
            # the rebuilt half does not.
            fresh = self._conditional(outs[0].shape[0])
        computed = kind in ("compute", "block") or fresh is not None
        # Copies: what a call returns is the caller's, who may write into it (a buffer reused
        # once the sampler has stepped), as under plain torch.compile; under CUDA graphs the next
        # replay overwrites it as well.
        st.current[step.branch] = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        reused = mask if spanned is None else mask | spanned
        if kind == "compute":
            bc.reused_in_a_row = 0
        elif reused is not None:
            bc.reused_in_a_row = torch.where(reused, bc.reused_in_a_row + 1, 0)
        else:
            bc.reused_in_a_row = bc.reused_in_a_row + 1
        if computed:
            bc.outputs = push_outputs(bc.outputs, step.t, st.current[step.branch],
                                      self._n_outputs, fresh)
            if self._keep_latent:       # a copy: a sampler may update its latent in place
                bc.latent = (x.clone() if fresh is None else
                             torch.where(per_sample_view(fresh.to(x.device), x), x, bc.latent))
            if kind != CFG:
                bc.accumulated = None
        if computed and fresh is None:
            # The branch difference is of whole calls: a partial step reuse leaves it as it was.
            # Kept only where cfg reuse may read it (it is a whole output's worth of memory).
            st.computed.add(step.branch)
            reuses, diff = self.policy.reuses_cfg, None
            if reuses and step.halves:
                if self.halves is not None:     # only a half-batch forward rebuilds from it
                    k = outs[0].shape[0] // 2
                    diff = [o[:k] - o[k:] for o in outs]
            elif (reuses and step.branch >= 1 and 0 in st.computed
                  and _same_shapes(st.current[step.branch], st.current[0])):
                # Not between a guidance pass and a call of another batch (broadcast, it would
                # rebuild the pass at the other's batch).
                diff = [o - o0 for o, o0 in zip(st.current[step.branch], st.current[0])]
            if diff is not None:
                st.cfg_diff[step.branch], st.cfg_step[step.branch] = diff, step.step
        self.policy.observe(step, st, bc, outs, kind)
        st.check_memory()
        base, span, pre = work
        st.record(step, kind, base - span * self.span_flops + pre * self._pre_flops, signal,
                  bc.signals.get("spent"), reused, bc.signals.get("moved"), self.forward_flops,
                  None if self.sized is None else (self, self.sized.key(env), work))
        for s, o in zip(self.out_slots, self._slot_values(outs)):
            env[s] = o
        return self.output(env)


def _same_shapes(a: list[Any], b: list[Any]) -> bool:
    """Two calls' outputs, leaf for leaf of one shape (a branch difference between them holds)."""
    return len(a) == len(b) and all(_same_shape(x, y) for x, y in zip(a, b)
                                    if isinstance(x, torch.Tensor))


def _same_shape(a: Any, b: Any) -> bool:
    """Both tensors, of a shape known to be equal. Sizes may be symbolic, even data-dependent
    (HunyuanVideo 1.5 selects its text tokens by mask): ``==`` on those would guard on a value the
    compile cannot know, so what is not known equal counts as different."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape)))


def check_residual_shapes(latent: Any, outs: list[Any]) -> None:
    """Residual step reuse adds the output's change to the latent: both must have one shape."""
    bad = [(i, tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__)
           for i, o in enumerate(outs) if not _same_shape(o, latent)]
    if bad:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else None
        which = "the output" if len(outs) == 1 else f"output {bad[0][0] + 1} of {len(outs)}"
        raise PolicyError(f"step_mode='residual' adds the output's change to the input latent, but "
                          f"the latent has shape {shape} and {which} {bad[0][1]} (a model with "
                          "extra input channels, such as image-to-video, extra output channels, "
                          "such as DiT's learned variance, or a second output of its own, such "
                          "as LTX-2's audio): use step_mode='output'")


def _laid_out_as(like: torch.Tensor, op: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``op(*args)`` written in ``like``'s strides. An elementwise op of two differently laid-out
    tensors (a block's input stream contiguous, its output a transposed view, as in HunyuanVideo)
    picks a layout of its own, and a piece compiled by Inductor takes its inputs in the strides it
    was traced with (it asserts them; an AOTInductor package reads them unchecked). Strides, not
    ``empty_like``'s layout: a stream may be a slice of a wider buffer (HunyuanVideo's image
    tokens cut from the joint sequence, a batch stride past their own size), and ``empty_like``
    makes such a tensor dense."""
    return op(*args, out=torch.empty_strided(like.shape, like.stride(), dtype=like.dtype,
                                             device=like.device))



class Streams:
    """Which slot carries the same residual stream as another, read off the plan's wiring.

    Two streams of one shape (Flux's text and image tokens at equal lengths) cannot be told apart
    by shape. The wiring tells them apart: each block output has a key, the computation behind it
    (``output_keys``: equal in every block that computes it, the last one of a stack too, whose
    other outputs were pruned). Where a block's output of key ``k`` goes into the next block's
    argument ``a`` and that block computes ``k`` too, the output of key ``k`` carries the stream
    that entered at argument ``a``. Following that backwards from a block's output reaches the slot
    its stream had before a given piece. A block whose keys the next block does not compute (a
    stack of one block, a LoRA on one block) says by its own graph which argument each output is
    a residual update of (``residual_sources``); across a piece where neither says (a glue region)
    the stream is lost and shape decides."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.keys = [output_keys(p.module) if p.region.kind == BLOCK else [] for p in plan.pieces]
        # Where a block computes what the next one does not (a LoRA on one block), its own graph
        # says which argument each output is a residual update of.
        self.own = [residual_sources(p.module) if p.region.kind == BLOCK else []
                    for p in plan.pieces]
        self.producer = {o: (i, m) for i, p in enumerate(plan.pieces) for m, o in enumerate(p.outs)}
        self.carry: dict[str, int] = {}     # output key -> the argument its stream comes from
        for i in range(len(plan.pieces) - 1):
            p, q, keys = plan.pieces[i], plan.pieces[i + 1], set(self.keys[i + 1])
            for a, s in enumerate(q.args):
                if s in p.outs and self.keys[i] and self.keys[i][p.outs.index(s)] in keys:
                    self.carry[self.keys[i][p.outs.index(s)]] = a

    def source(self, slot: int, start: int) -> int | None:
        """The slot holding ``slot``'s stream before piece ``start`` ran, or None if lost."""
        while slot in self.producer and self.producer[slot][0] >= start:
            i, m = self.producer[slot]
            a = self.carry.get(self.keys[i][m]) if m < len(self.keys[i]) else None
            if a is None and m < len(self.own[i]):
                a = self.own[i][m]
            if a is None:
                return None
            slot = self.plan.pieces[i].args[a]
        return slot

    def pair(self, outs: Sequence[int], start: int, ins: Sequence[int], examples: dict[int, Any],
             keep_unpaired: bool = False) -> list[tuple[int, int | None]]:
        """Pair each output slot with the input slot (of ``ins``, the values alive before piece
        ``start``) that carried its stream; failing that, with the first unused one of the same
        shape and dtype."""
        def alike(a: int, b: int) -> bool:
            x, y = examples.get(a), examples.get(b)
            return _same_shape(x, y) and x.dtype == y.dtype

        free = list(ins)
        traced = {o: self.source(o, start) for o in outs}
        for src in traced.values():
            if src in free:
                free.remove(src)
        pairs: list[tuple[int, int | None]] = []
        for o in outs:
            src = traced[o]
            match = src if src in ins and alike(src, o) else next(
                (i for i in free if alike(i, o)), None)
            if match is not None and match in free:
                free.remove(match)
            if match is not None or keep_unpaired:
                pairs.append((o, match))
        return pairs
