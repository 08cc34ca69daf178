"""The relay: caching a forward that Dynamo breaks into graphs, by the call's own inputs.

Where a graph break cuts a DiT's forward before its blocks (OmniGen's rotary table, built from
position ids on the host), Dynamo hands the backend the forward's first graph, which sees the
call's arguments, and a resume of the forward that runs every block to its return, which sees only
what the code between made of them: the embedded timestep, a joint text-and-image sequence under
the name ``hidden_states``. Reuse rules need the call's own latent, timestep and text (steps,
branches and generations are told by them), so the first graph records them (``Head``) on the
tensors it returns, and the graph holding the blocks finds the record on the tensors it is given
(``RelayedExecutor``): a hand-off within one call, by the tensors the forward passes from one
graph to the next. Those tensors are new at each call, so a record never outlives its call's
values; it is taken only where it is its head's last on this thread (a tensor the model kept
from an earlier call carries an old one), and a call that finds none computes in full.

cfg reuse on a call that batches both guidance branches (OmniGen's ``[cond, uncond]``) runs the
module's forward on one half (runtime.halves): whole, break included, on the forward's arguments.
Only the first graph sees those (Dynamo's frame of the forward, and the graph inputs its tensors
became), so the head holds the recipe and the record the head's inputs; the graph holding the
blocks fits the recipe to its own outputs, which are the forward's.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..notes import notes
from ..passes.split import Plan
from .executor import Executor, GuardedExecutor, check_residual_shapes
from .halves import HalfBatch

TAG = "_mixcache_call"      # the attribute a head's output tensors carry their record in
# Calls of a head whose records no graph took before the runtime says that nothing is cached (the
# first may be retraced: a break that only a first call's lazy setup makes).
UNTAKEN_AFTER = 3


@dataclass(eq=False)
class CallInputs:
    """One call's latent, timestep and text condition (None where the forward takes none), and
    the inputs of its head's graph (for the half-batch forward)."""
    latent: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor | None
    head: "Head"
    args: tuple[Any, ...]


class Head:
    """The forward's first graph: ``fn`` as compiled, its outputs at ``tagged`` tagged with the
    call's inputs at ``slots`` (latent, timestep, text or None, as graph input indices).
    ``tagged``: the tensors the graph computes, not its inputs passed through (the record would
    outlive the call on a tensor of the caller's); found in the graph at compile time.
    ``halves``: the forward's half-batch recipe over this graph's inputs, or why there is none
    (None: the cache option reuses no cfg)."""

    def __init__(self, fn: Callable[..., Any], slots: tuple[int, int, int | None],
                 tagged: Sequence[int], name: str = "the model",
                 halves: HalfBatch | str | None = None, model: Any = None):
        self.fn, self.slots, self.tagged, self.name = fn, slots, list(tagged), name
        self.halves = halves
        self._model = weakref.ref(model) if model is not None else lambda: None
        self._last = threading.local()
        self.calls = 0
        self.taken = False      # a graph holding the blocks took a record (RelayedExecutor)

    def __call__(self, *args: Any) -> Any:
        latent, t, text = (None if s is None else args[s] for s in self.slots)
        record = CallInputs(latent, t, text, self, args)
        self.calls += 1
        if (self.calls == UNTAKEN_AFTER and not self.taken and not self._uncached_tail()):
            # The forward broke again after this graph, inside its block loop (HunyuanVideo
            # FramePack's text cut by .item()): each block is a graph of its own, no graph runs
            # the blocks whole, and each of those graphs alone was left quiet for this one to
            # speak for.
            warnings.warn(f"mixcache: {self.name}: its forward breaks into graphs and none of "
                          "them holds its blocks whole (a break inside the block loop), so "
                          "nothing is cached. torch.compile(..., fullgraph=True) captures the "
                          "data-dependent operators that break a trace (.item(), nonzero, a "
                          "boolean mask's index); dit_compile.explain(model, *inputs) names the "
                          "breaks, with Dynamo's hints", stacklevel=2)
        outs = self.fn(*args)
        for i in self.tagged:
            setattr(outs[i], TAG, record)
        # Weakly: the record lives on the outputs it tags, as long as the call does; held here,
        # it kept the graph's inputs, the model's weights among them, past the model's deletion.
        self._last.record = weakref.ref(record)
        return outs

    def _uncached_tail(self) -> bool:
        """Whether the graph holding the blocks after the break was compiled uncached and said
        why (autograd recording the call, a write into an input): the records go untaken for that
        reason."""
        model = self._model()
        return model is not None and notes(model).uncached_tail

    def last(self) -> CallInputs | None:
        ref = getattr(self._last, "record", None)
        return ref() if ref is not None else None


def received(values: Sequence[Any]) -> CallInputs | None:
    """The record of the call these values were made in: the one their tags carry where it is
    its head's last on this thread, else None (and None where two heads' last records meet: a
    forward nested in another's would be guessed at)."""
    found = {id(r): r for r in (getattr(v, TAG, None) for v in values)
             if r is not None and r is r.head.last()}
    return next(iter(found.values())) if len(found) == 1 else None


class RelayedExecutor(GuardedExecutor):
    """The graph that runs a broken forward's blocks to its return, cached as a whole forward is:
    its latent, timestep and text are the ones the forward's first graph recorded, placed in three
    slots past the graph's own. The graph inputs at ``carriers`` are looked at for the record.
    ``text``: this graph's own input of the text, by name, where it takes one: the text where the
    first graph took none (a forward that reads it only after the break), so that a prompt
    changed mid-generation is still seen. ``out_shapes``: this graph's outputs' (the forward's),
    that a head's half-batch recipe is fitted to."""

    def __init__(self, plan: Plan, fns: Sequence[Callable[..., Any]], *args: Any,
                 carriers: Sequence[int], text: int | None = None,
                 out_shapes: Sequence[tuple[Any, ...] | None] = (), **kwargs: Any):
        n = plan.n_slots
        self._local = threading.local()     # before the executor sets ``halves``
        super().__init__(plan, fns, *args, roles={"latent": n, "timestep": n + 1, "text": n + 2},
                         **kwargs)
        self.carriers = list(carriers)
        self.own_text = text
        self._out_shapes = list(out_shapes)
        self._fitted: dict[Head, HalfBatch | str | None] = {}
        self._reasons: set[str] = set()
        self._out_examples = [plan.slot_examples.get(s) for s in self.out_slots]
        self._checked = not self._keep_latent
        self._told = False
        self._no_text = torch.zeros(())     # a forward without text: one value, never batched

    def __call__(self, *args: Any) -> Any:
        record = received([args[i] for i in self.carriers])
        if record is None:
            if not self._told:
                self._told = True
                warnings.warn("mixcache: the graph holding the blocks of a forward broken into "
                              "graphs got no record of the call's inputs from the forward's first "
                              "graph (the code between the graphs made them anew, or kept them "
                              "from an earlier call); such calls run without caching",
                              stacklevel=2)
            return Executor.__call__(self, *args)
        record.head.taken = True
        self._take_halves(record)
        if not self._checked:
            check_residual_shapes(record.latent, self._out_examples)
            self._checked = True
        text = (record.text if record.text is not None else
                args[self.own_text] if self.own_text is not None else self._no_text)
        try:
            return self._call([*args, *self._pad, record.latent, record.timestep, text])
        finally:
            self.halves = None      # the call's head inputs: not kept past it

    @property
    def halves(self) -> "_Recorded | None":
        """This thread's call's half-batch forward: a call's own head inputs, never another's
        (threads that generate at once share this executor)."""
        return getattr(self._local, "halves", None)

    @halves.setter
    def halves(self, value: "_Recorded | None") -> None:
        self._local.halves = value

    def _take_halves(self, record: CallInputs) -> None:
        """The half-batch forward of this call's head, handed the head's inputs: the executor's
        own call passes this graph's, which are not the forward's arguments."""
        head = record.head
        if head not in self._fitted:
            fitted = self._fitted[head] = fit_to_tail(head.halves, self._out_shapes)
            if isinstance(fitted, str) and fitted not in self._reasons:
                # Said once (by the executor, at a batched-CFG call), not again for the head
                # that retraces the first graph after the break (backend: retraced once).
                self._reasons.add(fitted)
                self._no_halves = fitted
        fitted = self._fitted[head]
        self.halves = (_Recorded(fitted, record.args) if isinstance(fitted, HalfBatch)
                       else None)


def fit_to_tail(recipe: HalfBatch | str | None,
                out_shapes: Sequence[tuple[Any, ...] | None]) -> HalfBatch | str | None:
    """A head's half-batch recipe fitted to the outputs of the graph holding the blocks, which
    are the forward's (``out_shapes``); a reason or None passed on as it is."""
    if not isinstance(recipe, HalfBatch):
        return recipe
    # Under dynamic shapes that graph's batch is a size of its own inputs, not the head's
    # latent's: a dim 0 of unknown size is taken for the batch here, and the half's outputs are
    # checked against it as they come (HalfBatch.__call__).
    return recipe.for_outputs([sh if not sh or sh[0] is not None else (recipe.batch, *sh[1:])
                               for sh in out_shapes])


@dataclass
class _Recorded:
    """A head's half-batch forward bound to one call's head inputs (the recipe reads them)."""
    recipe: HalfBatch
    args: tuple[Any, ...]

    def __call__(self, env: Sequence[Any], k: int) -> list[torch.Tensor] | None:
        return self.recipe(self.args, k)

    @property
    def conditional_first(self) -> bool:
        return self.recipe.conditional_first
