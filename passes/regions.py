"""Find the block structure of a DiT forward in Dynamo's graph.

Contract: ``find_regions(gm)`` reads a Dynamo-traced ``GraphModule`` and returns a ``RegionMap``
that assigns every node except placeholders and the output to exactly one region, in graph order:

    prologue | stack A: block 0, block 1, ... | glue | stack B: block 0, ... | epilogue

It never changes the graph. Where no repeated block structure is found it raises
``NoBlockStructure`` with a reason a user can act on; the backend then falls back to plain Inductor.

How blocks are found, with no per-model table: every node Dynamo records carries
``meta["nn_module_stack"]``, the chain of modules whose ``forward`` it ran in. A *stack* is a
container path whose children ``<path>.0, <path>.1, ...`` are two or more modules of one class that
is not a ``torch.nn`` builtin (an ``nn.ModuleList`` of transformer blocks, not a ``Sequential`` of
layers). Only the outermost stacks count (those with the fewest modules running around them), so a
refiner stack inside a text embedder stays part of the prologue. Which inputs are the latent, the
timestep and the text condition is answered by the names diffusers pipelines pass them under, and
failing that (a positional call) by dataflow.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

PROLOGUE, BLOCK, GLUE, EPILOGUE = "prologue", "block", "glue", "epilogue"


class NoBlockStructure(Exception):
    """The graph has no repeated block stack that the region pass can use."""


@dataclass
class Region:
    name: str                      # "prologue", "blocks.3", "glue.0", "epilogue"
    kind: str                      # PROLOGUE | BLOCK | GLUE | EPILOGUE
    nodes: list[fx.Node]
    stack: str | None = None       # e.g. "blocks"; set for kind == BLOCK
    index: int | None = None       # position in its stack


@dataclass
class RegionMap:
    regions: list[Region]
    stacks: dict[str, int]                         # stack path -> number of blocks
    inputs: dict[str, str]                         # role -> placeholder name
    input_rule: str                                # "names" or "dataflow"
    streams: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)  # stack -> shapes
    latent_stacks: list[str] = field(default_factory=list)  # the stacks the latent flows through
    # Where the latent comes as a list of per-sample tensors (Z-Image): the list's elements, in
    # order, and the positions among the output's tensors of the per-sample outputs, or why none.
    samples: list[str] = field(default_factory=list)
    sample_outs: list[int] = field(default_factory=list)
    samples_why: str | None = None
    texts: list[str] = field(default_factory=list)  # the text condition's list, one per sample
    conditions: list[str] = field(default_factory=list)  # other floating inputs (conditions)

    def region_of(self) -> dict[fx.Node, int]:
        return {n: i for i, r in enumerate(self.regions) for n in r.nodes}

    @property
    def blocks(self) -> list[Region]:
        return [r for r in self.regions if r.kind == BLOCK]

    @property
    def guarded(self) -> list[Region]:
        """The blocks the block guard's probe and span count: those of the latent's stacks."""
        return [r for r in self.blocks if r.stack in self.latent_stacks]


# Dynamo spells module paths differently across versions:
#   "L['self'].__dict__['_modules']['blocks'].0"   (2.13)
#   "L['self'].blocks[0]", "L['self']._modules['blocks']._modules['0']"
#   "getattr(L['module'].blocks, '0')"   (a module passed as an argument: the half-batch forward)
_PATH_TOKENS = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\._modules\['([^']+)'\]|\['([^']+)'\]|\[(\d+)\]|\.(\w+)")
_GETATTR = re.compile(r"getattr\(([^()]*), '([^']+)'\)")


@functools.lru_cache(maxsize=4096)
def module_path(raw: str) -> str:
    """Normalise a Dynamo module path to a dotted fqn ("blocks.0.attn1"). Cached: the region
    pass reads every node's module stack several times, and a model has far fewer paths."""
    while "getattr(" in raw:
        raw, n = _GETATTR.subn(r"\1.\2", raw)
        if not n:
            break
    raw = re.sub(r"^L\['self'\]|^self", "", raw)
    parts = [next(g for g in m.groups() if g is not None) for m in _PATH_TOKENS.finditer(raw)]
    return ".".join(p for p in parts if p not in ("__dict__", "_modules"))


def _stack_entries(node: fx.Node) -> list[tuple[str, type]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(module_path(path), cls) for path, cls in stack.values()]


def _block_candidates(node: fx.Node) -> list[tuple[str, int, type]]:
    """(container, index, class) for every `<container>.<int>` module the node ran inside."""
    out = []
    for path, cls in _stack_entries(node):
        head, _, tail = path.rpartition(".")
        if head and tail.isdigit():
            out.append((head, int(tail), cls))
    return out


def expect_module(obj: Any, doing: str, note: str = "") -> None:
    """A ``TypeError`` where ``obj`` is not an ``nn.Module``: "``doing`` an nn.Module``note``, not"
    what it is (a function by its name; a pipeline with the module to pass instead)."""
    if isinstance(obj, torch.nn.Module):
        return
    name = getattr(obj, "__qualname__", None)
    what = type(obj).__name__ + (f" {name!r}" if name else "")
    if isinstance(getattr(obj, "transformer", None), torch.nn.Module):
        what += " (a pipeline: pass its model, pipe.transformer)"
    raise TypeError(f"{doing} an nn.Module{note}, not {what}")


def is_torch_nn(cls: type) -> bool:
    """One of ``torch.nn``'s own classes: a list of those (``nn.Linear``s) is no stack of blocks."""
    return getattr(cls, "__module__", "").startswith("torch.nn")


def _members(nodes: list[fx.Node]) -> dict[str, dict[int, type]]:
    """Container path -> {index: class} of the ``<container>.<int>`` modules the nodes ran in."""
    members: dict[str, dict[int, type]] = {}
    for n in nodes:
        for head, idx, cls in _block_candidates(n):
            members.setdefault(head, {})[idx] = cls
    return members


def block_containers(gm: fx.GraphModule) -> set[str]:
    """The paths of the containers whose ``<container>.<int>`` modules ``gm``'s nodes ran in (any
    container: the caller knows which are stacks)."""
    return set(_members(list(gm.graph.nodes)))


def _find_stacks(nodes: list[fx.Node]) -> dict[str, int]:
    members = _members(nodes)
    stacks = {
        head: len(idx_cls)
        for head, idx_cls in members.items()
        if len(idx_cls) >= 2
        and len(set(idx_cls.values())) == 1
        and not is_torch_nn(next(iter(idx_cls.values())))
        and sorted(idx_cls) == list(range(len(idx_cls)))
    }
    # Blocks carry a stream: block i+1 reads (through any glue) what block i made. A list of
    # parallel layers, such as HiDream's per-caption projections, is not a stack.
    stacks = {h: k for h, k in stacks.items() if _is_chained(nodes, h, k)}
    if not stacks:
        return {}
    # A stack nested in another stack's block, or run inside a module of the prologue (HunyuanVideo's
    # token refiner), belongs to that module: depth is the number of modules that ran around the
    # stack's blocks. Containers that only hold (an nn.ModuleDict of stacks per modality, as in
    # Flux3's mode_blocks["image"]) never run, and do not count.
    depth = {h: _depth(nodes, h) for h in stacks}
    return {h: k for h, k in stacks.items() if depth[h] == min(depth.values())}


def _depth(nodes: list[fx.Node], head: str) -> int:
    return min(sum(1 for path, _ in _stack_entries(n) if path and head.startswith(path + "."))
               for n in nodes if any(h == head for h, _, _ in _block_candidates(n)))


def _skipped_blocks(nodes: list[fx.Node]) -> tuple[str, list[int]] | None:
    """A container of one block class whose traced indices have holes: the forward skipped some."""
    for head, idx_cls in _members(nodes).items():
        classes = set(idx_cls.values())
        if len(idx_cls) >= 2 and len(classes) == 1 and not is_torch_nn(next(iter(classes))):
            missing = sorted(set(range(max(idx_cls) + 1)) - set(idx_cls))
            if missing:
                return head, missing
    return None


def _skipped_message(head: str, missing: list[int]) -> str:
    return (f"blocks {missing} of {head} were not traced (a forward that skips layers, such as "
            "SD3's skip-layer guidance call): the stack is not whole, so this graph has no block "
            "boundary to cache at; the calls that run every block are cached as usual")


def check_whole_stacks(rmap: RegionMap, model: torch.nn.Module | None) -> None:
    """Raise ``NoBlockStructure`` where a stack ran fewer blocks than its container holds.

    The graph alone sees holes among the traced indices (``find_regions`` refuses those), not a
    forward that stops early: SD3's skip-layer guidance on its last layers traces blocks 0..k-1 of
    n, which pass for a whole stack of k. Cached as one, that call (its own batch, the guidance's
    third branch) alternates with the whole model's and starts a new generation at every call."""
    if model is None:
        return
    for head, count in rmap.stacks.items():
        try:
            container = model.get_submodule(head)
        except AttributeError:      # a path Dynamo spells otherwise: the graph's count stands
            continue
        whole = isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential))
        if whole and len(container) > count:
            raise NoBlockStructure(_skipped_message(head, list(range(count, len(container)))))


def outside_model(gm: fx.GraphModule, rmap: RegionMap) -> list[fx.Node]:
    """The nodes of ``gm`` computed outside the module whose forward runs the latent's blocks.

    Empty where that module is the one compiled (its own forward's nodes carry no module). Where
    torch.compile was given a function that calls the model (a whole denoising step: the model,
    then ``latent + dt * v``), the graph's outputs are the function's, not the model's, and a
    reuse rule of model outputs applied to them is wrong: the sampler would stall."""
    if not rmap.guarded:
        return []
    first = rmap.guarded[0]
    block = next((n for n in first.nodes if n.meta.get("nn_module_stack")), None)
    owner = _stack_entries(block)[0][0] if block is not None else None
    if owner is None or owner == f"{first.stack}.{first.index}":
        return []                   # no module ran around the blocks: the compiled one holds them
    return [n for n in _compute_nodes(gm)
            if not (_stack_entries(n) and _stack_entries(n)[0][0] == owner)]


def _is_chained(nodes: list[fx.Node], head: str, count: int) -> bool:
    last: dict[fx.Node, int] = {}        # highest block of `head` among a node's ancestors
    chained: set[int] = set()
    for n in nodes:
        own = next((i for h, i, _ in _block_candidates(n) if h == head), -1)
        deps = [last.get(u, -1) for u in n.all_input_nodes]
        if own >= 1 and own - 1 in deps:
            chained.add(own)
        last[n] = max([own, *deps])
    return chained >= set(range(1, count))


def _label(node: fx.Node, stacks: dict[str, int]) -> tuple[str, int] | None:
    for head, idx, _ in _block_candidates(node):
        if head in stacks:
            return head, idx
    return None


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def find_regions(gm: fx.GraphModule) -> RegionMap:
    """Partition ``gm``'s nodes into prologue, blocks of each stack, glue and epilogue.

    Raises ``NoBlockStructure`` when there is no stack, or when block nodes interleave in a way
    that contiguous regions cannot express.
    """
    constants = [n.target for n in gm.graph.find_nodes(op="get_attr")
                 if isinstance(getattr(gm, n.target, None), torch.Tensor)]
    if constants:
        # Where weights are inputs, stack-mates are one graph and the runtime finds the model's
        # cache state by them; as constants each block is a graph of its own weights.
        settings = [f"torch.{name}=True" for name, on in (
            ("_inductor.config.freezing", torch._inductor.config.freezing),
            ("_dynamo.config.prepare_freezing", torch._dynamo.config.prepare_freezing),
            ("_dynamo.config.install_free_tensors", torch._dynamo.config.install_free_tensors))
            if on] or ["a setting of Dynamo's"]
        raise NoBlockStructure(
            f"the graph holds {len(constants)} tensors as constants ({constants[0]}, ...), not as "
            f"inputs: {' and '.join(settings)} installs the model's weights into the graph; "
            "unset it (torch's default) to cache")
    nodes = _compute_nodes(gm)
    stacks = _find_stacks(nodes)
    if not stacks and (gaps := _skipped_blocks(nodes)):
        raise NoBlockStructure(_skipped_message(*gaps))
    if not stacks and gm.graph.find_nodes(
            op="call_function", target=torch.ops.higher_order.tag_activation_checkpoint):
        raise NoBlockStructure(
            "gradient checkpointing wraps the blocks, each one opaque call (diffusers checkpoints "
            "where grad is enabled): call the model under torch.no_grad() or "
            "torch.inference_mode(), as diffusers' pipelines do, or disable_gradient_checkpointing()")
    if not stacks:
        raise NoBlockStructure(
            "no nn.ModuleList of two or more identical blocks was traced; a model compiled block by "
            "block (diffusers' compile_repeated_blocks) or one without a transformer stack has no "
            "step, cfg or block boundary to cache at")

    # Label each node with its block; nodes outside every block (loop glue, views on the stream)
    # that sit between two runs of one block join that block.
    labels = [_label(n, stacks) for n in nodes]
    runs: list[tuple[tuple[str, int] | None, list[fx.Node]]] = []
    for n, lab in zip(nodes, labels):
        if runs and runs[-1][0] == lab:
            runs[-1][1].append(n)
        else:
            runs.append((lab, [n]))
    merged: list[tuple[tuple[str, int] | None, list[fx.Node]]] = []
    for lab, run in runs:
        if (lab is not None and len(merged) >= 2 and merged[-1][0] is None
                and merged[-2][0] == lab):
            gap = merged.pop()[1]
            merged[-1][1].extend(gap + run)
        elif merged and merged[-1][0] == lab:
            merged[-1][1].extend(run)
        else:
            merged.append((lab, run))

    seen: set[tuple[str, int]] = set()
    for lab, _ in merged:
        if lab is None:
            continue
        if lab in seen:
            raise NoBlockStructure(f"the nodes of block {lab[0]}.{lab[1]} are interleaved with other "
                                   "blocks' nodes, so it is not one contiguous region")
        seen.add(lab)

    regions: list[Region] = []
    n_block_runs = sum(lab is not None for lab, _ in merged)
    blocks_seen = 0
    glue = 0
    for lab, run in merged:
        if lab is not None:
            regions.append(Region(f"{lab[0]}.{lab[1]}", BLOCK, run, lab[0], lab[1]))
            blocks_seen += 1
        elif blocks_seen == 0:
            regions.append(Region(PROLOGUE, PROLOGUE, run))
        elif blocks_seen == n_block_runs:
            regions.append(Region(EPILOGUE, EPILOGUE, run))
        else:
            regions.append(Region(f"glue.{glue}", GLUE, run))
            glue += 1

    traced = {h: sum(1 for r in regions if r.stack == h) for h in stacks}
    roles, rule = identify_inputs(gm)
    rmap = RegionMap(regions, traced, roles, rule)
    rmap.streams = {h: [_shape(n) for n in carried] for h, carried in residual_streams(rmap).items()}
    rmap.latent_stacks = latent_stacks(gm, roles.get("latent"), list(traced))
    if "latent" in roles:
        rmap.samples, rmap.sample_outs, rmap.samples_why = sample_list(gm, roles["latent"])
    if rmap.samples and "text" not in roles:
        rmap.texts = text_list(gm, rmap.samples)
        if rmap.texts:
            roles["text"] = rmap.texts[0]
    rmap.conditions = conditions(gm, rmap)
    return rmap


def latent_stacks(gm: fx.GraphModule, latent: str | None, stacks: list[str]) -> list[str]:
    """The stacks whose blocks read values computed from the latent (through tensors; a shape
    read off the latent does not count). A stack over the text alone (Kandinsky 5's text blocks,
    Lumina 2's context refiner) says nothing of how the latent moves, so the block guard's probe
    must not sit there. All stacks where the latent is not known."""
    reached = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name == latent}
    for n in gm.graph.nodes:
        if (n not in reached and any(u in reached for u in n.all_input_nodes)
                and any(isinstance(v, torch.Tensor)
                        for v in pytree.tree_leaves(n.meta.get("example_value")))):
            reached.add(n)
    counts = dict.fromkeys(stacks, 0)
    hit = {lab[0] for n in reached if (lab := _label(n, counts))}
    return [h for h in stacks if h in hit] or list(stacks)


def _shape(n: fx.Node) -> tuple[int | str, ...]:
    """Static sizes as ints, symbolic ones (dynamic shapes) by their expression."""
    v = n.meta.get("example_value")
    if not isinstance(v, torch.Tensor):
        return ()
    return tuple(d if isinstance(d, int) else str(d) for d in v.shape)


def _known_same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both tensors, of sizes known equal: under dynamic shapes an output's sizes are
    expressions of the inputs' symbols (Z-Image's unpatchified ``s8 // 2 * 2``), equal to them
    only as far as the shape environment can tell without a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    x, y = a.meta.get("example_value"), b.meta.get("example_value")
    return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == y.dim()
            and all(statically_known_true(p == q) for p, q in zip(x.shape, y.shape)))


def dataflow(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's def-use edges as a networkx DiGraph over nodes."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for u in n.all_input_nodes:
            g.add_edge(u, n)
    return g


def residual_streams(rmap: RegionMap) -> dict[str, list[fx.Node]]:
    """For each stack, the tensors block 0 leaves to block 1: the residual stream(s) it carries.

    A tensor is a stream when block 0 defines it and block 1 reads it, directly or through nodes
    outside the stack (glue between the blocks, or the blocks of another stack interleaved with
    this one, as Latte's spatial and temporal blocks are). Taking them from the first pair
    suffices because blocks of one stack have one signature. Sizes a block passes on (the text
    length HunyuanVideo 1.5's masks select, known only at run time) are not streams.
    """
    owner = {n: r for r in rmap.blocks for n in r.nodes}
    first: dict[str, dict[int, Region]] = {}
    for r in rmap.blocks:
        if r.index is not None and r.index < 2:
            first.setdefault(r.stack, {})[r.index] = r
    out: dict[str, list[fx.Node]] = {}
    for stack, pair in first.items():
        if len(pair) < 2:
            continue
        defined, carried, seen = set(pair[0].nodes), [], set()
        todo = [u for n in pair[1].nodes for u in n.all_input_nodes if owner.get(u) is not pair[1]]
        while todo:
            u = todo.pop(0)
            if u in seen:
                continue
            seen.add(u)
            if u in defined:
                if isinstance(u.meta.get("example_value"), torch.Tensor):
                    carried.append(u)
            elif u not in owner or owner[u].stack != stack:
                todo.extend(u.all_input_nodes)
        out[stack] = carried
    return out


# ---------------------------------------------------------------------------------------------
# Which graph inputs are the latent, the timestep and the text condition.

# Inputs by the names diffusers gives them, the first found of each role's list. The condition is
# the text embedding, the class labels of class-conditional DiTs (DiTPipeline batches them with
# the null class for guidance, as others batch the text), or the prompt's token ids where the
# model embeds them itself (Cosmos 3 Omni, OmniGen): compared by value like the others, and never
# to be guessed by dataflow, which takes the largest float input (OmniGen's attention mask).
_ROLE_NAMES = {"latent": ("hidden_states",), "timestep": ("timestep",),
               "text": ("encoder_hidden_states", "class_labels", "input_ids")}


def missing_inputs(roles: dict[str, str]) -> str | None:
    """Why nothing can be cached where the latent or the timestep input was not found, or None.
    The reuse rules need both: the timestep orders steps and generations, the latent's change is
    what the estimates measure."""
    missing = {"latent", "timestep"} - set(roles)
    if not missing:
        return None
    hint = (" (a timestep given as a Python number is a constant of the graph, not an input: pass "
            "it as a tensor, as diffusers' pipelines do; a module called with no timestep, such "
            "as a transformer inside a U-Net's blocks, has none to cache by)"
            if "timestep" in missing else "")
    return f"could not tell which input is the {' and the '.join(sorted(missing))}{hint}"


_ELEMENT = re.compile(r"^(.*)\[(\d+)\]$")


def _list_element(n: fx.Node) -> tuple[str, int] | None:
    """(the list, the index) where a placeholder is an element of a list argument; None for
    any other, an element of the frame's ``*args`` among them (a forward traced through a
    wrapper or a diffusers hook, ``L['args'][0]``, is a positional argument, not a sample)."""
    m = _ELEMENT.match(source_name(n))
    if m is None:
        return None
    base = getattr(getattr(n.meta.get("grapharg"), "source", None), "base", None)
    # torch >= 2.13 marks the varargs source; older ones by the name every wrapper gives it.
    if getattr(base, "is_varargs", False) or getattr(base, "local_name", None) == "args":
        return None
    return m.group(1), int(m.group(2))


def sample_list(gm: fx.GraphModule, latent: str) -> tuple[list[str], list[int], str | None]:
    """Where the latent is one element of a list of per-sample tensors (ZImagePipeline passes one
    latent of [C, F, H, W] per sample, the batch being the list): the list's placeholders in
    order, the positions among the output's tensors of the per-sample outputs, and why the
    samples cannot be stacked into one batch (None where they can).

    The runtime decides per sample along dim 0 of the latent and the output: on an element of
    such a list that dim is the channels, and a sample would take some channels from one step
    and the rest from another. Stacked, dim 0 is the list again. Not a list element: ``[]``."""
    ins = user_inputs(gm)
    where = _list_element(next(n for n in ins if n.name == latent))
    if where is None:
        return [], [], None
    nested = None
    if _ELEMENT.match(where[0]):
        # Z-Image Omni's ``x=[[condition image, ..., noisy latent], ...]``: which element is a
        # sample's latent, and which a clean condition, the dataflow alone does not tell; one
        # sample's list of one latent is a list of per-sample tensors as any other.
        nested = (f"the latent comes as an element of a list of lists ({where[0]}[{where[1]}]), "
                  "per sample its condition images, if any, and its noisy latent, which cannot be "
                  "decided on as one batch")
    elements = {}
    for n in ins:
        k = _list_element(n)
        if k is not None and k[0] == where[0]:
            elements[k[1]] = n
    order = [elements[i] for i in sorted(elements)]
    if len({n.meta["example_value"].dim() for n in order}) > 1:
        return [], [], None     # arguments of a wrapper's *args that torch < 2.13 does not mark
    names = [n.name for n in order]
    shapes = {_shape(n) for n in order}
    if len(shapes) > 1 and all(isinstance(d, int) for sh in shapes for d in sh):
        return names, [], nested or (
            f"the latent comes as a list of {len(order)} per-sample tensors of different shapes "
            f"{sorted(map(str, shapes))}, which cannot be decided on as one batch")
    # Symbolic sizes (dynamic shapes) may be equal or not at a call: the runtime stacks the
    # samples where they are, and computes the call uncached where they are not.
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [x for x in pytree.tree_leaves(out.args[0]) if isinstance(x, fx.Node)]
    outs = [j for j, x in enumerate(leaves) if _known_same_shape(x, order[0])]
    if len(outs) != len(order):
        # Under dynamic shapes an output's sizes are expressions the shape environment may not
        # equate with the latent's (Z-Image's unpatchified 2 * (s8 // 2)): then the one list in
        # the output of as many tensors as samples, each of the latent's rank.
        rank = order[0].meta["example_value"].dim()
        lists = [[leaves.index(x) for x in c] for c in _containers(out.args[0])
                 if len(c) == len(order) and all(
                     isinstance(x, fx.Node) and isinstance(x.meta.get("example_value"), torch.Tensor)
                     and x.meta["example_value"].dim() == rank for x in c)]
        outs = lists[0] if len(lists) == 1 else outs
    if len(outs) != len(order) or sorted(elements) != list(range(len(order))):
        return names, [], nested or (
            f"the latent comes as a list of {len(order)} per-sample tensors, and the output has "
            f"{len(outs)} tensor(s) like them: which output is which sample's is unknown")
    return names, outs, None


def text_list(gm: fx.GraphModule, samples: list[str]) -> list[str]:
    """Beside a latent list, the text condition as a list of as many [tokens, dim] tensors
    (Z-Image's captions, each of its own length), the largest such list; ``[]`` if none."""
    lists: dict[str, dict[int, fx.Node]] = {}
    for n in user_inputs(gm):
        k = _list_element(n)
        if k is not None and n.name not in samples:
            lists.setdefault(k[0], {})[k[1]] = n
    val = {n: n.meta["example_value"] for e in lists.values() for n in e.values()}
    found = [[e[i] for i in sorted(e)] for e in lists.values()
             if sorted(e) == list(range(len(samples)))
             and all(val[n].dim() == 2 and val[n].is_floating_point() for n in e.values())]
    if not found:
        return []
    def size(ns: list[fx.Node]) -> int:     # a symbolic size counts one: only the order matters
        return sum(val[n].numel() if isinstance(val[n].numel(), int) else 1 for n in ns)
    return [n.name for n in max(found, key=size)]


def _containers(tree: Any) -> list[list[Any]]:
    """The lists and tuples in a graph's output structure, each as its elements."""
    if isinstance(tree, (list, tuple)):
        return [list(tree)] + [c for x in tree for c in _containers(x)]
    if isinstance(tree, dict):
        return [c for x in tree.values() for c in _containers(x)]
    return []


def conditions(gm: fx.GraphModule, rmap: RegionMap) -> list[str]:
    """The floating-point call arguments beside the latent, the timestep and the text: the other
    conditions a pipeline passes (ControlNet residuals, pooled text, image embeddings, guidance).
    Most hold still through a generation; a pipeline may switch one at a step (ControlNet's
    ``control_guidance_end`` zeroes its residuals), which the output's history cannot foresee.

    Left out: inputs a sinusoid is taken of (a second timestep, such as ACE-Step's or a mean-flow
    model's ``timestep_r``, and position ids), and inputs of an output's shape (a second latent,
    such as LTX-2's audio): both move with the sampler at every step, by design."""
    taken = {*rmap.inputs.values(), *rmap.samples, *rmap.texts}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out_shapes = {_shape(o) for o in out.all_input_nodes}
    candidates = [n for n in user_inputs(gm) if n.name not in taken
                  and n.meta["example_value"].is_floating_point()
                  and (n.meta["example_value"].dim() == 0 or _shape(n) not in out_shapes)]
    if not candidates:
        return []
    sinusoid = _sinusoid_sources(gm)
    return [n.name for n in candidates if n not in sinusoid]


def _is_trig(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_function", "call_method") and name in ("sin", "cos")


def _sinusoid_sources(gm: fx.GraphModule) -> set[fx.Node]:
    """Every node a sin or cos is computed from (timestep embeddings, rotary tables)."""
    g = dataflow(gm)
    return {a for n in gm.graph.nodes if _is_trig(n) for a in nx.ancestors(g, n)}


# A module's buffer or parameter, whatever the module is reached by: ``self``, or the ``module``
# argument of a hook's wrapper around the forward (accelerate's offload hook added before compiling).
_MODULE_STATE = re.compile(r"\._(buffers|parameters)\[")


def user_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Tensor placeholders that are call arguments, not the model's parameters or buffers."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not isinstance(n.meta.get("example_value"), torch.Tensor):
            continue
        src = source_name(n)
        if not (src.startswith("L['self']") or src.startswith("self") or _MODULE_STATE.search(src)
                or isinstance(getattr(n.meta.get("grapharg"), "example", None), torch.nn.Parameter)):
            out.append(n)
    return out


def source_name(n: fx.Node) -> str:
    """Where Dynamo took a placeholder from (``L['hidden_states']``, ``L['self']...``)."""
    ga = n.meta.get("grapharg")
    src = getattr(getattr(ga, "source", None), "name", n.name)
    return src() if callable(src) else src


def named_inputs(gm: fx.GraphModule) -> dict[str, str]:
    """The roles ("latent", "timestep", "text") whose argument the graph takes by the name
    diffusers gives it, mapped to placeholder names."""
    ins = user_inputs(gm)
    roles: dict[str, str] = {}
    for role, names in _ROLE_NAMES.items():
        found = {kw: n.name for kw in names for n in ins
                 if re.search(rf"\['{kw}'\]$", source_name(n))}
        if found:
            roles[role] = next(found[kw] for kw in names if kw in found)
    return roles


def identify_inputs(gm: fx.GraphModule) -> tuple[dict[str, str], str]:
    """Map roles ("latent", "timestep", "text") to placeholder names, and say by which rule."""
    ins = user_inputs(gm)
    roles = named_inputs(gm)
    if len(roles) == len(_ROLE_NAMES):
        return roles, "names"

    # Positional call: fall back to dataflow and shapes.
    taken = set(roles.values())
    free = [n for n in ins if n.name not in taken]
    val = {n: n.meta["example_value"] for n in free}
    sinusoid = _sinusoid_sources(gm)
    if "timestep" not in roles:
        # The timestep is the smallest input a sinusoid (sin/cos) is taken of: rotary embeddings
        # take theirs of position ids (Flux's, as ``freqs.cos()``), which are larger.
        cands = [n for n in free if val[n].dim() <= 2 and n in sinusoid]
        if cands:
            roles["timestep"] = min(cands, key=lambda n: (val[n].dim(), val[n].numel())).name
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_shapes = {_shape(o) for o in out_node.all_input_nodes}
    rest = [n for n in free if n.name not in roles.values() and val[n].is_floating_point()
            and val[n].dim() >= 3]
    if "latent" not in roles and rest:
        same = [n for n in rest if _shape(n) in out_shapes]
        roles["latent"] = max(same or rest, key=lambda n: val[n].numel()).name
    # Not position ids: those feed the rotary tables' sin and cos (HiDream's patchified img_ids,
    # (batch, tokens, 3), more numbers than a tiny text), a text embedding never does.
    # Nor a ControlNet's residuals (Z-Image's controlnet_block_samples, a dict of [B, L, D]),
    # added inside the blocks: taken for the text, each call's drift read as a new prompt.
    rest = [n for n in rest if n.name not in roles.values() and val[n].dim() == 3
            and n not in sinusoid and "controlnet" not in source_name(n).lower()]
    if "text" not in roles and rest:
        roles["text"] = max(rest, key=lambda n: val[n].numel()).name
    return roles, "dataflow"
