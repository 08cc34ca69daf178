"""``backend="mixcache"``: the torch.compile backend, one linear pipeline of named passes."""
from __future__ import annotations

import functools
import logging
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from .flops import piece_flops, sized_flops
from .frames import (compiled_model, diffusers_caches, diffusers_caches_said, forward_tail,
                     install_trace_hook, is_fragment, lower_moe_and_retrace, model_name,
                     retrace_once_after_break, stored_tensors, traced_module, warn_fallback,
                     watch_wrappers)
from .inductor import compile_graph, compile_pieces, records_autograd
from .notes import notes
from .options import Options, inductor_config
from .passes.inputs import missing_inputs, named_inputs
from .passes.mutation import writes_inputs
from .passes.regions import (NoBlockStructure, RegionMap, check_whole_stacks, find_regions,
                             outside_model)
from .passes.split import Plan, split
from .passes.stamping import stamp_blocks
from .runtime import background
from .runtime.cache import StateFactory
from .runtime.executor import Executor, GuardedExecutor
from .runtime.policy import PolicyError, make_policy
from .runtime.relay import Head, RelayedExecutor
from .slots import (anchor_slot, carriers, computed_outputs, half_batch, head_slots, modulation_of,
                    named_slot, output_shapes, parameter_slots)

# Compile-time breakdown at INFO (`logging.getLogger("dit_compile").setLevel(logging.INFO)`): a
# first generation's cost is Dynamo's trace plus these compiles, and only the backend sees them.
log = logging.getLogger("dit_compile")


def mixcache(gm: fx.GraphModule, example_inputs: list[Any], *, options: dict | None = None,
             mode: str | None = None) -> Callable[..., Any]:
    """Compile one Dynamo graph of a DiT forward into regions stitched by the runtime."""
    opts = Options.parse(options)
    # 0. lowering: layerwise casting and MoE dispatches are made traceable as a compile starts
    #    (install_trace_hook); an MoE dispatch that broke this trace anyway (a model not on the
    #    stack) is lowered now, and the next trace is whole. Any other break: traced once more at
    #    the next call (a first call's lazy init), once per instance.
    install_trace_hook()
    #    Blocks Dynamo did not trace (nest_blocks(model, stamp=True)) become the first's nodes.
    stamp_blocks(gm)
    model = compiled_model() or traced_module()
    lower_moe_and_retrace(model, opts.lower_moe)
    retraced = retrace_once_after_break(gm, model)
    #    A wrapper of a model compiled in place runs this compile, not its own: said, where so.
    return watch_wrappers(retraced(_compile(gm, example_inputs, opts, options, mode, model)),
                          model, options)


def _compile(gm: fx.GraphModule, example_inputs: list[Any], opts: Options, options: dict | None,
             mode: str | None, model: torch.nn.Module | None) -> Callable[..., Any]:
    """One Dynamo graph of ``model``'s forward as the executor that runs it: regions found, split
    into pieces at their boundaries, each piece compiled, stitched under the cache policy. Where
    the graph has no block structure: compiled whole, said in a warning."""
    start = time.perf_counter()
    inductor = inductor_config(mode or opts.mode)
    #    A forward cut by a graph break before its blocks: its first graph records the call's
    #    latent, timestep and text for the graph that runs the blocks (runtime.relay).
    head = head_slots(gm, model) if opts.cache is not None else None
    if head is not None:
        return _relay_head(gm, example_inputs, opts, inductor, model, head)

    # 1. regions: prologue, the blocks of each repeated stack, glue, epilogue.
    try:
        rmap = find_regions(gm)
        check_whole_stacks(rmap, model)
    except NoBlockStructure as why:
        warn_fallback(gm, why, options)
        if opts.regions == "eager":     # asked for no Inductor at all: the graph as it is
            return gm.forward
        return compile_graph(gm, example_inputs, inductor, opts, model)

    # 2. guards: split at the region boundaries into pieces over one value table.
    plan = split(gm, rmap)

    # 3. compile: each distinct piece once; identical blocks share the artifact.
    fns = _compile_pieces(plan, opts, inductor, example_inputs, model)
    log.info("mixcache: %s: %d pieces; backend %.2f s", model_name(), len(plan.pieces),
             time.perf_counter() - start)

    # 4. stitch: the executor runs the pieces, asking the policy at each guard point.
    return _stitch(gm, example_inputs, plan, fns, rmap, opts, options, inductor, model)


def _compile_pieces(plan: Plan, opts: Options, inductor: dict[str, Any], example_inputs: list[Any],
                    model: torch.nn.Module | None) -> list[Callable[..., Any]]:
    fns = compile_pieces(plan, opts, inductor, example_inputs)
    if model is not None:
        background.register(model, fns)     # for dit_compile.wait_for_compiles
    return fns


def _stitch(gm: fx.GraphModule, example_inputs: list[Any], plan: Plan,
            fns: list[Callable[..., Any]], rmap: RegionMap, opts: Options, options: dict | None,
            inductor: dict[str, Any], model: torch.nn.Module | None) -> Executor:
    """The executor of ``plan``'s compiled pieces: guarded by the cache option's policy, or, where
    none is asked for or no reuse rule can be trusted with this graph (said why), running them
    in turn."""
    policy = _policy(opts, rmap, model)
    if policy is None:
        return Executor(plan, fns)
    tail = forward_tail(gm, model) and notes(model).head
    if _uncacheable(gm, rmap, model, example_inputs, options, tail):
        if tail:    # said why here: the first graph, its record untaken, has nothing to add
            notes(model).uncached_tail = True
        return Executor(plan, fns)
    # Keyed by the configuration as given, not as resolved for this graph's blocks: a model's
    # graphs with fewer blocks (a guider's hook that skips one for its branch) share the state.
    state = StateFactory(opts.cache_memory, clone=bool(inductor.get("triton.cudagraphs")),
                         key=repr(make_policy(opts.cache, None)), timestep=opts.timestep)
    flops = piece_flops(plan, example_inputs)
    shared = dict(partners=parameter_slots(gm), sized=sized_flops(plan, example_inputs))
    modulation = modulation_of(plan, policy, model_name())
    if tail:    # the latent, timestep and text are the first graph's record (runtime.relay)
        return RelayedExecutor(plan, fns, policy, state, anchor_slot(gm), flops, None, modulation,
                               carriers=carriers(gm), text=named_slot(gm, "text"),
                               out_shapes=output_shapes(gm), **shared)
    halves = (half_batch(gm, example_inputs, rmap.inputs, _half_backend(opts), rmap.samples,
                         rmap.sample_outs)
              if getattr(policy, "reuses_cfg", False) else None)
    return GuardedExecutor(plan, fns, policy, state, anchor_slot(gm), flops, halves, modulation,
                           **shared)


def _relay_head(gm: fx.GraphModule, example_inputs: list[Any], opts: Options,
                inductor: dict[str, Any], model: torch.nn.Module,
                slots: tuple[int, int, int | None]) -> Head:
    """The first graph of a forward cut before its blocks (runtime.relay), recording each call's
    inputs at ``slots``: no blocks in it, so compiled whole, as a prologue is (``regions="blocks"``
    leaves it as it is). It holds the half-batch recipe: only its compile sees the forward's
    arguments."""
    notes(model).head = True     # a later graph of this forward may take the record
    halves = (half_batch(gm, example_inputs, named_inputs(gm), _half_backend(opts),
                         before_break=True)
              if getattr(make_policy(opts.cache, None), "reuses_cfg", False) else None)
    return Head(compile_graph(gm, example_inputs, inductor, opts, model)
                if opts.regions == "inductor" else gm.forward, slots, computed_outputs(gm),
                model_name(), halves, model)


def _policy(opts: Options, rmap: RegionMap, model: torch.nn.Module | None) -> Any:
    """The cache option's policy for this graph's blocks (those of the stacks the latent flows
    through); None where it asks for no reuse, or where its blocks do not fit a graph of fewer
    blocks than the model's (said in a warning)."""
    n_blocks = len(rmap.guarded)
    try:
        policy = make_policy(opts.cache, n_blocks)
    except PolicyError as why:
        most = 0 if model is None else notes(model).blocks
        if n_blocks >= most:
            raise
        # A graph of fewer blocks than the model's first (a guider's hook that skips some for
        # its branch): the span given for the whole model does not fit it. Its branch runs as
        # the model's calls that skip blocks do, uncached.
        warnings.warn(f"mixcache: {model_name()}: a graph of {n_blocks} of the model's {most} "
                      f"blocks (a call that skips some), where the cache option's blocks do not "
                      f"fit ({why}): such calls run without caching", stacklevel=3)
        return None
    if model is not None:
        notes(model).blocks = max(n_blocks, notes(model).blocks)
    return policy


def _uncacheable(gm: fx.GraphModule, rmap: RegionMap, model: torch.nn.Module | None,
                 example_inputs: list[Any], options: dict | None, tail: bool) -> bool:
    """Whether no reuse rule can be trusted with this graph, though a cache was asked for: each
    cause said in a warning that names it and, where there is one, the fix. ``tail``: the graph
    holding the blocks of a forward broken before them (runtime.relay), whose latent and timestep
    are the first graph's."""
    if records_autograd(example_inputs):
        # Dynamo guards on grad mode and on each input's requires_grad, so this graph runs only
        # where autograd records: a reused output would be another call's, with its graph.
        warnings.warn(f"mixcache: {model_name()}: autograd records this forward (grad enabled, "
                      "inputs or parameters that require grad), so nothing is cached: a reused "
                      "output would belong to another call and carry its graph. Call the model "
                      "under torch.no_grad() or torch.inference_mode() to cache (diffusers' "
                      "pipelines do).", stacklevel=3)
        return True
    if any(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in example_inputs):
        # Dynamo guards on the device: this graph runs on meta tensors only, which hold no
        # values to read a noise level or a change from (a shape check, a memory estimate).
        return True
    outside = outside_model(gm, rmap) if model is None else []
    if outside:
        # The graph's outputs are then the function's (a whole denoising step: the model, then
        # the sampler's update), and reusing them as model outputs would stall the sampler.
        warnings.warn(f"mixcache: torch.compile was given a function that computes outside the "
                      f"model it calls ({len(outside)} operations, e.g. '{outside[0].name}'), so "
                      "nothing is cached: the reuse rules are of the model's outputs. Compile the "
                      "transformer itself (pipe.transformer = torch.compile(pipe.transformer, "
                      "backend='mixcache')) to cache", stacklevel=3)
        return True
    if diffusers_caches(model):
        # A hook that traces (PyramidAttentionBroadcast) reuses attention inside the graph, by
        # counters a reused call would not advance: two caches would reuse each other's results.
        warnings.warn(f"mixcache: {model_name()}: {diffusers_caches_said()}. This graph runs "
                      "without caching", stacklevel=3)
        return True
    if is_fragment(gm) and not tail:
        # One graph of a forward that breaks: its inputs may be any intermediates, named like the
        # model's own (HunyuanImage's token refiner, a frame of its own, takes the text as
        # `hidden_states` and a `timestep`), so no reuse rule can be trusted with them. The
        # forward's last graph is cached by what its first one records (runtime.relay).
        warn_fallback(gm, None, options)
        return True
    writes = writes_inputs(gm)
    if writes:
        warnings.warn(f"mixcache: {model_name()}: {writes}: this graph runs without caching (the "
                      "model's graphs that write nothing are cached as usual)", stacklevel=3)
        return True
    stores = stored_tensors()
    if stores:
        warnings.warn(f"mixcache: {model_name()}: its forward stores tensors it computes into "
                      f"{', '.join(stores[:3])}{' and more' if len(stores) > 3 else ''} besides "
                      "returning them, and a reused call would store the cached ones: this graph "
                      "runs without caching", stacklevel=3)
        return True
    missing = None if tail else missing_inputs(rmap.inputs) or rmap.samples_why
    if missing:
        # Said under the default cache too: a user who compiled for it would otherwise see plain
        # Inductor's speed and no reason (`cache: None` asks for no caching and hears nothing).
        warnings.warn(f"mixcache: {model_name()}: {missing}; running without caching",
                      stacklevel=3)
        return True
    return False


def compile_regions(gm: fx.GraphModule, example_inputs: list[Any], model: torch.nn.Module | None,
                    opts: Options) -> Callable[..., Any]:
    """``gm`` compiled region by region and stitched, caching nothing: the half-batch forward's
    graph (runtime.halves). Plain Inductor where it has no block structure (no warning: the
    model's own graph had one, and said nothing)."""
    inductor: dict[str, Any] = {}   # Inductor's defaults, not the mode's: no CUDA graphs in a cfg step
    try:
        plan = split(gm, find_regions(gm))
    except NoBlockStructure:
        return compile_graph(gm, example_inputs, inductor, opts, model)
    return Executor(plan, _compile_pieces(plan, opts, inductor, example_inputs, model))


def _half_backend(opts: Options) -> Callable[..., Callable[..., Any]] | None:
    """How a half-batch forward compiles: region by region, as the model's graphs do (None:
    eager, under ``regions="eager"``)."""
    return None if opts.regions == "eager" else functools.partial(compile_regions, opts=opts)


install_trace_hook()   # loaded by the entry point as torch.compile names the backend
