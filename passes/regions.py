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
timestep and the text condition (and the samples of a latent list, the other conditions) is
``passes.inputs``' answer, which ``find_regions`` records in the map.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..checks import is_torch_nn
from .nesting import original_class
from .inputs import _shape, conditions, identify_inputs, sample_list, text_list

PROLOGUE, BLOCK, GLUE, EPILOGUE = "prologue", "block", "glue", "epilogue"


class NoBlockStructure(Exception):
    """The graph has no repeated block stack that the region pass can use."""


@dataclass
class Region:
    """One region of a graph: its nodes, contiguous in graph order (``find_regions`` makes it;
    ``split`` makes it a piece of its own)."""
    name: str                      # "prologue", "blocks.3", "glue.0", "epilogue"
    kind: str                      # PROLOGUE | BLOCK | GLUE | EPILOGUE
    nodes: list[fx.Node]
    stack: str | None = None       # e.g. "blocks"; set for kind == BLOCK
    index: int | None = None       # position in its stack


@dataclass
class RegionMap:
    """What the region pass found in a graph (``find_regions``): its regions, which cover every
    node once, the block stacks and their residual streams, and which graph inputs play which
    role. Read by ``split``, the backend, explain and export."""
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
    # A nested block (passes.nesting) by the class it stands in for: a block put into a nested
    # stack afterwards (built anew, not copied from a nested one) is of the same kind.
    return [(module_path(path), original_class(cls) if isinstance(cls, type) else cls)
            for path, cls in stack.values()]


def _block_candidates(node: fx.Node) -> list[tuple[str, int, type]]:
    """(container, index, class) for every `<container>.<int>` module the node ran inside."""
    out = []
    for path, cls in _stack_entries(node):
        head, _, tail = path.rpartition(".")
        if head and tail.isdigit():
            out.append((head, int(tail), cls))
    return out


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
    reached = {n for n in gm.graph.find_nodes(op="placeholder") if n.name == latent}
    for n in gm.graph.nodes:
        if (n not in reached and any(u in reached for u in n.all_input_nodes)
                and any(isinstance(v, torch.Tensor)
                        for v in pytree.tree_leaves(n.meta.get("example_value")))):
            reached.add(n)
    counts = dict.fromkeys(stacks, 0)
    hit = {lab[0] for n in reached if (lab := _label(n, counts))}
    return [h for h in stacks if h in hit] or list(stacks)


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
