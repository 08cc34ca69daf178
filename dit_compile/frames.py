"""What Dynamo is tracing, read off the Python frames, and the warnings that name it.

The backend sees one graph at a time; which model it belongs to, what arguments the traced forward
got, and whether the graph is the whole forward or one fragment of a broken one are only on the
stack. Warnings that name the model are said once per model (in the model's own notes:
state lives with the model, never in a module global). What the backend does before a trace, as a
mixcache compile starts (layerwise casting made traceable, MoE dispatches lowered, stamped blocks
restamped), also reads the stack (which backend and options, which model): Dynamo's
start-of-compile callback is the only hook it has there.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import sys
import warnings
import weakref
from types import FrameType
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .notes import notes
from .options import Options
from .passes.casting import find_casts, functional_casting
from .passes.moe import find_moe, lower_moe
from .passes.regions import NoBlockStructure
from .passes.stamping import restamp

log = logging.getLogger("dit_compile")


def _current_tx() -> Any:
    """Dynamo's translator of the frame it is tracing right now; None outside a trace."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        return InstructionTranslator.current_tx()
    except Exception:  # outside a trace, or Dynamo internals moved
        return None


def traced_module() -> torch.nn.Module | None:
    """The nn.Module whose forward Dynamo is tracing right now, if any."""
    tx = _current_tx()
    if tx is None:
        return None
    frame = tx.f_locals
    # A diffusers forward is traced with its module as `self`; a plain nn.Module through a
    # wrapper that holds it as `fn`.
    for key in ("self", "fn"):
        if isinstance(frame.get(key), torch.nn.Module):
            return frame[key]
    return None


def traced_locals() -> dict[str, Any] | None:
    """The locals of the frame Dynamo is tracing, as they were on entry: the forward's arguments
    of the first call (or the arguments of the decorator that wraps the forward)."""
    tx = _current_tx()
    return None if tx is None else dict(tx.f_locals)


def _frame_owners(start: int = 1, depth: int | None = None) -> Iterator[tuple[FrameType, Any]]:
    """Each frame up the Python stack, from ``start`` frames above the caller's own (1: the frame
    that called the caller) on, ``depth`` frames at most, with its ``self``: None where the frame's
    code has no local of that name. The first frame is taken at this call, not at the first
    ``next``."""
    return _owners_from(sys._getframe(start + 1), depth)


def _owners_from(frame: FrameType | None, depth: int | None) -> Iterator[tuple[FrameType, Any]]:
    while frame is not None and (depth is None or depth > 0):
        yield frame, frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        frame = frame.f_back
        if depth is not None:
            depth -= 1


def compiled_model() -> torch.nn.Module | None:
    """The model torch.compile was called on, found on the Python stack: the outermost
    ``OptimizedModule`` (its ``_orig_mod``) or module compiled in place (``model.compile()``).
    Dynamo's own frame is no guide after a graph break: it may be a submodule's or a helper's."""
    from torch._dynamo.eval_frame import OptimizedModule
    found = None
    for _, owner in _frame_owners():
        if isinstance(owner, OptimizedModule):
            found = owner._orig_mod
            while isinstance(found, OptimizedModule):   # torch.compile of a compiled model
                found = found._orig_mod
        elif (isinstance(owner, torch.nn.Module)
              and getattr(owner, "_compiled_call_impl", None) is not None):
            found = owner
    return found


def install_trace_hook() -> None:
    """Have Dynamo call ``lower_before_trace`` as each compile starts. Said again at every
    mixcache compile: ``torch._dynamo.reset()`` drops Dynamo's callbacks, and this is the only hook
    a backend has that runs before the trace (torch.compile hands a named backend nothing else)."""
    handler = torch._dynamo.callback_handler
    if lower_before_trace not in getattr(handler, "start_callbacks", (lower_before_trace,)):
        handler.register_start_callback(lower_before_trace)


def lower_before_trace(_: Any = None) -> None:
    """Dynamo's start-of-compile callback: where mixcache compiles a model whose forward would
    break at every layer diffusers' layerwise casting hooks, or at MoE dispatches that sync to the
    host (HiDream's, NucleusMoE's), rewrite those in place before Dynamo traces it, so the trace is
    whole from the first call and ``fullgraph=True`` works. ``lower_moe=False`` leaves the MoE
    dispatches as they are; the casting's rewrite changes no result (``passes.casting``). Blocks
    stamped by ``nest_blocks(model, stamp=True)`` are restamped after both rewrites, which change
    what the blocks hold (``passes.stamping.restamp``). Any other
    backend's compile, and a model that is not on the stack (a compiled function that calls it),
    are left to the backend (``lower_moe_and_retrace``, ``retrace_once_after_break``). Never fails
    a compile."""
    try:
        options = mixcache_options()
        model = None if options is None else compiled_model()
        if model is None:
            return
        functional_casting(model)
        pending, left = _lower_moe(model, options)
        restamp(model)      # after the rewrites above: they change what the blocks hold
        if not pending:
            return
    except Exception as why:  # a bad option or Dynamo internals moved: the backend's path remains
        log.debug("mixcache: lowering before the trace skipped: %s", why)
        return
    warnings.warn(f"mixcache: {type(model).__name__}: {len(pending)} MoE dispatch(es) "
                  f"({', '.join(pending[:3])}{', ...' if len(pending) > 3 else ''}) sync to the "
                  f"host and would break the graph: lowered {len(pending) - left} in place before "
                  "tracing, to one fused op (dit_compile::moe_ffn, as dit_compile.lower_moe does)"
                  + (f"; {left} could not be, as the warning before says, and break it" if left
                     else "")
                  + ". dit_compile.restore_moe(model) undoes it; options={'lower_moe': False} "
                  "leaves the model as it is", stacklevel=2)


def _lower_moe(model: torch.nn.Module, options: dict) -> tuple[list[str], int]:
    """The model's MoE dispatches lowered where the options allow: those lowered now, and how
    many of them could not be."""
    found = find_moe(model) if Options.parse(options).lower_moe else {}
    if not found:
        return [], 0
    pending = [p for p, done in found.items() if not done]
    # Those lowered already (by hand, or by an earlier compile) are brought up to date with
    # their experts, which may have changed since (layerwise casting enabled after lowering
    # left full-precision stacks; a wrapper or a hook added undoes the lowering, warning).
    lower_moe(model)
    return pending, sum(not done for done in find_moe(model).values()) if pending else 0


def mixcache_options() -> dict | None:
    """The options of the compile starting now, where its backend is mixcache; None for any other.
    Dynamo's frame converter, on the stack, holds the backend, inside Dynamo's wrappers and
    torch.compile's (which holds the options)."""
    for _, owner in _frame_owners():
        backend = getattr(owner, "_torchdynamo_orig_backend", None)
        if backend is not None:
            return _options_of(backend)
    return None


def compiled_options(model: Any) -> dict | None:
    """The options ``model`` was compiled with, where it is ``torch.compile(m, backend="mixcache",
    ...)``; None for any other backend, or a model not compiled. A wrapper of a module compiled
    in place (``m.compile(...)``) runs that compile, not its own: its options are the ones in
    effect."""
    inner = _innermost(model)
    if inner is not model and getattr(inner, "_compiled_call_impl", None) is not None:
        return _inplace_options(inner)
    return _wrapper_options(model)


def watch_wrappers(fn: Callable[..., Any], model: torch.nn.Module | None,
                   options: dict | None) -> Callable[..., Any]:
    """``fn``, the compiled graph of a module compiled in place (``model.compile(...)``),
    telling once per wrapper where ``torch.compile``'s wrapper of that module calls it with
    another backend or other options than ``options``: torch runs the in-place compile, and the
    wrapper's compile never happens (nor does its backend: only this graph's calls can say it,
    since Dynamo serves a wrapper made after the compile from its cache). A user who wrapped it
    with ``cache=None``, as a baseline, got the in-place compile's reuse, with no word of it.
    Any other model's graph is ``fn`` as it is."""
    if model is None or getattr(model, "_compiled_call_impl", None) is None:
        return fn
    held = weakref.ref(model)   # Dynamo keeps this graph past the model: never keep it alive

    def run(*args: Any) -> Any:
        model = held()
        if model is not None:
            _warn_unused_wrapper(model, options)
        return fn(*args)
    return run


def _warn_unused_wrapper(model: torch.nn.Module, options: dict | None, depth: int = 24) -> None:
    """The check of ``watch_wrappers``: a wrapper of ``model`` a few frames up (a stack walk of
    ``depth`` frames at most, a few microseconds a call)."""
    from torch._dynamo.eval_frame import OptimizedModule
    for _, owner in _frame_owners(2, depth):
        if isinstance(owner, OptimizedModule) and _innermost(owner) is model:
            break
    else:
        return
    noted = notes(owner)    # the wrapper's own, not the model's it hands attributes on to
    if noted.checked:
        return
    noted.checked = True      # once per wrapper, told or not
    theirs = _wrapper_options(owner)
    try:
        if theirs is not None and Options.parse(theirs) == Options.parse(options):
            return
    except Exception:   # never parsed: the wrapper's compile never ran
        pass
    unused = f"options {theirs!r} are" if theirs is not None else "backend is"
    warnings.warn(f"mixcache: {type(model).__name__} is compiled in place (model.compile(...)), "
                  "so torch.compile's wrapper of it runs that compile, not its own: the "
                  f"wrapper's {unused} not used, the in-place compile's options {options or {}} "
                  "are. Compile the model one way (call the model compiled in place, or wrap one "
                  "that is not)", stacklevel=4)


def _innermost(model: Any) -> Any:
    while hasattr(model, "_orig_mod"):      # torch.compile's wrappers, nested or not
        model = model._orig_mod
    return model


def _wrapper_options(model: Any) -> dict | None:
    callback = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    backend = getattr(callback, "_torchdynamo_orig_backend", None)
    return None if backend is None else _options_of(backend)


def _inplace_options(module: torch.nn.Module) -> dict | None:
    """The options of ``module.compile(backend="mixcache", ...)``: torch keeps its compile's
    context in the closure of the call it sets, ``_compiled_call_impl``."""
    for cell in getattr(module._compiled_call_impl, "__closure__", None) or ():
        contents = cell.cell_contents
        callback = getattr(contents, "callback", contents)
        backend = getattr(callback, "_torchdynamo_orig_backend", None)
        if backend is not None:
            return _options_of(backend)
    return None


def _options_of(backend: Any) -> dict | None:
    """The options of a Dynamo backend object where it wraps mixcache (Dynamo's wrappers, then
    torch.compile's, which holds the options); None for any other."""
    from .backend import mixcache
    for _ in range(8):
        if backend is mixcache:
            return {}
        if getattr(backend, "compiler_fn", None) is mixcache:
            options = (getattr(backend, "kwargs", None) or {}).get("options") or {}
            if dataclasses.is_dataclass(options):       # an Options, as torch.compile takes too
                return dataclasses.asdict(options)
            return dict(options)
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return None


def lower_moe_and_retrace(model: torch.nn.Module | None, enabled: bool) -> None:
    """Lower the MoE dispatches of the model being compiled, once, and have Dynamo trace its forward
    again.

    A dispatch that syncs to the host (HiDream's, NucleusMoE's) breaks the graph before any backend
    sees it: the graphs this backend gets can no longer be rewritten, but the model can
    (``passes.moe.lower_moe``, in place). Dynamo keeps what it made of the broken forward on the
    forward's code object: either the code marked to run eagerly (a break inside the block loop) or
    the graphs around the break. Clearing that code's cache, as ``torch._dynamo.reset()`` does for
    every code, makes the next call trace the lowered forward whole. This call runs as Dynamo
    arranged it: in fragments, with the dispatches it has not reached yet already lowered.
    """
    if model is None:
        return
    pending = [path for path, lowered in find_moe(model).items() if not lowered]
    if not pending or not _first_time(model, "moe_seen"):
        return
    name = f"mixcache: {type(model).__name__}: {len(pending)} MoE dispatch(es) " \
           f"({', '.join(pending[:3])}{', ...' if len(pending) > 3 else ''})"
    if not enabled or _reset_code() is None or _tracing(_forward_codes(model)):
        # _tracing: the forward itself is being compiled now, and Dynamo caches the result after
        # this backend returns, past any reset. No reset_code: lowering would never be traced.
        warnings.warn(f"{name} sync to the host and break the graph; call "
                      "dit_compile.lower_moe(model) before torch.compile to run them as one fused op "
                      "in one graph (it warns where it cannot)", stacklevel=3)
        return
    lowered = lower_moe(model)
    forget_forward(model)
    notes(model).retrace = True      # this call's other graphs: fragments of a forward now gone
    warnings.warn(f"{name} broke the graph: lowered {lowered} in place to one fused op "
                  "(dit_compile::moe_ffn, as dit_compile.lower_moe does). This first call runs in "
                  "fragments, the next ones as one graph. dit_compile.restore_moe(model) undoes it; "
                  "options={'lower_moe': False} leaves the model as it is", stacklevel=3)


def retrace_once_after_break(gm: fx.GraphModule, model: torch.nn.Module | None
                             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Have Dynamo trace the model's forward once more, the first time a graph break splits it.
    Returns what to wrap the graph's compiled callable in (as it is, but for the forward's first
    graph).

    Some breaks happen at the first call only: a table built lazily under a context manager Dynamo
    does not trace (Z-Image's rotary frequencies, made under ``torch.device("cpu")`` when first
    needed). The fragments Dynamo compiled around such a break guard nothing that changes after it,
    so they would serve every later call, and no call would be cached. Clearing what Dynamo holds
    for the forward's code makes the next call trace it again: whole, if the break is gone; if not,
    the same fragments, and this is not tried again for this model (the cost: one more trace; the
    fallback warning, said at the first fragment, says that this is tried).

    Done once per instance, not per class: instances share the forward's code and so Dynamo's
    graphs, and each new one breaks at its own first call (its table is not built yet). Its later
    fragments may then all come from Dynamo's cache, compiled for an instance before it, and reach
    no backend; only the forward's first graph, which the whole graph's guards send back to a
    trace, does. That graph is cached by Dynamo after this backend returns, past any reset now: it
    is forgotten as it first runs, just after (``_forget_at_first_run``)."""
    if model is None or _retrace_pending(model) or not is_fragment(gm) or _retraced(model):
        return _as_it_is
    if _tracing(_forward_codes(model)):
        return functools.partial(_forget_at_first_run, model=weakref.ref(model))
    _forget_once(model)
    return _as_it_is


def _as_it_is(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


def _forget_at_first_run(fn: Callable[..., Any], model: weakref.ref) -> Callable[..., Any]:
    """``fn``, the forward's first graph, forgetting the forward as it first runs: in the call
    that compiled it, once Dynamo has cached it. The frame running it holds its own code."""
    pending = True

    def run(*args: Any) -> Any:
        nonlocal pending
        if pending:
            pending = False
            owner = model()
            if owner is not None:
                _forget_once(owner)
        return fn(*args)
    return run


def _retraced(model: torch.nn.Module) -> bool:
    """Whether the model's one retrace is spent. A call that raised since gives it back: Dynamo
    gives up on each frame an exception leaves (a wrong input: a float timestep) and runs it
    eagerly from then on, the forward's among them, so the next good call's graphs would be
    fragments, though the forward itself does not break."""
    spent = notes(model).retraced
    return spent is not None and spent == _raised_calls()


def _raised_calls() -> int:
    """How many frames Dynamo has given up on because an exception left them (its counters)."""
    from torch._dynamo.utils import counters
    return sum(n for why, n in counters["unimplemented"].items()
               if str(why).startswith("Observed exception"))


def _forget_once(model: torch.nn.Module) -> None:
    if _retraced(model):
        return
    notes(model).retraced = _raised_calls()
    if forget_forward(model):
        log.info("mixcache: %s: a graph break split the forward; tracing it again at the next "
                 "call", type(model).__name__)


def forget_forward(model: torch.nn.Module, resumes: bool = False) -> bool:
    """Drop what Dynamo holds for the model's forward (its code and the decorators around it):
    compiled graphs, and the mark that makes it run a forward it gave up on eagerly. The next call
    traces it afresh. ``resumes``: the same for the code Dynamo made to resume the forward after
    its breaks (a resume it gave up on, HunyuanVideo 1.5's, is marked to run eagerly; otherwise
    each keeps its graphs, which a trace of the forward alone calls again). False where Dynamo's
    internals moved and nothing was dropped."""
    reset_code = _reset_code()
    if reset_code is None:
        return False
    codes = _forward_codes(model)
    for code in codes + (_resumes_of(codes) if resumes else []):
        reset_code(code)
    return True


def _resumes_of(codes: list) -> list:
    """The code Dynamo generated to resume ``codes`` after graph breaks, and to resume those."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache
    except ImportError:
        return []
    found, todo = [], list(codes)
    while todo:
        for made in (ContinueExecutionCache.cache.get(todo.pop()) or {}).values():
            if not _one_of(made, found):
                found.append(made)
                todo.append(made)
    return found


@contextlib.contextmanager
def forward_forgotten(model: torch.nn.Module) -> Iterator[None]:
    """Drop the graphs of a trace of one's own (explain's, export's) from the model's forward code
    when done, and nothing else of Dynamo's. Each compiles with a backend of its own, and Dynamo
    keeps every one's graphs on the code: eight explains reached its recompile limit, after which
    a compile with fullgraph=True failed outright."""
    try:
        yield
    finally:
        forget_forward(model, resumes=True)


class _OwnBackend:
    """A backend of a trace of one's own, a shell around the recorder: torch keeps every backend
    it is given until ``torch._dynamo.reset()`` (``cached_backends``), and a recorder holds the
    traced model's graphs and weights (a deleted model stayed alive, one more per explain)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn: Callable[..., Any] | None = fn

    def __call__(self, gm: fx.GraphModule, inputs: list[Any], **kwargs: Any) -> Any:
        return self.fn(gm, inputs, **kwargs)


@contextlib.contextmanager
def own_backends() -> Iterator[Callable[[Callable[..., Any]], _OwnBackend]]:
    """``backend(fn)`` makes a backend running ``fn``, emptied when the block ends."""
    made: list[_OwnBackend] = []
    try:
        yield lambda fn: made.append(_OwnBackend(fn)) or made[-1]
    finally:
        for b in made:
            b.fn = None


@contextlib.contextmanager
def recompiles_allowed() -> Iterator[None]:
    """A trace of one's own under Dynamo's defaults for recompiles: it is one of the forward's
    code (whose earlier graphs it sets aside), and ``error_on_recompile`` or
    ``set_stance("fail_on_recompile")``, set for the user's compiled calls, raised at it."""
    with torch.compiler.set_stance("default"), torch._dynamo.config.patch(error_on_recompile=False):
        yield


@contextlib.contextmanager
def shape_history_kept() -> Iterator[None]:
    """A trace of one's own that neither learns from nor teaches Dynamo's shape history. Dynamo
    remembers each code object's shapes across torch.compile calls (its automatic-dynamic state):
    a later compile at another size would otherwise get a dynamic-shape graph (explain and export
    must not change what compiles), and the trace itself, after the model ran at two sizes, would
    be one of symbolic sizes (explain reported a stream of 's22*((s18//2))*((s42//2))' tokens for
    a model compiled with dynamic=False). Traced as a first compile is, at the call's sizes."""
    try:
        from torch._dynamo import pgo
        saved = copy.deepcopy(pgo.get_code_state())
        pgo.get_code_state().clear()
    except Exception:  # a torch without this state has nothing to undo
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            state = pgo.get_code_state()    # looked up again: a reset during the trace replaces it
            state.clear()
            state.update(saved)


def _reset_code() -> Any:
    try:
        from torch._dynamo.eval_frame import reset_code
        return reset_code
    except ImportError:
        return None


def is_fragment(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is one of several graphs that graph breaks made of the model's forward."""
    return _is_fragment(gm, compiled_model() or traced_module())


def warn_fallback(gm: fx.GraphModule, why: NoBlockStructure | None, config: Any = None) -> None:
    """Say once per model and configuration why it compiles without caching: graph breaks where
    this graph is one fragment of the forward (the region pass's own reason, or the inputs a
    fragment lacks, would name the fragment and mislead), else what the region pass found
    missing. ``why`` None: the region pass found blocks, in a fragment. Nothing is said of a
    graph of code the model runs around its forward (``_around_forward``): that one runs as it
    is, and the forward's own graphs say for themselves."""
    root = compiled_model() or traced_module()
    if root is None and _pipeline_code():
        return
    if root is not None and _stance_delays(_forward_codes(root)):
        return
    fragment = why is None or _is_fragment(gm, root)
    if fragment and why is not None and _between_forward_graphs(root):
        return
    if not fragment and _around_forward(gm, root):
        log.info("mixcache: %s: a graph of %s, outside the model's forward (a hook's?), runs as "
                 "it is", type(root).__name__, _current_tx().f_code.co_name)
        return
    if fragment and isinstance(config, dict) and "cache" in config and config["cache"] is None:
        return      # caching was not asked for, and each graph is compiled by regions as it is
    if _retrace_pending(root) or not _first_time(root, "fallback_warned", config):
        return
    name = type(root).__name__ if root is not None else "the traced function"
    if fragment:
        reason = ("graph breaks split its forward into several graphs, and mixcache needs the whole "
                  "forward in one graph to cache it (torch.compile(..., fullgraph=True) captures the "
                  "data-dependent operators that break a trace otherwise, .item(), nonzero, a "
                  "boolean mask's index, and raises at any other break; without it, "
                  "torch._dynamo.config.capture_scalar_outputs and "
                  "capture_dynamic_output_shape_ops capture them, and a forward then broken "
                  "only before its blocks is cached; dit_compile.explain(model, *inputs) says "
                  "which, with Dynamo's hints, TORCH_LOGS=graph_breaks lists them all)")
        if root is not None and not _retraced(root):
            reason += ("; the forward is traced once more at its next call, in case the break is "
                       "the first call's alone (a table built lazily), and cached from there if so")
        hooks = breaking_hooks(root)
        if hooks:
            reason += f"; {hooks}"
        if diffusers_caches(root):
            # diffusers' cache hooks keep Python state per call: the likeliest break, and a second
            # cache on top of the one this backend is for.
            reason += "; " + diffusers_caches_said(name)
    else:
        reason = str(why)
    eager = isinstance(config, dict) and config.get("regions") == "eager"
    which = "each graph" if fragment else "this graph"   # one graph of a whole forward: the others cache
    how = (f"Running {which} as it is (regions='eager')" if eager else
           f"Compiling {which} with Inductor (by regions where it holds a block stack)")
    warnings.warn(f"mixcache: {name}: {reason}. {how}, without caching.", stacklevel=3)


def _pipeline_code() -> bool:
    """Whether Dynamo is tracing diffusers' code outside its models (a pipeline's, a scheduler's,
    a utility's): the user compiled
    the pipeline (``torch.compile(pipe)``), whose transformer's forward Dynamo traces in frames of
    its own, cached as usual. The code around it is no model's: said once, not as a model that
    falls back."""
    tx = _current_tx()
    path = tx.f_code.co_filename.replace("\\", "/") if tx is not None else ""
    if "/diffusers/" not in path or "/diffusers/models/" in path or "/diffusers/hooks/" in path:
        return False
    owner = getattr(tx, "f_locals", {}).get("self")
    if owner is None or _first_time(owner, "pipeline_told"):
        warnings.warn("mixcache: torch.compile was given a diffusers pipeline's code (its "
                      "sampler, its scheduler's step): its graphs around the "
                      "transformer run as Inductor compiles them, uncached; the transformer's "
                      "own forward is cached as usual. Compiling the transformer alone "
                      "(pipe.transformer = torch.compile(pipe.transformer, backend='mixcache')) "
                      "leaves the pipeline's Python as it is", stacklevel=4)
    return True


def _around_forward(gm: fx.GraphModule, root: torch.nn.Module | None) -> bool:
    """Whether ``gm`` is a graph of code the model runs around its forward, not of the forward:
    a hook added after torch.compile, which ``Module.__call__`` runs in a frame of its own that
    Dynamo compiles apart (a forward hook that scales the output is one op). Dynamo traces a frame
    that is none of the forward's (nor of a wrapper set around it before the compile), and the
    graph takes none of the model's parameters: it holds no block, and the model's own graph is
    cached as usual."""
    tx = _current_tx()
    if root is None or tx is None or _one_of(tx.f_code, _forward_codes(root)):
        return False
    if _resumes_around_forward(tx.f_code, root):
        return False
    return not any(isinstance(getattr(n.meta.get("grapharg"), "example", None), torch.nn.Parameter)
                   for n in gm.graph.find_nodes(op="placeholder"))


def stored_tensors() -> list[str]:
    """Where the frame Dynamo is compiling stores tensors the graph computes into objects that
    outlive the call, besides returning them: an attribute of an existing object (a module's
    ``self.last = x``), a registered buffer reassigned (``self.calls = self.calls + 1``). Those
    are graph outputs the bytecode stores after the call; a reused call would store the cached
    ones (a counter went backwards, a cfg reuse stored branch 0's value plus a difference). Empty
    where Dynamo's bookkeeping cannot be read (its internals moved)."""
    tx = _current_tx()
    try:
        from torch._dynamo.variables import ConstDictVariable, TensorVariable
        from torch._dynamo.variables.base import AttributeMutationExisting
        effects = tx.output.side_effects

        def computed(v: Any) -> bool:
            return isinstance(v, TensorVariable) and v.as_proxy().node.op != "placeholder"
        stores = [f"{type(getattr(var, 'value', var)).__name__}.{name}"
                  for var, attrs in effects.store_attr_mutations.items()
                  if isinstance(getattr(var, "mutation_type", None), AttributeMutationExisting)
                  for name, v in attrs.items() if computed(v)]
        stores += [_source_name(var.source) for var in effects.id_to_variable.values()
                   if isinstance(var, ConstDictVariable) and effects.is_modified(var)
                   and any(computed(v) for v in var.items.values())]
    except Exception:  # noqa: BLE001 - Dynamo's internals moved: nothing known
        return []
    return stores


def _source_name(source: Any) -> str:
    if source is None:
        return "a dict"
    name = source.name      # a method on torch 2.11, a property on 2.13
    return (name() if callable(name) else name).replace("L['self']", "self")


# diffusers' cache hooks, by the module defining them: each reuses results across calls by Python
# state of its own, which a second cache on the same forward would defeat.
_CACHE_HOOKS = frozenset(f"diffusers.hooks.{m}" for m in (
    "pyramid_attention_broadcast", "faster_cache", "first_block_cache", "mag_cache",
    "taylorseer_cache", "sea_cache"))


def diffusers_caches(model: torch.nn.Module | None) -> bool:
    """Whether diffusers' own cache hooks are on ``model``: by ``enable_cache``, or put on its
    layers by the ``apply_*`` functions (``apply_pyramid_attention_broadcast``: the only way for a
    model without ``enable_cache``, PixArt's), which ``is_cache_enabled`` does not see."""
    if model is None:
        return False
    if getattr(model, "is_cache_enabled", False):
        return True
    return any(type(hook).__module__ in _CACHE_HOOKS
               for m in model.modules()
               for hook in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).values())


def diffusers_caches_said(name: str | None = None) -> str:
    """What the backend's warnings and explain say where ``diffusers_caches``: the hooks and the
    fix (``name``: the model's class, for ``<name>.disable_cache()``)."""
    return ("diffusers' own cache hooks are on (enable_cache, or an apply_* function such as "
            "apply_pyramid_attention_broadcast): two caches on one forward would reuse each "
            f"other's results. Remove them ({name + '.' if name else ''}disable_cache()) before "
            "torch.compile to let mixcache cache (after a call with them, torch._dynamo.reset() "
            "too: the graphs traced with them stay valid without them)")


def breaking_hooks(model: torch.nn.Module | None) -> str | None:
    """Why diffusers' hooks on ``model``'s layers break every trace of its forward, or None.
    Layerwise casting (``enable_layerwise_casting``) casts each layer with ``Module.to`` at every
    call, which makes new ``torch.nn.Parameter`` objects, which Dynamo cannot trace: the forward
    breaks at every layer it casts, unless ``passes.casting`` has given its hooks their traceable
    path, as a mixcache compile of the model itself does as it starts."""
    if model is None:
        return None
    def hooked(name: str) -> int:
        return sum(1 for m in model.modules()
                   if getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).get(name))
    casts = sum(not traced for traced in find_casts(model).values())
    groups = hooked("group_offloading")
    if casts:
        return (f"diffusers' layerwise casting is on ({casts} layers: enable_layerwise_casting), "
                "whose hook casts each layer with Module.to at every call, making new "
                "torch.nn.Parameters, which Dynamo cannot trace. mixcache traces them as casts of "
                "the weights as a compile of the model itself starts (after torch._dynamo.reset(), "
                "from the model's next call); a compiled function that calls the model breaks at "
                "each: compile the model itself (torch.compile(transformer, backend='mixcache'))")
    if groups:
        # Group offloading moves weights in hooks that diffusers keeps out of the graph on purpose
        # (torch.compiler.disable), at every group: no trace can hold the forward whole.
        return (f"diffusers' group offloading is on ({groups} modules: enable_group_offload), whose "
                "hooks move each group's weights outside the graph, breaking the forward at every "
                "group: offload the whole model instead (pipe.enable_model_cpu_offload(), after "
                "torch.compile) to let mixcache cache")
    return None


def _is_fragment(gm: fx.GraphModule, root: torch.nn.Module | None) -> bool:
    """Whether this graph is only part of the model's forward: it ends at a graph break, resumes
    after one, or comes from a frame the forward calls while itself running eagerly (Dynamo gives
    up tracing a forward that breaks inside a loop, and compiles each submodule, helper or method
    it calls apart). Not a graph of a hook's frame (``_around_forward``), even one that breaks
    (a hook reading the timestep on the host): counted as the forward's, it spent the forward's
    one retrace before the forward had traced, and warned of a fallback that never happened."""
    if root is not None and _stance_delays(_forward_codes(root)):
        return False
    tx = _current_tx()
    if (root is not None and tx is not None and _around_forward(gm, root)
            and not any(_resumes(tx.f_code, code) for code in _forward_codes(root))
            and not _forward_runs_eagerly(root)):   # else a frame the forward calls, a fragment
        return False
    if _ends_at_break(gm):
        return True
    if tx is None:
        return False
    code = tx.f_code
    if code.co_name.startswith("torch_dynamo_resume_in"):
        return root is None or not _resumes_around_forward(code, root)
    return root is not None and _forward_runs_eagerly(root)


def _ends_at_break(gm: fx.GraphModule) -> bool:
    return bool(getattr(getattr(gm, "compile_subgraph_reason", None), "graph_break", False))


def forward_head(gm: fx.GraphModule, model: torch.nn.Module | None) -> bool:
    """Whether ``gm`` is the first graph of ``model``'s forward, cut off by a graph break: Dynamo
    is tracing the forward's own code (or the decorator around it), which a frame starts at its
    first line, so the graph's inputs are the call's own arguments."""
    tx = _current_tx()
    return (model is not None and tx is not None and _ends_at_break(gm)
            and _one_of(tx.f_code, _forward_codes(model)))


def forward_tail(gm: fx.GraphModule, model: torch.nn.Module | None) -> bool:
    """Whether ``gm`` runs ``model``'s forward from a graph break to its return: Dynamo's resume
    of the forward's code (``torch_dynamo_resume_in_forward_at_<line>``, a line of the forward
    itself: a submodule's ``forward`` in the same file resumes under the same name), traced to
    its end. Its outputs are then the forward's."""
    tx = _current_tx()
    if model is None or tx is None or _ends_at_break(gm):
        return False
    return any(_resumes(tx.f_code, code) for code in _forward_codes(model))


def _resumes(code: Any, forward: Any) -> bool:
    prefix = f"torch_dynamo_resume_in_{forward.co_name}_at_"
    if code.co_filename != forward.co_filename or not code.co_name.startswith(prefix):
        return False
    line = code.co_name[len(prefix):]
    lines = [n for _, _, n in forward.co_lines() if n is not None]
    return line.isdigit() and min(lines) <= int(line) <= max(lines)


def in_forward_wrapper(model: torch.nn.Module | None) -> bool:
    """Whether Dynamo is tracing the rest of a wrapper around ``model``'s forward (an offload hook
    added before torch.compile), not the forward itself: see ``_resumes_around_forward``."""
    tx = _current_tx()
    return tx is not None and model is not None and _resumes_around_forward(tx.f_code, model)


def _resumes_around_forward(code: Any, model: torch.nn.Module) -> bool:
    """Whether ``code`` is Dynamo's resume of a wrapper set on the model instance around its whole
    forward, past a call it could not trace: accelerate's offload hook (what diffusers'
    ``enable_model_cpu_offload`` adds) makes ``model.forward`` a ``partial`` of its ``new_forward``,
    whose ``pre_forward`` runs outside the graph (``torch.compiler.disable``). The rest of the
    wrapper, the forward in full, is then one graph, and its inputs are the forward's arguments.

    Only for a graph that does not itself end at a break (checked by the caller) and with Dynamo's
    nested graph breaks off: a break inside the forward then breaks the wrapper at its call to the
    forward, so a resume of the wrapper never starts inside the forward."""
    if getattr(torch._dynamo.config, "nested_graph_breaks", False):
        return False
    wrapper = model.__dict__.get("forward")         # an instance's own forward: a hook's
    inner = getattr(getattr(wrapper, "func", wrapper), "__code__", None)
    return (inner is not None and not _one_of(inner, _forward_codes(model))
            and code.co_filename == inner.co_filename
            and code.co_name.startswith(f"torch_dynamo_resume_in_{inner.co_name}_at_"))


def _between_forward_graphs(model: torch.nn.Module | None) -> bool:
    """Whether Dynamo is tracing a frame that the model's forward calls between two of its own
    graphs (OmniGen's and Lumina 2's rotary modules, whose breaks cut the forward there): the
    nearest frame of the model's forward (or of a resume of it) on the stack runs the code Dynamo
    made of it, not the forward as written (as a forward Dynamo gave up on does, or a resume of it
    with a break in a loop, HunyuanVideo 1.5's). Whether the blocks are cached is then the
    forward's own graphs' to say (runtime.relay caches the last one)."""
    tx = _current_tx()
    if model is None or tx is None:
        return False
    codes = _forward_codes(model)
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if ((code.co_name in {c.co_name for c in codes}
             or code.co_name.startswith("torch_dynamo_resume_in_"))
                and frame.f_locals.get("self") is model):
            # Dynamo's code calls the graphs it compiled and the resumes it made.
            return any(n.startswith(("__compiled_fn", "__resume_at")) for n in code.co_names)
        frame = frame.f_back
    return False


def _forward_runs_eagerly(model: torch.nn.Module) -> bool:
    """The model's forward (or a decorator around it, such as diffusers' ``apply_lora_scale``) is
    on the Python stack with its own code: Dynamo left it to the interpreter. The frame being
    compiled is not on the stack yet, and a forward that Dynamo did transform runs other code."""
    codes = _forward_codes(model)
    frame = sys._getframe(1)
    while frame is not None:
        if _one_of(frame.f_code, codes) and frame.f_locals.get("self") is model:
            return True
        frame = frame.f_back
    return False


def _stance_delays(codes: list) -> bool:
    """Whether Dynamo's stance runs these codes' frame eagerly, not yet having seen it twice: a
    forward's first call under ``set_stance("eager_then_compile")``, which compiles the frames it
    calls from their second call (a block's, at the second block). Their graphs are no fragments
    of a broken forward, and have nothing to cache: the forward's own graph, traced at its
    second call, does."""
    from torch._dynamo import eval_frame
    if eval_frame._stance.stance not in ("eager_then_compile", "aot_eager_then_compile"):
        return False
    return all(len(eval_frame.get_example_inputs(f"{c.co_filename}{c.co_firstlineno}")) < 2
               for c in codes)


def _one_of(code: Any, codes: list) -> bool:
    """By identity: a code object hashes its constants, and the code Dynamo makes of a frame may
    hold a slice among them, which does not hash."""
    return any(code is c for c in codes)


def _forward_codes(model: torch.nn.Module) -> list:
    """The code of the model's forward and of the decorators around it (diffusers'
    ``apply_lora_scale``): whichever of them Dynamo saw first holds what it made of the forward."""
    codes = []
    fn = getattr(type(model).forward, "__func__", type(model).forward)
    while hasattr(fn, "__code__"):
        codes.append(fn.__code__)
        fn = getattr(fn, "__wrapped__", None)
    return codes


def _tracing(codes: list) -> bool:
    """Whether Dynamo is compiling one of ``codes`` right now."""
    tx = _current_tx()
    return tx is not None and _one_of(tx.f_code, codes)


def _retrace_pending(model: torch.nn.Module | None) -> bool:
    """Whether ``model``'s MoE was lowered during this call (``lower_moe_and_retrace``): its graphs
    are fragments of a forward that the next call traces again, so no fallback to warn of yet. The
    next trace of the forward itself ends the wait."""
    if model is None or not notes(model).retrace:
        return False
    if not _tracing(_forward_codes(model)):
        return True
    notes(model).retrace = False
    return False


def _first_time(model: Any, said: str, config: Any = None) -> bool:
    """True the first time ``said`` (a field of ``Notes``) is asked of ``model`` for ``config``
    (always, with no model to hold it): every graph-break fragment and every recompile reaches the
    backend, the user needs to hear it once, and again if the model is compiled anew with other
    options."""
    if model is None:
        return True
    noted, key = notes(model), repr(config)
    if getattr(noted, said) == key:
        return False
    setattr(noted, said, key)
    return True


def model_name() -> str:
    mod = compiled_model() or traced_module()
    return type(mod).__name__ if mod is not None else "the traced function"
