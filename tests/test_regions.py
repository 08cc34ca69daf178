"""The region pass on diffusers' own DiTs and on random DiT-like modules."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dit_compile
from conftest import capture
from dit_compile import inductor
from dit_compile.passes.regions import BLOCK, EPILOGUE, PROLOGUE, NoBlockStructure, find_regions
from dit_compile.passes.split import graph_signature, pruned_twins, split
from dit_compile.runtime.executor import Executor, kept_outputs
import random_dits
import tiny_models

EXPECTED = {
    "wan": {"blocks": 3},
    "flux": {"transformer_blocks": 2, "single_transformer_blocks": 2},
    "hunyuan": {"transformer_blocks": 2, "single_transformer_blocks": 2},
    "flux3": {"txt_mode_blocks": 2, "mode_blocks.image": 2, "single_transformer_blocks": 2},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_diffusers_models_regions(name):
    model, kw = tiny_models.MODELS[name]()
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.fallback is None
    assert report.stacks == EXPECTED[name]
    assert set(report.inputs) == {"latent", "timestep", "text"}
    assert report.input_rule == "names"
    kinds = [r for r, _ in report.regions]
    assert kinds[0] == PROLOGUE and kinds[-1] == EPILOGUE
    assert set(report.streams) == set(report.stacks)
    for stack, shapes in report.streams.items():
        assert shapes and all(len(s) == 3 for s in shapes), (stack, shapes)


def test_streams_of_stacks_separated_by_glue():
    """HiDream's double-stream blocks hand their streams to the single-stream ones through glue
    (a concat), and each single block's output passes through glue to the next."""
    model, kw = tiny_models.hidream()
    dit_compile.lower_moe(model)
    # Its one graph under fullgraph=True (without, unpatchify's .item() ends the graph early).
    rmap = find_regions(capture(model, kw))
    assert rmap.streams == {"double_stream_blocks": [(1, 64, 32), (1, 24, 32)],
                              "single_stream_blocks": [(1, 88, 32)]}


def test_position_ids_are_not_taken_for_the_text():
    """By dataflow the text is the largest 3-d float input left, but never position ids, which feed
    the rotary tables' sin and cos: HiDream's patchified ``img_ids`` (1, 64, 3) hold more numbers
    than its tiny T5 text (1, 8, 8), and its ``timesteps`` is no name diffusers' rule knows."""
    model, kw = tiny_models.hidream(patchified=True)
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.input_rule == "dataflow"
    assert report.inputs == {"latent": "l_kwargs_hidden_states_", "timestep": "l_kwargs_timesteps_",
                             "text": "l_kwargs_encoder_hidden_states_t5_"}
    assert kw["img_ids"].numel() > kw["encoder_hidden_states_t5"].numel()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_diffusers_models_stitched_equal_eager(name):
    model, kw = tiny_models.MODELS[name]()
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        compiled = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None},
                                 fullgraph=True)
        out = compiled(**kw, return_dict=False)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


POSITIONAL = {  # the keywords in the forward's order, and where each role sits among them
    "wan": (("hidden_states", "timestep", "encoder_hidden_states"), (0, 1, 2)),
    # Flux's position ids feed sinusoids too (its rotary embedding), and its text holds more
    # numbers than its latent: the timestep is the smallest input a sin/cos reads, the latent
    # the input shaped like the output.
    "flux": (("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
              "img_ids", "txt_ids"), (0, 3, 1)),
}


@pytest.mark.parametrize("name", sorted(POSITIONAL))
def test_positional_call_identifies_inputs_by_dataflow(name):
    model, kw = tiny_models.MODELS[name]()
    if not hasattr(type(model).forward, "__wrapped__"):
        pytest.skip("this diffusers does not wrap the forward: a positional call keeps its names")
    order, (latent, timestep, text) = POSITIONAL[name]
    report = dit_compile.explain(model, *(kw[k] for k in order), return_dict=False)
    assert report.input_rule == "dataflow"
    assert report.inputs == {"latent": f"l_args_{latent}_", "timestep": f"l_args_{timestep}_",
                             "text": f"l_args_{text}_"}
    # Elements of the wrapper's *args, not a list of per-sample latents (Z-Image's): cached.
    assert report.samples == 0 and report.fallback is None, report


def _check_partition(gm, rmap):
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    owners = {}
    for i, region in enumerate(rmap.regions):
        for n in region.nodes:
            assert n not in owners, f"{n} in two regions"
            owners[n] = i
    assert set(owners) == set(compute), "some node is in no region"
    # Regions are contiguous in graph order and appear in order.
    order = [owners[n] for n in compute]
    assert order == sorted(order)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_dits.specs(), st.booleans())
def test_random_dits_partition_and_stitch(spec, nested):
    """``nested``: the blocks as nested compile regions (``nest_blocks``, every block of each
    stack, held in an nn.ModuleList or an nn.Sequential), which split inlines into the pieces: the
    same partition, and the same outputs."""
    model, kw = random_dits.build(spec)
    if nested:
        assert dit_compile.nest_blocks(model) == sum(spec.depths)
    gm = capture(model, kw)
    rmap = find_regions(gm)
    _check_partition(gm, rmap)
    stacks = {"blocks": spec.depths[0]}
    if len(spec.depths) > 1:
        stacks["single_blocks"] = spec.depths[1]
    assert rmap.stacks == stacks
    assert rmap.inputs["latent"] and rmap.inputs["timestep"] and rmap.inputs["text"]
    assert sum(r.kind == BLOCK for r in rmap.regions) == sum(spec.depths)

    plan = split(gm, rmap)
    invoke = torch.ops.higher_order.invoke_subgraph
    assert not any(n.target is invoke for p in plan.pieces for n in p.module.graph.nodes)
    run = Executor(plan, [p.module for p in plan.pieces])
    inputs = gm.inputs
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs), gm(*inputs), rtol=0, atol=0)
        torch.testing.assert_close(run(*inputs)[0], model(**kw)[0], rtol=1e-6, atol=1e-6)

    # A last block whose text output nothing reads (one stack of two-stream blocks) runs its
    # first mate's graph and keeps the image output; every other block is its mates' graph.
    twins = pruned_twins(plan)
    blocks = [i for i, p in enumerate(plan.pieces) if p.region.kind == BLOCK]
    alone = spec.two_streams and len(spec.depths) == 1 and spec.depths[0] > 1
    assert twins == ({blocks[-1]: (blocks[0], (0,))} if alone else {})
    fns = [p.module for p in plan.pieces]
    for i, (mate, keep) in twins.items():
        fns[i] = kept_outputs(plan.pieces[mate].module, keep, plan.pieces[i].single)
    with torch.no_grad():
        torch.testing.assert_close(Executor(plan, fns)(*inputs), gm(*inputs), rtol=0, atol=0)


def test_identical_blocks_share_one_signature():
    model, kw = tiny_models.wan(layers=4)
    plan = split(gm := capture(model, kw), find_regions(gm))
    sigs = [p.signature() for p in plan.pieces if p.region.kind == BLOCK]
    assert len(sigs) == 4 and len(set(sigs)) == 1


def test_blocks_with_different_shapes_do_not_share():
    spec = random_dits.Spec(dim=8, depths=(2, 2), cross_attn=True, adaln=True, gated=True,
                            two_streams=True, extra_input=False, batch=1, tokens=4)
    model, kw = random_dits.build(spec)
    plan = split(gm := capture(model, kw), find_regions(gm))
    by_stack = {}
    for p in plan.pieces:
        if p.region.kind == BLOCK:
            by_stack.setdefault(p.region.stack, set()).add(p.signature())
    assert len(by_stack["blocks"]) == 1 and len(by_stack["single_blocks"]) == 1
    assert by_stack["blocks"] != by_stack["single_blocks"]


def _cogvideox():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    return pipelines.cogvideox_transformer(layers=3), dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8), encoder_hidden_states=torch.randn(1, 16, 32),
        timestep=torch.tensor([500]))


# model -> (the stack whose last block only some outputs of are read, the block of it that block
# shares, the blocks of it that copy strided inputs dense to share another's compile)
LAST_BLOCKS = {
    "flux": (tiny_models.flux, "single_transformer_blocks", 0, []),
    # The first single-stream block is handed the double stream's strided tokens: a dense twin of
    # the second, which the last one shares.
    "hunyuan": (lambda: tiny_models.hunyuan(single_layers=3), "single_transformer_blocks", 1, [0]),
    "cogvideox": (_cogvideox, "transformer_blocks", 0, []),
    # At batch 2 every single-stream block after the first is handed slices of the one before:
    # one graph for all of them (no dense copy for the second), which the last one shares.
    "flux, batch 2": (lambda: tiny_models.flux(batch=2, single_layers=4),
                      "single_transformer_blocks", 1, []),
}


@pytest.mark.parametrize("name", sorted(LAST_BLOCKS))
def test_a_last_block_read_in_part_runs_its_mates_graph(name):
    """Only the image tokens of the last block of these stacks are read: Dynamo's graph of that
    block drops what computed nothing else (Flux, HunyuanVideo: the text half's slice) or just
    returns less (CogVideoX), and the block runs a mate's graph, keeping that output. Stitched
    so, the pieces compute exactly the graph."""
    factory, stack, mate_index, copying = LAST_BLOCKS[name]
    model, kw = factory()
    plan = split(gm := capture(model, kw), find_regions(gm))
    blocks = [i for i, p in enumerate(plan.pieces) if p.region.stack == stack]
    last = plan.pieces[blocks[-1]]
    assert len(last.outs) == 1 and last.signature() != plan.pieces[blocks[0]].signature()
    dense = inductor.dense_twins(plan)
    assert [blocks.index(i) for i in dense if i in blocks] == copying, dense
    twins = pruned_twins(plan, dense)
    assert list(twins) == [blocks[-1]] and twins[blocks[-1]][0] == blocks[mate_index], twins
    fns = [p.module for p in plan.pieces]
    mate, keep = twins[blocks[-1]]
    fns[blocks[-1]] = kept_outputs(plan.pieces[mate].module, keep, last.single)
    with torch.no_grad():
        torch.testing.assert_close(Executor(plan, fns)(*gm.inputs), gm(*gm.inputs), rtol=0, atol=0)


class WidthBlock(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, hidden), torch.nn.Linear(hidden, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class WidthNet(torch.nn.Module):
    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(WidthBlock(h) for h in widths)

    def forward(self, hidden_states):
        for b in self.blocks:
            hidden_states = b(hidden_states)
        return hidden_states


def test_blocks_of_one_graph_but_other_weight_shapes_do_not_share():
    """Blocks of one class whose MLPs are of other widths trace to the same ops and wiring; only
    the shapes of their weights (graph inputs) differ. A compiled piece is specialised to its
    inputs' shapes, so those blocks must not share one."""
    model = WidthNet((16, 16, 32))
    plan = split(gm := capture(model, {"hidden_states": torch.randn(1, 4, 8)}), find_regions(gm))
    sigs = [p.signature() for p in plan.pieces if p.region.kind == BLOCK]
    assert len(sigs) == 3 and sigs[0] == sigs[1] != sigs[2]



class ScaleBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.scale = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x + self.lin(x) * self.scale


def test_blocks_of_one_graph_but_other_weight_dtypes_do_not_share():
    """A block whose weight is of another dtype (one kept in float64 where the others are
    float32) traces to the same ops and wiring as the others; a piece compiled for float32
    inputs would read it as float32. Those blocks must not share one compile."""
    model = WidthNet(())
    model.blocks = torch.nn.ModuleList(ScaleBlock() for _ in range(3))
    model.blocks[2].scale.data = model.blocks[2].scale.data.double()
    plan = split(gm := capture(model, {"hidden_states": torch.randn(1, 4, 8)}), find_regions(gm))
    sigs = [p.signature() for p in plan.pieces if p.region.kind == BLOCK]
    assert len(sigs) == 3 and sigs[0] == sigs[1] != sigs[2]


class SlopeBlock(torch.nn.Module):
    def __init__(self, slope: float):
        super().__init__()
        self.lin, self.slope = torch.nn.Linear(8, 8), slope

    def forward(self, x):
        return x + torch.nn.functional.leaky_relu(self.lin(x), negative_slope=self.slope)


def test_blocks_differing_in_a_keyword_constant_do_not_share():
    """A per-block constant passed by keyword (``negative_slope=self.slope``) is part of the
    function the block computes, as a positional one is: blocks differing only there must not
    share one compiled piece, or every block runs the first one's slope."""
    torch.manual_seed(0)
    model = WidthNet(()).eval()
    model.blocks = torch.nn.ModuleList(SlopeBlock(s) for s in (0.01, 0.5, 0.5))
    kw = {"hidden_states": torch.randn(1, 4, 8)}
    plan = split(gm := capture(model, kw), find_regions(gm))
    sigs = [p.signature() for p in plan.pieces if p.region.kind == BLOCK]
    assert len(sigs) == 3 and sigs[0] != sigs[1] == sigs[2]
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})
    with torch.no_grad():
        torch.testing.assert_close(f(**kw), model(**kw))


def test_constants_inside_a_piece_are_told_apart_by_value():
    """A tensor constant baked into a piece (``get_attr``) is part of the function it computes."""
    def traced(value):
        class Scaled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.c = torch.full((4,), value)

            def forward(self, x):
                return x * self.c
        return torch.fx.symbolic_trace(Scaled())
    one, two, other = traced(1.0), traced(1.0), traced(2.0)
    assert any(n.op == "get_attr" for n in one.graph.nodes)
    assert graph_signature(one, []) == graph_signature(two, []) != graph_signature(other, [])


def test_block_guard_sits_in_the_stacks_the_latent_flows_through():
    """Kandinsky 5 runs a text-only stack before the visual one: its residual never sees the
    latent, so First-Block-Cache probing there would reuse the span on a brand-new latent."""
    model, kw = tiny_models.kandinsky5()
    rmap = find_regions(capture(model, kw))
    assert set(rmap.stacks) == {"text_transformer_blocks", "visual_transformer_blocks"}
    assert rmap.latent_stacks == ["visual_transformer_blocks"]
    f = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "first_block", "threshold": 0.05}})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (500.0, 499.0, 498.0):
            call = dict(kw, timestep=torch.full((1,), t), return_dict=False,
                        hidden_states=torch.randn(kw["hidden_states"].shape, generator=g))
            torch.testing.assert_close(f(**call)[0], model(**call)[0], rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(f)["reused"] == {}


@pytest.mark.parametrize("skipped", [[1], [2]], ids=["a middle block", "the last block"])
def test_a_call_that_skips_layers_falls_back_saying_so(skipped):
    """SD3's skip-layer guidance call leaves blocks out of the trace: that graph runs without
    caching (correctly), and the reason names the skipped blocks, not a missing stack. Skipping
    the last blocks leaves no hole in the traced indices: that trace passed for a whole stack of
    two, and its calls (batch 1, between the batched-CFG calls' batch 2) each started a new
    generation, so the forced schedule never applied."""
    model, kw = tiny_models.sd3(batch=2)
    report = dit_compile.explain(model, **kw, skip_layers=skipped, return_dict=False)
    assert f"blocks {skipped} of transformer_blocks were not traced" in report.fallback
    if skipped == [1]:      # the same model and call in both cases
        assert dit_compile.explain(model, **kw, return_dict=False).fallback is None
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2]}})
    outs = []
    with torch.no_grad(), pytest.warns(UserWarning, match="were not traced"):
        for t in (900.0, 700.0, 500.0):
            call = {**kw, "timestep": torch.full_like(kw["timestep"], t), "return_dict": False}
            outs.append(f(**call)[0])
            skip = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in call.items()}
            torch.testing.assert_close(f(**skip, skip_layers=skipped)[0],
                                       model(**skip, skip_layers=skipped)[0])
    assert [(r["generation"], r["action"]) for r in dit_compile.stats(f)["trace"]] == [
        (0, "compute"), (0, "compute"), (0, "step")]
    assert torch.equal(outs[2], outs[1])


def test_a_forward_that_stops_early_in_a_sequential_stack_falls_back_too():
    """A stack held in an nn.Sequential is as whole or not as one in an nn.ModuleList: a call
    that runs its first blocks only would pass for a whole stack of fewer blocks, and cached as
    one it would start a new generation at each call alternating with the full forward's."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, t):
            return x + self.lin(x) * t

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(Block(), Block(), Block())

        def forward(self, hidden_states, timestep, upto=3):
            t = timestep.sin()[:, None, None]
            for i in range(upto):
                hidden_states = self.blocks[i](hidden_states, t)
            return hidden_states

    torch.manual_seed(0)
    model = Net().eval()
    kw = dict(hidden_states=torch.randn(1, 4, 8), timestep=torch.ones(1))
    assert dit_compile.explain(model, **kw).fallback is None
    report = dit_compile.explain(model, **kw, upto=2)
    assert report.fallback and "blocks [2] of blocks were not traced" in report.fallback


class CondBlock(torch.nn.Module):
    """A block whose per-layer constant lives inside torch.cond's branches (a subgraph). An int:
    torch 2.15's Dynamo makes a float a symbol there, which torch.cond refuses."""

    def __init__(self, scale: int):
        super().__init__()
        self.lin, self.scale = torch.nn.Linear(8, 8), scale

    def forward(self, x, t):
        h = self.lin(x)
        return x + torch.cond(t.sum() > 0, lambda h: h * self.scale, lambda h: h / self.scale, (h,))


class CondNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(CondBlock(s) for s in (1, 2, 3))

    def forward(self, hidden_states, timestep):
        x = self.proj(hidden_states)
        for b in self.blocks:
            x = b(x, timestep)
        return self.out(x)


def test_blocks_differing_inside_a_subgraph_do_not_share():
    """Blocks equal but for a constant inside a subgraph (a torch.cond branch, a checkpointed
    body) are different functions: one compiled artifact for all of them would be wrong."""
    torch.manual_seed(0)
    model = CondNet().eval()
    kw = dict(hidden_states=torch.randn(1, 4, 8), timestep=torch.ones(1))
    plan = split(gm := capture(model, kw), find_regions(gm))
    assert len({p.signature() for p in plan.pieces if p.region.kind == BLOCK}) == 3
    f = torch.compile(model, backend="mixcache", fullgraph=True,
                      options={"regions": "eager", "cache": None})
    with torch.no_grad():
        torch.testing.assert_close(f(**kw), model(**kw))


class ConvNet(torch.nn.Module):
    """U-Net-like: down, middle, up with a skip; no repeated block list."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(torch.relu(self.mid(torch.relu(self.down(x))))) + x


@pytest.mark.parametrize("model,x", [
    (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
     torch.randn(2, 4)),
    (ConvNet(), torch.randn(1, 3, 8, 8)),
])
def test_no_block_structure_falls_back_with_warning(model, x):
    with pytest.raises(NoBlockStructure):
        gm = capture(model.eval(), {"x": x} if isinstance(model, ConvNet) else {"input": x})
        find_regions(gm)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.warns(UserWarning, match=rf"mixcache: {type(model).__name__}: no nn.ModuleList"):
        out = torch.compile(model, backend="mixcache")(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert dit_compile.explain(model, x).fallback


def test_block_level_graph_warns(recwarn):
    """compile_repeated_blocks hands the backend one block: no boundaries, a clear warning."""
    model, kw = tiny_models.wan(layers=2)
    model.compile_repeated_blocks(backend="mixcache")
    with torch.no_grad():
        model(**kw, return_dict=False)
    assert any("compile_repeated_blocks" in str(w.message) for w in recwarn.list)


def test_gradient_checkpointing_is_named_as_the_reason():
    """A frozen model called with grad enabled and gradient checkpointing on: diffusers wraps each
    block in a checkpoint, one opaque call. The warning named compile_repeated_blocks; it names
    the checkpointing and the way out, and the output is eager's."""
    model, kw = tiny_models.wan(layers=2)
    model.enable_gradient_checkpointing()
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match="gradient checkpointing wraps the blocks"):
        out = torch.compile(model, backend="mixcache", options={"regions": "eager"})(
            **kw, return_dict=False)[0]
    torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)


def test_computation_key_is_blind_to_sizes_inside_slices():
    """A recompile of one forward for other sizes keys as the static graph did, so its cache
    carries over (Qwen-Image, CogView4: a negative prompt of another length). Their text and
    rotary splits are slices, whose bounds become symbolic nodes: once keyed apart, a first
    generation lost a branch's cache at step 1 and came out otherwise than the same one later.
    An integer operand of arithmetic is a value: a hook's `out * 2` changed to `* 3` mid-generation
    recompiles, and that graph was handed the other's cached outputs."""
    from dit_compile.passes.split import computation_key

    def forward(x, text):
        return x[:, 1:x.shape[1] - 1] * 2.0 + text[:, :3].sum()

    keys = []
    for dynamic in (False, True):
        torch._dynamo.reset()
        torch.compile(forward, dynamic=dynamic, fullgraph=True,
                      backend=lambda gm, _: keys.append(computation_key(gm)) or gm.forward)(
            torch.randn(2, 9, 4), torch.randn(2, 7, 4))
    assert len(keys) == 2 and keys[0] == keys[1]
    torch._dynamo.reset()
    torch.compile(lambda x, text: x[:, 1:x.shape[1] - 1] * 3.0 + text[:, :3].sum(), fullgraph=True,
                  backend=lambda gm, _: keys.append(computation_key(gm)) or gm.forward)(
        torch.randn(2, 9, 4), torch.randn(2, 7, 4))
    assert keys[2] != keys[0]       # another scale baked in: another computation
    for k in (2, 3):                # an integer one too (a hook's `out * k`), not taken for a size
        torch._dynamo.reset()
        torch.compile(lambda x: x.reshape(-1) * k, fullgraph=True,
                      backend=lambda gm, _: keys.append(computation_key(gm)) or gm.forward)(
            torch.randn(2, 9, 4))
    assert keys[3] != keys[4]


def test_computation_key_tells_graphs_returning_other_values_apart():
    """A graph that computes the same ops but returns more of them (SANA-WM's refiner returns
    its keys and values besides the output) is another computation: a branch's cache of one
    is never handed to the other."""
    from dit_compile.passes.split import computation_key

    def one(x):
        y = x * 2.0
        return y + 1.0

    def both(x):
        y = x * 2.0
        return y + 1.0, y

    keys = []
    for fn in (one, one, both):
        torch._dynamo.reset()
        torch.compile(fn, fullgraph=True,
                      backend=lambda gm, _: keys.append(computation_key(gm)) or gm.forward)(
            torch.randn(2, 4))
    assert keys[0] == keys[1] != keys[2]


def test_residual_sources_find_the_stream_on_either_side_of_the_add():
    """A block's output is a residual update of the argument reached through residual adds and
    casts, ``.to(dtype)`` among them (a block computing its residual in float32): the stream may
    be either operand (``x + f(x)``, ``attn(txt) + txt``)."""
    from dit_compile.passes.split import residual_sources

    class Block(torch.nn.Module):
        def forward(self, x, txt):
            return x + torch.tanh(x), (torch.tanh(txt) + txt.float()).type_as(txt)

    class ToBlock(torch.nn.Module):
        def forward(self, x, txt):
            return ((x.float() + torch.tanh(x)).to(x.dtype),
                    (torch.tanh(txt) + txt).to(torch.float32))

    assert residual_sources(torch.fx.symbolic_trace(Block())) == [0, 1]
    assert residual_sources(torch.fx.symbolic_trace(ToBlock())) == [0, 1]


def test_output_keys_tell_the_same_computation_of_other_arguments_apart():
    """An output's key is the computation behind it from the block's arguments by position: a
    block that updates two streams alike (one shape, one computation) still keys each stream's
    output apart, so that reuse pairs each stream with itself."""
    from dit_compile.passes.split import output_keys

    class Block(torch.nn.Module):
        def forward(self, x, txt):
            return x + torch.tanh(x), txt + torch.tanh(txt)

    keys = output_keys(torch.fx.symbolic_trace(Block()))
    again = output_keys(torch.fx.symbolic_trace(Block()))
    assert keys == again and keys[0] != keys[1]


def test_a_controlnets_residuals_are_conditions_not_the_text():
    """Z-Image as ZImageControlNetPipeline calls it: its text comes as a list (no name diffusers'
    other models use), and its ControlNet's residuals as a dict of [B, L, D]: the dataflow rule
    took a residual for the text, so each call's drift read as a new prompt and nothing was
    reused. They are other conditions; the text is the caption, as without them."""
    import tiny_models
    model, kw = tiny_models.zimage()
    g = torch.Generator().manual_seed(1)
    residuals = {0: torch.randn(1, 64, 16, generator=g), 2: torch.randn(1, 64, 16, generator=g)}
    text = str(dit_compile.explain(model, **kw, controlnet_block_samples=residuals))
    assert "text=l_kwargs_cap_feats_0_" in text, text
    assert "other conditions" in text and "controlnet_block_samples_0" in text.split(
        "other conditions")[1], text
