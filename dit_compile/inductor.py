"""What Inductor compiles for a graph's pieces, and how: each distinct piece once (identical
blocks share it; a block handed strided views, or read in part, runs a stack-mate's compile),
small glue left as it is, each output in the strides it was traced with, and under
``background_compile`` in a child process (runtime.background) while the pieces run as traced."""
from __future__ import annotations

import collections
import copy
import logging
import time
import warnings
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from .frames import model_name
from .options import Options
from .passes.mutation import example_value
from .passes.regions import BLOCK, GLUE
from .passes.split import Piece, Plan, graph_signature, pruned_twins
from .runtime import background
from .runtime.executor import kept_outputs

log = logging.getLogger("dit_compile")


def records_autograd(example_inputs: list[Any]) -> bool:
    """Whether autograd records the graph these inputs were traced with (training, or gradients
    through the model, as some guidance methods take)."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


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
    return compile_fx(copy.deepcopy(gm), [_canonical_size(x) for x in inputs],
                      config_patches=inductor)


def _canonical_size(x: Any) -> Any:
    """A size input as the symbol its shape environment reduced it to. Inductor binds a size
    input by the symbol it was made as (``s50``), and the sizes of a piece's tensors are in the
    reduced one (``s28 + 6``): a piece holding no tensor of size ``s28`` itself (Flux 2 Klein's
    KV-cached blocks, past the reference tokens) failed its codegen. Dynamo's whole graph holds
    one, so plain Inductor never met this."""
    if isinstance(x, torch.SymInt):
        node = x.node
        if isinstance(node.expr, sympy.Symbol) and node.expr != node._expr:
            return node.shape_env.create_symintnode(node.expr, hint=node.hint)
    return x


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
    out = piece.module.graph.output_node().args[0]
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
