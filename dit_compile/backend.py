"""``backend="mixcache"``: the torch.compile backend, one linear pipeline of named passes."""
from __future__ import annotations

import collections
import copy
import functools
import logging
import operator
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from .frames import (compiled_model, forward_head, forward_tail, in_forward_wrapper,
                     install_trace_hook, is_fragment, lower_moe_and_retrace, model_name,
                     retrace_once_after_break, traced_locals, traced_module, warn_fallback)
from .options import Options
from .passes.modulation import Modulation, modulated_input
from .passes.mutation import example_value, writes_inputs
from .passes.regions import (BLOCK, GLUE, NoBlockStructure, RegionMap, check_whole_stacks,
                             find_regions, missing_inputs, named_inputs, outside_model,
                             source_name, user_inputs)
from .passes.split import Piece, Plan, graph_signature, pruned_twins, split
from .passes.stamping import stamp_blocks
from .runtime import background
from .runtime.cache import StateFactory
from .runtime.executor import Executor, GuardedExecutor, kept_outputs
from .runtime.halves import HalfBatch
from .runtime.policy import PolicyError, make_policy
from .runtime.relay import Head, RelayedExecutor

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
    return retraced(_compile(gm, example_inputs, opts, options, mode, model))


def _compile(gm: fx.GraphModule, example_inputs: list[Any], opts: Options, options: dict | None,
             mode: str | None, model: torch.nn.Module | None) -> Callable[..., Any]:
    start = time.perf_counter()
    inductor = _inductor_config(mode or opts.mode)
    #    A forward cut by a graph break before its blocks: its first graph records the call's
    #    latent, timestep and text for the graph that runs the blocks (runtime.relay).
    head = head_slots(gm, model) if opts.cache is not None else None
    if head is not None:
        # Written while Dynamo traces, as frames' flags are: the guards it builds afterwards see it.
        model._mixcache_head = True     # a later graph of this forward may take the record
        # No blocks in it: compiled as the prologue is (regions="blocks" leaves that as it is).
        halves = (half_batch(gm, example_inputs, named_inputs(gm), _half_backend(opts),
                             before_break=True)
                  if getattr(make_policy(opts.cache, None), "reuses_cfg", False) else None)
        return Head(compile_graph(gm, example_inputs, inductor, opts, model)
                    if opts.regions == "inductor" else gm.forward, head, computed_outputs(gm),
                    model_name(), halves)

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
    fns = compile_pieces(plan, opts, inductor, example_inputs)
    if model is not None:
        background.register(model, fns)     # for dit_compile.wait_for_compiles
    log.info("mixcache: %s: %d pieces; backend %.2f s", model_name(), len(plan.pieces),
             time.perf_counter() - start)

    # 4. stitch: the executor runs the pieces, asking the policy at each guard point; a graph
    #    no reuse rule can be trusted with (said why) runs them in turn.
    policy = _policy(opts, rmap, model)
    if policy is None:
        return Executor(plan, fns)
    tail = forward_tail(gm, model) and bool(model.__dict__.get("_mixcache_head"))
    if _uncacheable(gm, rmap, model, example_inputs, options, tail):
        return Executor(plan, fns)
    # Keyed by the configuration as given, not as resolved for this graph's blocks: a model's
    # graphs with fewer blocks (a guider's hook that skips one for its branch) share the state.
    state = StateFactory(opts.cache_memory, clone=bool(inductor.get("triton.cudagraphs")),
                         key=repr(make_policy(opts.cache, None)), timestep=opts.timestep)
    if tail:
        return RelayedExecutor(plan, fns, policy, state, anchor_slot(gm),
                               piece_flops(plan, example_inputs), None,
                               modulation_of(plan, policy, model_name()),
                               partners=parameter_slots(gm), carriers=carriers(gm),
                               text=named_slot(gm, "text"), out_shapes=output_shapes(gm))
    halves = (half_batch(gm, example_inputs, rmap.inputs, _half_backend(opts), rmap.samples,
                         rmap.sample_outs)
              if getattr(policy, "reuses_cfg", False) else None)
    return GuardedExecutor(plan, fns, policy, state, anchor_slot(gm),
                           piece_flops(plan, example_inputs), halves,
                           modulation_of(plan, policy, model_name()),
                           partners=parameter_slots(gm))


def _policy(opts: Options, rmap: RegionMap, model: torch.nn.Module | None) -> Any:
    """The cache option's policy for this graph's blocks (those of the stacks the latent flows
    through); None where it asks for no reuse, or where its blocks do not fit a graph of fewer
    blocks than the model's (said in a warning)."""
    n_blocks = len(rmap.guarded)
    try:
        policy = make_policy(opts.cache, n_blocks)
    except PolicyError as why:
        most = 0 if model is None else model.__dict__.get("_mixcache_blocks", 0)
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
        model._mixcache_blocks = max(n_blocks, model.__dict__.get("_mixcache_blocks", 0))
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
    if getattr(model, "is_cache_enabled", False):
        # A hook that traces (PyramidAttentionBroadcast) reuses attention inside the graph, by
        # counters a reused call would not advance: two caches would reuse each other's results.
        warnings.warn(f"mixcache: {model_name()}: diffusers' own cache hooks are on (enable_cache), "
                      "so this backend caches nothing: call disable_cache() before torch.compile "
                      "to let mixcache cache", stacklevel=3)
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
    missing = None if tail else missing_inputs(rmap.inputs) or rmap.samples_why
    if missing:
        # Said under the default cache too: a user who compiled for it would otherwise see plain
        # Inductor's speed and no reason (`cache: None` asks for no caching and hears nothing).
        warnings.warn(f"mixcache: {model_name()}: {missing}; running without caching",
                      stacklevel=3)
        return True
    return False


def head_slots(gm: fx.GraphModule,
               model: torch.nn.Module | None) -> tuple[int, int, int | None] | None:
    """The graph inputs of the call's latent, timestep and text (None where it takes none) where
    ``gm`` is the first graph of a forward cut by a graph break before its blocks and takes the
    first two by name; else None. A first graph that holds blocks (HiDream's, cut in its
    unpatchify) is a fragment as before: uncached, and said so."""
    if not forward_head(gm, model):
        return None
    roles = named_inputs(gm)
    if "latent" not in roles or "timestep" not in roles:
        return None
    try:
        find_regions(gm)
        return None
    except NoBlockStructure:
        pass
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return (names.index(roles["latent"]), names.index(roles["timestep"]),
            names.index(roles["text"]) if "text" in roles else None)


def named_slot(gm: fx.GraphModule, role: str) -> int | None:
    """The graph input that takes ``role`` (``named_inputs``) by name, or None."""
    name = named_inputs(gm).get(role)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return None if name is None else names.index(name)


def computed_outputs(gm: fx.GraphModule) -> list[int]:
    """The positions of the graph's outputs that are tensors it computes (not inputs it returns
    as they are, nor numbers)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return [i for i, o in enumerate(out) if isinstance(o, fx.Node) and o.op != "placeholder"
            and isinstance(example_value(o), torch.Tensor)]


def carriers(gm: fx.GraphModule) -> list[int]:
    """The graph inputs that may carry a head's record: the tensors passed to the graph, not
    the model's parameters and buffers."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [phs.index(n) for n in user_inputs(gm)]


def records_autograd(example_inputs: list[Any]) -> bool:
    """Whether autograd records the graph these inputs were traced with (training, or gradients
    through the model, as some guidance methods take)."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def modulation_of(plan: Plan, policy: Any, name: str) -> Modulation | None:
    """The first block's modulated input, where the policy decides on it (TeaCache); where the
    block has none, the policy falls back to the latent's change, with a warning."""
    if not getattr(policy, "reads_modulation", False):
        return None
    found = modulated_input(plan)
    if found is None:
        warnings.warn(f"mixcache: {name}: teacache signal 'modulated': no linear layer of "
                      "the first block reads both the latent and the timestep (or the block is "
                      "one opaque call); deciding on the input latent's change instead "
                      "(signal 'input')", stacklevel=2)
        policy.teacache_signal = "input"
    return found


def compile_pieces(plan: Plan, opts: Options, inductor: dict[str, Any],
                   example_inputs: list[Any]) -> list[Callable[..., Any]]:
    """Each distinct piece compiled once (identical blocks share it). Glue of a few ops between
    blocks runs as it is: Chroma slices its per-block modulation there, one constant apart from
    block to block, and Inductor would compile each of them for a kernel or two it cannot fuse
    into anything.

    A piece is compiled with the graph's own inputs where it reads them (values between pieces
    exist only as fake tensors), as plain Inductor is given the graph's: a Python float that Dynamo
    made an input (``dynamic=True`` does so with every module's float, a norm's eps among them)
    then either becomes tensor math or makes AOTAutograd restart Dynamo's analysis with that float
    specialized, as it does for plain Inductor. From a fake value alone the float is data-dependent,
    and the compile of the first block that passes it to ``layer_norm`` fails.

    With ``background_compile``, the pieces whose inputs have concrete layouts go to one child
    process instead, blocks first, and run as their FX graphs until each is ready
    (runtime.background); the others are compiled here as usual."""
    compiled: dict[str, Callable[..., Any]] = {}
    later: list[tuple[str, int, list[Any]]] = []      # (key, piece, inputs) for the child
    symbolic = 0                                      # pieces that stay here for their sizes
    here = 0                                          # pieces compiled in this process
    twins, pruned = (shared_blocks(plan) if opts.share_blocks and opts.regions != "eager"
                     else ({}, {}))
    keys = []
    for i, piece in enumerate(plan.pieces):
        key = piece.signature() if opts.share_blocks else str(i)
        keys.append(key)
        if key in compiled or i in twins or i in pruned:
            continue
        if (opts.regions == "eager" or _small_glue(piece)
                or (opts.regions == "blocks" and piece.region.kind != BLOCK)):
            compiled[key] = piece.module
            continue
        inputs = [example_inputs[s] if s < plan.n_inputs else x
                  for s, x in zip(piece.args, piece.example_inputs)]
        if opts.background_compile and not records_autograd(example_inputs):
            if background.shippable(inputs):
                compiled[key] = piece.module    # its Swapping, below, once the job has them all
                later.append((key, i, inputs))
                continue
            symbolic += 1
        start = time.perf_counter()
        here += 1
        compiled[key] = in_traced_strides(_compile_here(piece.module, inputs, inductor), piece)
        log.info("mixcache: compiled piece %d (%s, %d nodes) in %.2f s", i,
                 piece.region.kind, len(piece.module.graph.nodes), time.perf_counter() - start)
    if symbolic:
        warnings.warn(f"mixcache: {model_name()}: background_compile: {symbolic} region(s) of "
                      "symbolic sizes (Dynamo traced this graph with dynamic shapes) compiled in "
                      "this process; torch.compile(..., dynamic=False) keeps sizes static",
                      stacklevel=3)
    log.info("mixcache: %d graphs compiled (%d in the background) for %d pieces, %d of them "
             "twins of another's", len(later) + here, len(later), len(plan.pieces),
             len(twins) + len(pruned))
    if later:
        compiled.update(_compile_in_background(plan, later, inductor))
    fns = [compiled.get(k) for k in keys]
    for i, (mate, strided) in twins.items():
        fns[i] = in_traced_strides(_dense_inputs(fns[mate], strided), plan.pieces[i])
    for i, (mate, keep) in pruned.items():
        fns[i] = in_traced_strides(kept_outputs(fns[mate], keep, plan.pieces[i].single),
                                   plan.pieces[i])
    return fns


def shared_blocks(plan: Plan) -> tuple[dict[int, tuple[int, list[int]]],
                                       dict[int, tuple[int, tuple[int, ...]]]]:
    """The blocks that run a stack-mate's compile though their own graphs differ from it: the
    dense twins (``dense_twins``) and the pruned twins (``split.pruned_twins``), by piece."""
    twins = dense_twins(plan)
    return twins, pruned_twins(plan, twins)


def dense_twins(plan: Plan) -> dict[int, tuple[int, list[int]]]:
    """Blocks handed strided views but otherwise their stack-mates (CogVideoX's first block gets
    slices of the prologue's concatenated tokens): piece -> (the mate whose compile it shares,
    the inputs it copies dense first). A copy of a block's inputs per call, against a compile of
    a block of its own. Only a block no other is like: where others share its graph (Flux's
    single-stream blocks at batch 2, each handed slices of the one before, but the first), that
    graph is compiled for them anyway, and a copy would buy nothing."""
    first: dict[str, int] = {}
    count: collections.Counter = collections.Counter()
    for i, piece in enumerate(plan.pieces):
        if piece.region.kind == BLOCK:
            first.setdefault(piece.signature(), i)
            count[piece.signature()] += 1
    twins = {}
    for i, piece in enumerate(plan.pieces):
        if piece.region.kind != BLOCK or count[piece.signature()] > 1:
            continue
        strided = [k for k, x in enumerate(piece.example_inputs)
                   if isinstance(x, torch.Tensor) and background.shippable([x])
                   and not x.is_contiguous()]      # size-1 dimensions' strides aside
        if strided:
            dense = [x.contiguous() if k in strided else x
                     for k, x in enumerate(piece.example_inputs)]
            mate = first.get(graph_signature(piece.module, dense), i)
            if mate != i:
                twins[i] = (mate, strided)
    return twins


def _dense_inputs(fn: Callable[..., Any], strided: list[int]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        args = list(args)
        for k in strided:
            args[k] = args[k].contiguous()
        return fn(*args)
    return call


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], inductor: dict[str, Any],
                  opts: Options, model: torch.nn.Module | None) -> Callable[..., Any]:
    """A whole Dynamo graph compiled as plain Inductor compiles it (a graph with no blocks, a
    relay's head), or under ``background_compile`` in a child process, running as it is till then."""
    if (opts.background_compile and background.shippable(example_inputs)
            and not records_autograd(example_inputs)):
        fns = _in_background([(gm, example_inputs, lambda fn: fn,
                               lambda args: _compile_here(gm, args, inductor))], inductor)
        if fns is not None:
            if model is not None:
                background.register(model, fns)
            return fns[0]
    return compile_fx(gm, example_inputs, config_patches=inductor)


def compile_regions(gm: fx.GraphModule, example_inputs: list[Any], model: torch.nn.Module | None,
                    opts: Options) -> Callable[..., Any]:
    """``gm`` compiled region by region and stitched, caching nothing: the half-batch forward's
    graph (runtime.halves). Plain Inductor where it has no block structure (no warning: the
    model's own graph had one, and said nothing)."""
    inductor: dict[str, Any] = {}   # plain Inductor's, as before: no CUDA graphs in a cfg step
    try:
        plan = split(gm, find_regions(gm))
    except NoBlockStructure:
        return compile_graph(gm, example_inputs, inductor, opts, model)
    fns = compile_pieces(plan, opts, inductor, example_inputs)
    if model is not None:
        background.register(model, fns)
    return Executor(plan, fns)


def _compile_in_background(plan: Plan, later: list[tuple[str, int, list[Any]]],
                           inductor: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """The callables of the pieces ``later`` names (key, piece index, example inputs): each runs
    as its FX graph until one child process has compiled it, the blocks first; compiled now
    where the job cannot start."""
    later = sorted(later, key=lambda k: plan.pieces[k[1]].region.kind != BLOCK)   # the bulk first
    pieces = [plan.pieces[i] for _, i, _ in later]
    fns = _in_background([
        (piece.module, inputs,
         lambda fn, piece=piece: in_traced_strides(_as_traced(fn, piece), piece),
         lambda args, piece=piece: in_traced_strides(
             _compile_here(piece.module, args, inductor), piece))
        for piece, (_, _, inputs) in zip(pieces, later)], inductor)
    if fns is None:
        fns = [in_traced_strides(_compile_here(piece.module, inputs, inductor), piece)
               for piece, (_, _, inputs) in zip(pieces, later)]
    return {key: fn for (key, _, _), fn in zip(later, fns)}


def _in_background(graphs: list[tuple[fx.GraphModule, list[Any], Callable[..., Any],
                                      Callable[..., Any]]],
                   inductor: dict[str, Any]) -> list[Callable[..., Any]] | None:
    """One child process compiling ``graphs`` (graph, example inputs, how to wrap its artifact,
    how to compile it here if the child fails), in order (runtime.background); None where
    ``MAX_CHILDREN`` children are compiling already, and with a warning where the job cannot
    start (a graph that does not pickle, no child process)."""
    if not background.room():
        log.info("mixcache: %s: %d child processes compiling already; compiling here",
                 model_name(), background.MAX_CHILDREN)
        return None
    try:
        job = background.Job([(gm, inputs) for gm, inputs, _, _ in graphs], inductor, model_name())
    except Exception as why:
        warnings.warn(f"mixcache: {model_name()}: cannot compile in the background "
                      f"({type(why).__name__}: {why}); compiling now", stacklevel=4)
        return None
    return [background.Swapping(job, j, gm, finish=finish, compile_here=here)
            for j, (gm, _, finish, here) in enumerate(graphs)]


def _compile_here(gm: fx.GraphModule, inputs: list[Any],
                  inductor: dict[str, Any]) -> Callable[..., Any]:
    # compile_fx owns and may mutate the graph it is given.
    return compile_fx(copy.deepcopy(gm), inputs, config_patches=inductor)


def _as_traced(artifact: Callable[..., Any], piece: Piece) -> Callable[..., Any]:
    """A standalone artifact, which returns a list, returning what ``piece``'s graph returns."""
    if not piece.single:
        return artifact
    return lambda *args: artifact(*args)[0]


def in_traced_strides(fn: Callable[..., Any], piece: Piece) -> Callable[..., Any]:
    """``fn``, ``piece`` compiled by Inductor, with each output in the strides of its traced value.

    Inductor keeps an output's strides only where it can: a ``cat`` with an empty operand (Wan
    VACE pads its control tokens by none) comes back as a view of the other operand, transposed.
    Plain Inductor hands that to the caller, who may take any strides; here the next piece was
    compiled for the traced value's strides, and Inductor's check of its inputs fails. A dynamic
    graph's strides are expressions of each call's sizes: a traced value that is dense is laid out
    by its order of dimensions at the call's sizes (one that is not is left as it comes).
    """
    out = next(n for n in reversed(piece.module.graph.nodes) if n.op == "output").args[0]
    single = piece.single
    examples = [example_value(x) if isinstance(x, fx.Node) else None
                for x in ((out,) if single else out)]
    want = [_traced_layout(v) if isinstance(v, torch.Tensor) else None for v in examples]
    if all(w is None for w in want):
        return fn

    fix: list[int] | None = None     # the outputs to copy: found at the first call, since
                                     # the same kernels on inputs of asserted strides lay out alike

    def call(*args: Any) -> Any:
        nonlocal fix
        out = fn(*args)
        if fix is None:
            fix = [i for i, (x, w) in enumerate(zip([out] if single else out, want))
                   if w is not None and not _same_strides(x.shape, x.stride(), w(x.shape))]
        if not fix:
            return out
        outs = [out] if single else list(out)
        for i in fix:
            x = outs[i]
            outs[i] = torch.empty_strided(x.shape, want[i](x.shape), dtype=x.dtype,
                                          device=x.device).copy_(x)
        return outs[0] if single else outs
    return call


def _traced_layout(v: torch.Tensor) -> Callable[[torch.Size], tuple[int, ...]] | None:
    """The strides a value traced as ``v`` has at a call's sizes: its own where they are numbers;
    under dynamic shapes, where ``v`` is dense, those of its order of dimensions; else None."""
    if all(type(s) is int for s in v.stride()):
        strides = tuple(v.stride())
        return lambda shape: strides
    hints = [_hint(d) for d in (*v.shape, *v.stride())]
    if None in hints:
        return None
    shape, stride = hints[:v.dim()], hints[v.dim():]
    order = sorted(range(v.dim()), key=lambda d: (stride[d], shape[d]))   # innermost first
    if not _same_strides(shape, stride, _dense(shape, order)):
        return None
    return lambda shape: _dense(shape, order)


def _dense(shape: Any, order: list[int]) -> tuple[int, ...]:
    strides, step = [0] * len(shape), 1
    for d in order:
        strides[d], step = step, step * shape[d]
    return tuple(strides)


def _hint(d: Any) -> int | None:
    if type(d) is int:
        return d
    return d.node.hint if d.node.has_hint() else None


def _same_strides(shape: Any, a: Any, b: Any) -> bool:
    """Whether strides ``a`` and ``b`` lay out ``shape`` alike (dimensions of size 1 take any)."""
    return all(n == 1 or x == y for n, x, y in zip(shape, a, b))


def _small_glue(piece: Piece) -> bool:
    ops = [n for n in piece.module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return piece.region.kind == GLUE and len(ops) <= 4


def flop_counter() -> Any:
    """torch's ``FlopCounterMode`` (no display), counting attention on the CPU too: torch counts
    the CUDA kernels of ``scaled_dot_product_attention`` (flash, efficient, cuDNN) but not the
    flash kernel the CPU runs for it, so on the CPU a forward's attention counted as no FLOPs (a
    fifth to a quarter of the trained reference models'), and the shares differed from the GPU's.
    It counts the total alone (``get_total_flops``), with no per-module table: see ``_GlobalOnly``."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query: Any, key: Any, value: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return sdpa_flop_count(query, key, value)
    cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu: sdpa} if cpu is not None else None)
    counter.mod_tracker = _GlobalOnly()
    return counter


def piece_flops(plan: Plan, graph_inputs: list[Any] | None = None) -> list[float]:
    """Each piece's share of the forward's FLOPs, counted on fake inputs (nothing runs).

    The inputs are made afresh in their own fake mode, with concrete sizes (a dynamic dimension at
    its hint, the size of the call being compiled): under symbolic sizes a piece's broadcasts
    fail in the fake kernels, which log an error with a traceback before raising. A 0-d graph input
    is taken as the constant it is (``graph_inputs``: the real ones): under dynamic=True a module's
    float (a norm's eps) is such an input, and its ``.item()`` would be data-dependent. A piece may
    hold real constants (Wan's rotary frequencies, made in its forward): the mode converts them."""
    from torch._guards import detect_fake_mode
    counts = []
    mode = detect_fake_mode([x for p in plan.pieces for x in p.example_inputs])
    # A fake kernel that fails logs an error with its traceback before raising (constant_pad_nd
    # on a size only known at run time: Mochi's nonzero); the failure is handled below.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    fake_log_disabled, fake_log.disabled = fake_log.disabled, True
    allowed = mode is not None and mode.allow_non_fake_inputs
    try:
        if mode is None:
            raise RuntimeError("no fake inputs")
        mode.allow_non_fake_inputs = True
        with mode:
            counted: dict[str, float] = {}    # identical pieces (the blocks) are counted once
            for p in plan.pieces:
                key = p.signature()
                if key not in counted:
                    inputs = [_constant(mode, graph_inputs[s]) if _scalar(graph_inputs, s, plan)
                              else _concrete(x) for s, x in zip(p.args, p.example_inputs)]
                    with flop_counter() as fc:
                        p.module(*inputs)
                    counted[key] = float(fc.get_total_flops())
                counts.append(counted[key])
    except Exception as why:  # a piece fake execution cannot count: weigh blocks equally instead
        log.info("mixcache: %s: FLOPs not counted (%s: %s); blocks weighed equally", model_name(),
                 type(why).__name__, str(why).splitlines()[0] if str(why) else "")
        counts = [1.0 if p.region.kind == BLOCK else 0.0 for p in plan.pieces]
    finally:
        if mode is not None:
            mode.allow_non_fake_inputs = allowed
        fake_log.disabled = fake_log_disabled
    total = sum(counts) or 1.0
    return [c / total for c in counts]


class _GlobalOnly:
    """FlopCounterMode's module tracker, for the total alone. Its own registers process-wide
    module hooks while it counts (for a per-module table): another thread calling a compiled
    model meanwhile runs them inside its compiled call, and Dynamo, tracing them there, fails
    ("already tracked for mutation"). The counter files every op under its parents; here only
    "Global", the total ``get_total_flops`` reads."""
    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _scalar(graph_inputs: list[Any] | None, slot: int, plan: Plan) -> bool:
    return (graph_inputs is not None and slot < plan.n_inputs
            and isinstance(graph_inputs[slot], torch.Tensor) and graph_inputs[slot].dim() == 0
            and not isinstance(graph_inputs[slot], torch._subclasses.FakeTensor))


def _constant(mode: Any, x: torch.Tensor) -> torch.Tensor:
    return mode.fake_tensor_converter.from_real_tensor(mode, x, make_constant=True)


def _concrete(x: Any) -> Any:
    """``x`` with its symbolic sizes at their hints: a tensor of the current fake mode, or a number."""
    def hint(d: Any) -> int:
        return d if isinstance(d, int) else int(d.node.hint)
    if isinstance(x, torch.Tensor):
        return torch.empty_strided([hint(d) for d in x.shape], [hint(d) for d in x.stride()],
                                   dtype=x.dtype, device=x.device)
    return hint(x) if isinstance(x, torch.SymInt) else x


def parameter_slots(gm: fx.GraphModule) -> list[int]:
    """The graph inputs that are the model's parameters. Dynamo reuses one graph for every
    instance of a model class (parameters are inputs), so the runtime finds the model's cache
    state on one of them, and tells models apart by all of them."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(phs)
            if isinstance(getattr(n.meta.get("grapharg"), "example", None), torch.nn.Parameter)]


def anchor_slot(gm: fx.GraphModule) -> int | None:
    """The graph input the model's cache state hangs on: its first parameter."""
    return next(iter(parameter_slots(gm)), None)


def half_batch(gm: fx.GraphModule, example_inputs: list[Any], inputs: Mapping[str, str],
               backend: Callable[..., Callable[..., Any]] | None, samples: Sequence[str] = (),
               sample_outs: Sequence[int] = (), before_break: bool = False) -> HalfBatch | str:
    """The half-batch forward for cfg reuse on batched-CFG calls, or why there is none.
    ``inputs``: the placeholders of the latent, text and timestep, by role; ``samples``: those of
    a latent given as per-sample tensors. ``before_break``: ``gm`` is the first graph of a forward
    cut before its blocks (runtime.relay): the recipe is fitted to its last graph's outputs there.

    Built here because only compile time sees both sides: Dynamo's frame (the module and the real
    arguments of the first call) and the graph (which input each argument became)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        return "the graph's inputs do not line up with the example inputs"
    if in_forward_wrapper(compiled_model()):
        return ("a hook wraps the model's forward (accelerate's offload hook, as "
                "enable_model_cpu_offload adds) and was added before torch.compile, so the call's "
                "arguments are the hook's; add it after torch.compile to reuse cfg on such calls")
    user = {n.name for n in user_inputs(gm)}
    placeholders = [(source_name(n), n.name not in user) for n in phs]
    numbers = frozenset(i for i, n in enumerate(phs)
                        if getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False))
    names = [n.name for n in phs]
    roles = [names.index(inputs[r]) for r in ("latent", "text", "timestep") if r in inputs]
    latent = example_inputs[names.index(inputs["latent"])]
    slots = [names.index(n) for n in samples]
    batch = len(slots) if slots else latent.shape[0] if latent.dim() else 0
    traced = example_value(phs[names.index(inputs["latent"])])
    symbol = (traced.shape[0] if isinstance(traced, torch.Tensor) and traced.dim()
              and not isinstance(traced.shape[0], int) else None)
    shapes = [] if before_break else output_shapes(gm, symbol, batch)
    layered = frozenset(i for i, n in enumerate(phs) if n.users and all(
        u.op == "call_function" and u.target is operator.getitem and u.args[0] is n
        and isinstance(u.args[1], int) for u in n.users))
    return HalfBatch.build(traced_module(), traced_locals(), placeholders, example_inputs, roles,
                           batch, shapes, backend, slots, sample_outs, numbers, layered,
                           before_break)


def output_shapes(gm: fx.GraphModule, symbol: Any = None,
                  batch: int = 0) -> list[tuple[int | None, ...] | None]:
    """The shape of each of the graph's node outputs (the executor's outputs; constants stay in
    the output spec), None where not a tensor. Under dynamic shapes the batch is a symbol: a dim
    that is the latent's ``symbol`` is the ``batch``, as a number of the first call."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [_static_shape(x.meta.get("example_value"), symbol, batch)
            for x in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(x, fx.Node)]


def _half_backend(opts: Options) -> Callable[..., Callable[..., Any]] | None:
    """How a half-batch forward compiles: region by region, as the model's graphs do (None:
    eager, under ``regions="eager"``)."""
    return None if opts.regions == "eager" else functools.partial(compile_regions, opts=opts)


def _static_shape(v: Any, symbol: Any = None, batch: int = 0) -> tuple[int | None, ...] | None:
    """``v``'s shape with symbolic sizes None, but for the batch's ``symbol``: ``batch``."""
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else
                 batch if symbol is not None and d.node.expr == symbol.node.expr else None
                 for d in v.shape)


def _inductor_config(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    return dict(torch._inductor.list_mode_options(mode))


install_trace_hook()   # loaded by the entry point as torch.compile names the backend
