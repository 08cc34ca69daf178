"""What the backend notes on a model between its compiles: one ``Notes`` per object, ``notes(obj)``.

State lives with the model, never in a module global: Wan 2.2's two experts each keep their own,
and a model's notes go when it does. The object is mostly a model (the compiled one, or the one
Dynamo is tracing); two notes are of others, each its own: torch.compile's wrapper of a model
compiled in place (``checked``), and a pipeline whose code Dynamo traces (``pipeline_told``).

Held in the object's ``__dict__`` under ``ATTR`` and read from there, not through ``getattr``:
``nn.Module.__setattr__`` never sees it (not a submodule, parameter or buffer: no ``state_dict``
entry), and torch.compile's wrapper, which hands a missing attribute on to the model it wraps,
keeps notes of its own. A copy of the object (``copy.deepcopy``, pickling) copies them, but for
the background pieces (none: see ``runtime.background._Pieces``). No guard of Dynamo's reads them
(the forward never does): most are written while a compile traces, and a write later, or the
object made after a compile, costs no recompile.

The cache state is not here: it hangs on the model's parameters (``runtime.cache.StateFactory``),
the one handle on the instance that a graph's executor, shared by a class's instances, is given.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

ATTR = "_dit_compile_notes"


@dataclass
class Notes:
    """The backend's notes on one object; each field's default: nothing noted yet."""

    # What nest_blocks(model, stamp=...) asked: True stamps each stack's later blocks
    # (passes.stamping), False nests them only; None: never nested, or unnested since.
    stamp: bool | None = None
    # A graph of the forward cut before its blocks records each call's inputs (runtime.relay's
    # Head): a later graph that holds the blocks may take the record.
    head: bool = False
    # That later graph was compiled uncached, and said why: the records go untaken for that
    # reason, which the head then does not say again.
    uncached_tail: bool = False
    # The most blocks a graph of the model held: a graph of fewer (a guider's hook that skips some)
    # that the cache option's blocks do not fit runs uncached, with a warning, not an error.
    blocks: int = 0
    # The MoE dispatches were lowered during this call (frames.lower_moe_and_retrace): its other
    # graphs are fragments of a forward now gone. The next trace of the forward itself ends it.
    retrace: bool = False
    # The one retrace after a graph break is spent (frames.retrace_once_after_break): Dynamo's
    # count of frames an exception left, then; a call that raised since gives the retrace back.
    retraced: int | None = None
    # Said once per configuration (frames._first_time): the configuration's repr, where said.
    moe_seen: str | None = None             # MoE dispatches that broke the graph
    fallback_warned: str | None = None      # the model compiles without caching, and why
    pipeline_told: str | None = None        # on a pipeline: its own code is compiled, uncached
    # On torch.compile's wrapper of a model compiled in place: its options were checked against
    # the in-place compile's (frames.watch_wrappers), once per wrapper, told or not.
    checked: bool = False
    # Pieces compiling in the background (runtime.background.register), held weakly, for
    # dit_compile.wait_for_compiles; None: none was ever registered.
    background: weakref.WeakSet | None = None


def notes(obj: Any) -> Notes:
    """``obj``'s notes, made at the first ask."""
    held = obj.__dict__.get(ATTR)
    if held is None:
        held = obj.__dict__[ATTR] = Notes()
    return held
