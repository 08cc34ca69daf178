"""Calls with effects besides their output: writes into a graph's inputs (found through views,
never reused: a reused call would skip them), values stored into objects (a graph of their own,
whose calls never take another graph's cached values)."""
import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dit_compile
from conftest import capture
from dit_compile.passes.mutation import written_inputs
from test_cache import compiled
from tiny_models import seeded


class Writes(torch.nn.Module):
    """Each way a forward writes memory, into an input or into a value of its own."""

    def forward(self, x, cache, out, stream, own):
        y = x * 2
        y[0] = 0                                  # its own value
        z = own.clone()
        z += 1                                    # its own copy of an input
        cache[:, :1].copy_(x[:, :1])              # an input, through a view
        torch.add(x, 1, out=out)                  # an input, as out=
        stream.view(-1).add_(1)                   # an input, through a view, in place
        return y + z


def test_written_inputs_follow_views_not_copies():
    gm = capture(Writes(), {k: torch.randn(2, 3) for k in ("x", "cache", "out", "stream", "own")})
    assert sorted(p.name for p in written_inputs(gm)) == ["l_cache_", "l_out_", "l_stream_"]


class OutTuple(torch.nn.Module):
    """A write into a tuple given as out=: Dynamo records no fake value for its target."""

    def forward(self, x, values, indices):
        torch.max(x, 1, out=(values, indices))
        return x * 2


def test_a_write_into_a_value_with_no_fake_tensor_counts_against_every_input():
    """Where the written value's memory is unknown, no input is known to be spared: taken for a
    pure function, the forward would be reused and its writes into ``values`` and ``indices``
    skipped."""
    gm = capture(OutTuple(), {"x": torch.randn(3, 4), "values": torch.empty(3),
                              "indices": torch.empty(3, dtype=torch.long)})
    assert sorted(p.name for p in written_inputs(gm)) == ["l_indices_", "l_values_", "l_x_"]


class Masks(torch.nn.Module):
    """Boolean masks combined with operators whose functions end in an underscore
    (operator.and_, or_; not_ on a size under dynamic shapes, which torch 2.15 records as
    sym_not), and one in-place &=: only the last writes."""

    def forward(self, x, mask, other, written):
        written &= mask
        return x * (mask & (x > 0) | other), not (x.shape[0] > 1)


def test_operators_named_like_in_place_ones_write_nothing():
    """Dynamo records ``a & b`` as operator.and_, which a trailing underscore took for an in-place
    write: a DiT combining its mask input with ``&`` ran without caching, and a ``not`` on a size
    (PyramidAttentionBroadcast's hooks make one) was charged to every input."""
    graphs = []
    mask = torch.tensor([True, False, True])
    torch.compile(Masks(), backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True,
                  dynamic=True)(torch.randn(3), mask, ~mask, mask.clone())
    targets = {getattr(n.target, "__name__", None) for n in graphs[0].graph.nodes}
    assert {"and_", "or_", "iand"} <= targets and targets & {"not_", "sym_not"}, targets
    assert [p.name for p in written_inputs(graphs[0])] == ["l_written_"]


# Random programs over three inputs: each step makes a view of a value (sharing its memory, or a
# copy where the layout forces one: reshape and contiguous of a transposed value), a new value, or
# writes into a value in one of the ways Dynamo records a write. Which inputs a program writes is
# read off torch's own version counters (shared by a tensor and its views) in an eager run, so the
# oracle is torch, not a second reading of the graph.
VIEWS = {"flat": lambda v: v.reshape(-1), "t": lambda v: v.transpose(0, -1), "head": lambda v: v[:1],
         "narrow": lambda v: v.narrow(-1, 0, 1), "detach": lambda v: v.detach(),
         "unsqueeze": lambda v: v.unsqueeze(0), "contiguous": lambda v: v.contiguous(),
         "chunk": lambda v: v.chunk(2, -1)[-1]}
NEW = {"mul": lambda v: v * 2, "clone": lambda v: v.clone(), "relu": lambda v: v.relu()}
WRITES = ["add_", "iadd", "setitem", "copy_", "relu_", "masked_fill_", "out"]


def _write(kind: str, v: torch.Tensor, other: torch.Tensor) -> None:
    if kind == "add_":
        v.add_(1)
    elif kind == "iadd":
        v += other.sum()                  # an augmented assignment: operator.iadd in the graph
    elif kind == "setitem":
        v[..., :1] = 0
    elif kind == "copy_":
        v.copy_(other.mean().expand(v.shape))
    elif kind == "relu_":
        torch.relu_(v)
    elif kind == "masked_fill_":
        v.masked_fill_(other.sum() > 0, 1.0)
    elif kind == "out":
        if v.is_contiguous():             # Dynamo refuses (a graph break) a strided out=
            torch.neg(v.clone(), out=v)
        else:
            v.neg_()


class Program(torch.nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, a, b, c):
        values = [a, b, c]
        for op, i, kind, j in self.steps:
            v = values[i % len(values)]
            if op == "view":
                values.append(VIEWS[kind](v))
            elif op == "new":
                values.append(NEW[kind](v))
            else:
                _write(kind, v, values[j % len(values)])
        return values[-1] * 1


step = st.one_of(
    st.tuples(st.just("view"), st.integers(0, 99), st.sampled_from(sorted(VIEWS)), st.just(0)),
    st.tuples(st.just("new"), st.integers(0, 99), st.sampled_from(sorted(NEW)), st.just(0)),
    st.tuples(st.just("write"), st.integers(0, 99), st.sampled_from(WRITES), st.integers(0, 99)))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step, min_size=1, max_size=8), st.booleans())
def test_written_inputs_are_the_inputs_torch_counts_writes_into(steps, aliased):
    """``aliased``: the third input is a view of the first (one memory): a write into either is a
    write into both, where both are inputs of the graph (Dynamo leaves out an input the program
    does not read)."""
    def inputs():
        a = torch.randn(4, 3)
        return {"a": a, "b": torch.randn(4, 3), "c": a[1:] if aliased else torch.randn(3, 3)}

    program = Program(tuple(steps))
    eager = inputs()
    before = {k: v._version for k, v in eager.items()}
    with torch.no_grad():
        program(**eager)
    gm = capture(program, inputs())
    graph_inputs = {p.name for p in gm.graph.find_nodes(op="placeholder")}
    expected = sorted(name for k, v in eager.items()
                      if v._version != before[k] and (name := f"l_{k}_") in graph_inputs)
    assert sorted(p.name for p in written_inputs(gm)) == expected, steps


def anyflow_far():
    """AnyFlow-FAR: chunks of frames denoised one after another, each attending to the keys and
    values of the chunks before it, which a call of their own (``is_cache_step``, at t = 0)
    writes into the KV cache the pipeline hands every call."""
    m = seeded("AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
               full_chunk_limit=3, num_attention_heads=2, attention_head_dim=12, in_channels=4,
               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    g = torch.Generator().manual_seed(0)
    return m, [torch.randn(1, 6, 16, generator=g)] + [torch.randn(1, 1, 4, 8, 8, generator=g)
                                                      for _ in range(2)]


def chunks(f, model, text, first, second):
    """Chunk 0 in two steps, its prefill call, chunk 1's first step: the denoising calls' outputs."""
    kv = {i: {"full_cache": torch.zeros(2, 1, 2, 48, 12), "compressed_cache": torch.zeros(2, 1, 2, 4, 12)}
          for i in range(2)}
    flag, outs, x = {"num_cached_chunks": 0, "is_cache_step": False}, [], first
    common = dict(encoder_hidden_states=text, kv_cache=kv, return_dict=False)
    with torch.no_grad():
        for t, r in ((900.0, 500.0), (500.0, 0.0)):
            v, _ = f(hidden_states=x, timestep=torch.full((1, 1), t), r_timestep=torch.full((1, 1), r),
                     chunk_partition=[1], kv_cache_flag=copy.deepcopy(flag), **common)
            outs.append(v.clone())
            x = x + (r - t) / 1000 * v
        flag["is_cache_step"] = True
        zero = torch.zeros(1, 1)
        # The device given: torch 2.11 builds a flex-attention mask on CUDA by default.
        f(hidden_states=x, timestep=zero, r_timestep=zero, chunk_partition=[1],
          attention_mask=model.build_attention_mask(chunk_partition=[1], height=8, width=8, mode="cache",
                                                   device=x.device),
          kv_cache_flag=copy.deepcopy(flag), **common)
        flag["num_cached_chunks"], flag["is_cache_step"] = 1, False
        v, _ = f(hidden_states=second, timestep=torch.full((1, 1), 900.0),
                 r_timestep=torch.full((1, 1), 500.0), chunk_partition=[1, 1],
                 kv_cache_flag=copy.deepcopy(flag), **common)
        outs.append(v.clone())
    return outs


def test_a_call_that_fills_a_kv_cache_is_never_reused():
    """The prefill call comes third, at a timestep below the one before, as a step would: reused
    as one (or as its blocks' span: the same skip), its writes were skipped and chunk 1 attended to
    zeros (0.04 off eager); under the default policy the runtime failed on a call with no output.
    It runs, with a warning, and is not a step of the generation."""
    model, (text, first, second) = anyflow_far()
    theirs = chunks(model, model, text, first, second)
    f = compiled(model, {"rule": "schedule", "step": [2]})
    with pytest.warns(UserWarning, match=r"writes into its inputs in place \(L\['kwargs'\]\['kv_cache'\]"):
        ours = chunks(f, model, text, first, second)
    assert [(r["generation"], r["step"]) for r in dit_compile.stats(f)["trace"]] == [(0, 0), (0, 1), (1, 0)]
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"denoising call {i}")


def test_a_forward_that_stores_what_it_computes_is_never_reused():
    """A forward hook put on a block before the compile (a user keeping a block's features) is
    traced into the forward, whose bytecode stores the block's output into the block after the
    graph runs: a reused call stored the cached value instead (a step reuse stored branch 0's
    old features, a cfg reuse branch 0's plus a difference). Such a graph runs uncached, said."""
    import tiny_models
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    eager = copy.deepcopy(model)
    for m in (model, eager):
        m.blocks[1].register_forward_hook(lambda mod, args, out: setattr(mod, "features", out * 1))
    f = compiled(model, {"rule": "schedule", "step": [1, 2], "cfg": [1, 2]})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"stores tensors it computes into "
                                                          r"WanTransformerBlock.features"):
        for t in (900.0, 700.0, 500.0):
            for text in (kw["encoder_hidden_states"], -kw["encoder_hidden_states"]):
                call = dict(kw, timestep=torch.tensor([t]), encoder_hidden_states=text)
                torch.testing.assert_close(f(**call)[0], eager(**call)[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(model.blocks[1].features, eager.blocks[1].features,
                                           rtol=1e-5, atol=1e-5)


def test_explain_names_the_writes():
    model, (text, first, _) = anyflow_far()
    kv = {i: {"full_cache": torch.zeros(2, 1, 2, 48, 12), "compressed_cache": torch.zeros(2, 1, 2, 4, 12)}
          for i in range(2)}
    zero = torch.zeros(1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # flex attention run eagerly
        report = dit_compile.explain(
            model, hidden_states=first, timestep=zero, r_timestep=zero, encoder_hidden_states=text,
            chunk_partition=[1], kv_cache=kv, kv_cache_flag={"num_cached_chunks": 0, "is_cache_step": True},
            attention_mask=model.build_attention_mask(chunk_partition=[1], height=8, width=8, mode="cache",
                                                      device=first.device),
            return_dict=False)
    assert report.stacks == {"blocks": 2}
    assert report.fallback.startswith("this forward writes into its inputs in place"), report
    assert "L['kwargs']['kv_cache'][0]['full_cache']" in report.fallback and "1 more" in report.fallback


def sana_wm_refiner():
    """SANA-WM's stage-2 refiner: each block of frames is denoised attending to the keys and values
    of the blocks before it, which a last call at t = 0 captures into the pipeline's KV cache object
    (a graph that returns them besides the output; Dynamo stores them after it runs)."""
    m = seeded("SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4,
               num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
               audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
               audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=3,
               caption_channels=16)
    g = torch.Generator().manual_seed(1)
    return m, torch.randn(1, 16, 4, generator=g), torch.randn(1, 6, 16, generator=g)


def refine(f, model, x, text):
    """One block of frames as the refiner pipeline runs it: three Euler steps ("inject"), then the
    call that captures the block's keys and values. The outputs, and the captured pairs."""
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache
    kv = SanaWMRefinerKVCache(len(model.transformer_blocks))
    rope = model.build_rotary_emb_for_absolute_positions(1, [0], 4, 4, torch.device("cpu"), 24.0)
    outs = []
    with torch.no_grad():
        for t, mode in ((0.909375, "inject"), (0.725, "inject"), (0.421875, "inject"),
                        (0.0, "inject_and_capture_post_rope")):
            v = f(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((1, 16), t * 1000),
                  video_rotary_emb=rope, encoder_attention_mask=torch.ones(1, 6), kv_cache=kv,
                  kv_cache_mode=mode, return_dict=False)[0]
            outs.append(v.clone())
            x = x - 0.2 * v
    return outs, [t for i in range(len(model.transformer_blocks))
                  for t in kv.get(i).get_captured_post_rope()]


@pytest.mark.parametrize("reuse", ["step", "block"])
def test_a_call_of_another_graph_never_takes_its_cached_values(reuse):
    """The capture call comes as the fourth step of the block's generation, in a graph of its own.
    Reused (a forced schedule naming that step) it took the Euler steps' graph's cached values: one
    output for its seven (the pairs came back None) or span residuals of other blocks' layout
    (a TypeError in a layer norm). It computes, and the pairs it captures are eager's: its graph
    stores them into the pipeline's cache besides returning its output, so it runs uncached (said),
    not a step of the generation."""
    model, x, text = sana_wm_refiner()
    theirs, pairs = refine(model, model, x, text)
    f = compiled(model, {"rule": "schedule", reuse: [3]})
    with pytest.warns(UserWarning, match="stores tensors it computes into"):
        ours, our_pairs = refine(f, model, x, text)
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute"] * 3
    for i, (a, b) in enumerate(zip(ours + our_pairs, theirs + pairs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"value {i}")
