"""The backend end to end: registration, options, Inductor agreement, no recompiles."""
import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dit_compile
import dit_compile.backend as backend
import dit_compile.flops as flops
import dit_compile.inductor as inductor
from dit_compile.notes import notes
import tiny_models
import zoo_video


def test_registered_by_entry_point_without_import():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Linear(2, 2)
        assert "mixcache" in torch._dynamo.list_backends(exclude_tags=())
        assert "dit_compile" not in sys.modules
        torch.compile(m, backend="mixcache", options={"regions": "eager"})(torch.ones(1, 2))
        assert "dit_compile" in sys.modules
    """)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__))   # not the repository's root: conftest.py
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("options,match", [
    ({"regionz": "eager"}, r"unknown mixcache option\(s\) \['regionz'\]; valid options: \["),
    ({"regions": "tvm"}, r"regions='tvm': must be one of \('inductor', 'blocks', 'eager'\)"),
    ({"cache_memory": -1}, r"cache_memory=-1: must be a positive"),
    ({"mode": "turbo"}, r"mode='turbo': must be one of \('default', .*'reduce-overhead'"),
    ({"timestep": "up"}, r"timestep='up': must be one of \('auto', 'falling', 'rising'\)"),
    ({"share_blocks": "no"}, r"share_blocks='no': must be True or False"),   # a str is truthy
    ({"lower_moe": 0}, r"lower_moe=0: must be True or False"),
    ({"background_compile": True, "mode": "reduce-overhead"},
     r"background_compile=True with mode='reduce-overhead': CUDA graphs are recorded"),
    ("eager", r"options must be a dict of mixcache options \(or an Options\), not str 'eager'"),
])
def test_bad_options_are_clear_errors(options, match):
    """Said as the backend starts, before it looks at the graph (so any module will do: a DiT
    would only add its trace)."""
    with pytest.raises(Exception, match=match):
        torch.compile(torch.nn.Linear(2, 2), backend="mixcache", options=options)(torch.ones(1, 2))


@pytest.mark.parametrize("cache,match", [
    ("bogus", r"cache='bogus': a preset is one of"),
    ({"rule": "teacache", "threshold": -5}, r"teacache threshold=-5"),
    ({"rule": "schedule", "step": [2], "extrapolate": 3}, r"extrapolate=3: must be"),
])
def test_bad_cache_is_an_error_where_the_backend_falls_back(cache, match):
    """A model with no block structure falls back to plain Inductor before any block is found:
    the cache option is still checked, not silently dropped."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    with pytest.raises(Exception, match=match):
        torch.compile(mlp, backend="mixcache", options={"cache": cache, "regions": "eager"})(
            torch.randn(2, 8))


def test_options_may_be_given_as_options():
    """dit_compile.Options is public: given as the options, it is taken, and checked as a dict
    would be."""
    opts = dit_compile.Options.parse({"regions": "eager", "cache": "fast"})
    assert dit_compile.Options.parse(opts) == opts
    with pytest.raises(dit_compile.OptionError, match="regions='tvm'"):
        dit_compile.Options.parse(dataclasses.replace(opts, regions="tvm"))


def test_a_model_compiled_with_options_given_as_options_reports_them():
    """torch.compile(..., options=dit_compile.Options(...)) compiles as the dict would; stats,
    explain and compiled_options read its options (they raised "'Options' object is not
    iterable")."""
    model, kw = tiny_models.wan(layers=2)
    opts = dit_compile.Options(regions="eager", cache="fast")
    f = torch.compile(model, backend="mixcache", options=opts)
    with torch.no_grad():
        f(**kw)
    assert dit_compile.compiled_options(f) == dataclasses.asdict(opts)
    assert dit_compile.stats(f)["calls"] == 1
    assert "blocks" in str(dit_compile.explain(f, **kw))


def test_misused_helpers_say_what_they_take(tmp_path):
    model, kw = tiny_models.wan(layers=2)
    with pytest.raises(TypeError, match=r"stamp='yes': must be True or False"):
        dit_compile.nest_blocks(model, stamp="yes")
    with pytest.raises(ValueError, match=r"timeout='5': seconds"):
        dit_compile.wait_for_compiles(model, timeout="5")
    with pytest.raises(TypeError, match=r"kwargs must be a dict of the forward's keyword arguments"):
        dit_compile.export(model, str(tmp_path / "m"), [kw])


def test_a_model_on_the_meta_device_runs_uncached():
    """A meta call (a shape check) has no values to read a noise level from: it runs as plain
    Inductor's does, uncached, where it raised from the cache's host read."""
    model, kw = tiny_models.wan(layers=2)
    f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with torch.no_grad():
        want = f(**kw, return_dict=False)[0].shape
        model.to("meta")
        out = f(**{k: v.to("meta") for k, v in kw.items()}, return_dict=False)[0]
    assert out.device.type == "meta" and out.shape == want


def test_calls_that_raised_leave_the_next_good_ones_cached():
    """A wrong input (a float timestep) raises, as eagerly; Dynamo then gives up on the forward's
    frame and runs it eagerly from there on. The backend has it traced again at the next call,
    once per call that raised: after two such calls, the fixed ones cached nothing until
    torch._dynamo.reset()."""
    model, kw = tiny_models.wan(layers=2)
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2, 3]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            with pytest.raises(AttributeError), torch.no_grad():
                f(**dict(kw, timestep=500.0))
        with torch.no_grad():
            # The first runs as Dynamo left the forward (in fragments, uncached): a generation
            # of five from the next.
            for t in (900.0, 800.0, 700.0, 500.0, 300.0, 100.0):
                f(**dict(kw, timestep=torch.tensor([t])))
    assert dit_compile.stats(f)["reused"] == {"step": 2}


def test_cache_memory_takes_whole_numbers_not_bools():
    given = {"cache_memory": 2e9}
    assert dit_compile.Options.parse(given).cache_memory == 2_000_000_000
    assert given == {"cache_memory": 2e9} and type(given["cache_memory"]) is float, \
        "the caller's dict is read, not rewritten"
    assert type(dit_compile.Options.parse({"cache_memory": 2e9}).cache_memory) is int
    for bad in (True, 1.5, "2e9", 0):
        with pytest.raises(dit_compile.OptionError, match=rf"cache_memory={bad!r}: must be a positive"):
            dit_compile.Options.parse({"cache_memory": bad})


def test_modes_are_the_installed_inductors():
    """torch adds modes ("lite" in 2.13): every mode Inductor lists is accepted, named in the error."""
    modes = list(torch._inductor.list_mode_options())
    for mode in modes:
        assert dit_compile.Options.parse({"mode": mode}).mode == mode
    with pytest.raises(dit_compile.OptionError) as err:
        dit_compile.Options.parse({"mode": "turbo"})
    assert all(repr(m) in str(err.value) for m in modes)
    with pytest.raises(dit_compile.OptionError, match="mode='': must be one of"):
        dit_compile.Options.parse({"mode": ""})     # no mode is None, not an empty name


@pytest.mark.inductor
def test_matches_plain_inductor_and_compiles_identical_blocks_once(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dit_compile")
    # Two blocks show the sharing; each more one would only lengthen plain Inductor's compile.
    model, kw = tiny_models.wan(layers=2)
    compiles, traces = [], []
    real_compile, real_find = inductor.compile_fx, backend.find_regions
    monkeypatch.setattr(inductor, "compile_fx", lambda *a, **k: compiles.append(1) or real_compile(*a, **k))
    monkeypatch.setattr(backend, "find_regions", lambda gm: traces.append(1) or real_find(gm))
    with torch.no_grad():
        ours = torch.compile(model, backend="mixcache", fullgraph=True, options={"cache": None})
        out = ours(**kw, return_dict=False)[0]
        plain = torch.compile(model, backend="inductor", fullgraph=True)(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        assert len(compiles) == 3, "prologue, one shared block, epilogue"
        # The compile-time breakdown a first generation is read from: one line per compile.
        kinds = [r.getMessage().split("(")[1].split(",")[0] for r in caplog.records
                 if "compiled piece" in r.getMessage()]
        assert kinds == ["prologue", "block", "epilogue"]
        # A new timestep (every denoising step) reuses the compiled graph: no recompilation.
        for t in (400.0, 300.0, 17.0):
            kw["timestep"] = torch.full_like(kw["timestep"], t)
            ref = model(**kw, return_dict=False)[0]
            torch.testing.assert_close(ours(**kw, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1 and len(compiles) == 3


@pytest.mark.inductor
def test_a_piece_output_inductor_lays_out_otherwise_reaches_the_next_piece_as_traced(monkeypatch):
    """Wan VACE pads its control tokens with a cat of none, which Inductor returns as the other
    operand's transposed view: the control stack's first block, compiled for the traced
    (contiguous) strides, failed Inductor's check of its inputs on the first call. So it did under
    dynamic shapes, whose strides are expressions of each call's sizes: two frame counts, one
    graph. Against eager (one Inductor compile fewer; fp32 CPU: within 1e-5).

    dynamic=True also makes every module's Python float (a norm's eps) a graph input. Plain
    Inductor, handed the real inputs, specializes those it cannot turn into tensor math
    (AOTAutograd restarts Dynamo's analysis); compiled from fake values alone, the first block
    failed."""
    from test_zoo import wan_vace
    model, kw = wan_vace()
    traces = []
    real_find = backend.find_regions
    monkeypatch.setattr(backend, "find_regions", lambda gm: traces.append(1) or real_find(gm))
    with torch.no_grad():
        ours = torch.compile(model, backend="mixcache", fullgraph=True,
                             options={"cache": None})(**kw, return_dict=False)[0]
        torch.testing.assert_close(ours, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        f = torch.compile(model, backend="mixcache", fullgraph=True, dynamic=True,
                          options={"cache": None})
        graphs = []
        for frames in (2, 3):
            kw.update(hidden_states=torch.randn(1, 4, frames, 8, 8),
                      control_hidden_states=torch.randn(1, 8, frames, 8, 8))
            torch.testing.assert_close(f(**kw, return_dict=False)[0],
                                       model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
            graphs.append(len(traces))
    assert graphs[1] == graphs[0], "another frame count is the same graph"


@pytest.mark.inductor
def test_lowered_moe_model_through_inductor_matches_eager(monkeypatch):
    """HiDream, its MoE lowered (one graph, the fused op opaque to Inductor), through the backend's
    Inductor regions, against eager with its MoE as diffusers wrote it (fp32 CPU: 1e-5): two
    stacks, double- and single-stream, with glue between them, as Flux's and HunyuanVideo's
    (whose pieces go through Inductor in test_nesting and test_cache). (Inductor for the blocks
    alone: they hold the fused op; the prologue's, glue's and epilogue's compiles add nothing.)"""
    model, kw = tiny_models.hidream(patchified=True)
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0]
    assert dit_compile.lower_moe(model) == 4
    found = []
    monkeypatch.setattr(backend, "find_regions",
                        lambda gm, real=backend.find_regions: found.append(real(gm)) or found[-1])
    with torch.no_grad():
        ours = torch.compile(model, backend="mixcache", fullgraph=True,
                             options={"cache": None, "regions": "blocks"})(
            **kw, return_dict=False)[0]
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    assert [r.stacks for r in found] == [{"double_stream_blocks": 2, "single_stream_blocks": 2}]


@pytest.mark.inductor
def test_a_block_handed_strided_views_shares_its_mates_compile(monkeypatch):
    """CogVideoX's first block gets slices of the prologue's concatenated text and video tokens,
    its mates dense tensors: the same graph at other strides. At batch 2 (batched CFG) it copies
    them dense and shares the mates' compile instead of compiling a block of its own; at batch 1
    the slices differ only in the batch's stride, which no kernel reads, and nothing is copied.
    The last block, whose text output nothing reads, returns less: it runs the same compile and
    keeps the video output. Against eager (fp32 CPU: 1e-5)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    model = pipelines.cogvideox_transformer(layers=4)
    compiles, twins = [], []
    real_compile = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, *a, **k: compiles.append(gm) or real_compile(gm, *a, **k))
    monkeypatch.setattr(inductor, "dense_twins",
                        lambda plan, real=inductor.dense_twins: twins.append(real(plan)) or twins[-1])
    for batch in (2, 1):
        kw = dict(hidden_states=torch.randn(batch, 3, 4, 8, 8),
                  encoder_hidden_states=torch.randn(batch, 16, 32),
                  timestep=torch.full((batch,), 500), return_dict=False)
        compiles.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="mixcache", fullgraph=True, dynamic=False,
                                options={"cache": None, "regions": "blocks"})(**kw)[0]
            torch.testing.assert_close(out, model(**kw)[0], rtol=1e-5, atol=1e-5)
        assert len(compiles) == 1, f"batch {batch}: one block for all four"
    # Pieces: the prologue, then the blocks; the first block's strided inputs are its tokens.
    assert len(twins) == 2 and list(twins[0]) == [1] and twins[0][1][0] == 2 and twins[1] == {}, \
        twins


@pytest.mark.inductor
def test_a_last_block_read_in_part_shares_its_mates_compile(monkeypatch):
    """Only the image tokens of Flux's last single-stream block are read: its graph lacks the
    text half's slice, and it runs its mates' compile, keeping the image output, instead of
    compiling a block of its own. Against eager (fp32 CPU: 1e-5)."""
    model, kw = tiny_models.flux()
    report = dit_compile.explain(model, **kw, return_dict=False)
    compiles = []
    real_compile = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, *a, **k: compiles.append(gm) or real_compile(gm, *a, **k))
    with torch.no_grad():
        out = torch.compile(model, backend="mixcache", fullgraph=True, dynamic=False,
                            options={"cache": None, "regions": "blocks"})(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    assert len(compiles) == 2, "one double-stream block, one single-stream block"
    # explain says so before anything is compiled.
    assert (report.block_graphs, report.twins) == (2, 1)
    assert "block graphs compiled: 2 for 4 blocks" in str(report)


@pytest.mark.inductor
def test_blocks_marked_as_nested_compile_regions_compile_once(monkeypatch, nested_wan_blocks):
    """nested_compile_region on the block class shortens Dynamo's trace (one block traced, the
    rest stamped out as invoke_subgraph calls): the same pieces, one shared block compile, eager's
    output (plain Inductor's is the test above's, of the same pieces)."""
    model, kw = tiny_models.wan(layers=3)
    compiles = []
    real_compile = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx", lambda *a, **k: compiles.append(1) or real_compile(*a, **k))
    with torch.no_grad():
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"cache": None})(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    assert len(compiles) == 3, "prologue, one shared block, epilogue"


@pytest.mark.inductor
def test_dynamic_shapes_with_a_forced_schedule_match_the_reference():
    """Under dynamic=True one graph serves every latent shape: each shape's generation reuses as
    the schedule says and equals the eager reference of that schedule at that shape.
    ``background_compile`` cannot send pieces of symbolic sizes to a child (their sizes live in
    this process's shape environment): they compile here, said once, naming dynamic=False.
    (Inductor for the blocks alone, the one region of symbolic sizes; the prologue's and
    epilogue's dynamic compiles are test_a_piece_output_inductor_lays_out_otherwise's.)"""
    from reference_cache import Reference
    from test_cache import STEPS, generation
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    sched = dict(step=[2], cfg=[1, 3], block=[4, 5])
    f = torch.compile(model, backend="mixcache", dynamic=True, options={
        "cache": {"rule": "schedule", **sched}, "regions": "blocks", "background_compile": True})
    for frames, size in ((2, 8), (3, 12)):
        kw["hidden_states"] = torch.randn(1, 4, frames, size, size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = generation(f, kw)
        said = [str(w.message) for w in caught if "background_compile" in str(w.message)]
        if size == 8:
            assert len(said) == 1 and "1 region(s) of symbolic sizes" in said[0] \
                and "dynamic=False" in said[0], said
        else:
            assert said == [], "the one graph, compiled once"
        assert notes(model).background is None       # none went to a child
        for x, y in zip(ours, generation(Reference(model, **sched).start(STEPS[0]), kw)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(f)["reused"] == {"step": 4, "cfg": 4, "block": 8}


def test_small_glue_between_blocks_is_not_compiled(monkeypatch):
    """Chroma slices each block's modulation from one embedding between blocks: a few ops, one
    constant apart from block to block. Compiling each would cost a compile per block for nothing."""
    from dit_compile.passes.regions import GLUE
    model, kw = tiny_models.chroma()
    compiled = []
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, *a, **k: compiled.append(gm) or gm.forward)
    plans = []
    real_split = backend.split
    monkeypatch.setattr(backend, "split", lambda gm, rmap: plans.append(real_split(gm, rmap)) or plans[-1])
    with torch.no_grad():
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"cache": None})(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    kinds = [p.region.kind for p in plans[0].pieces]
    assert kinds.count(GLUE) >= 3
    distinct = {p.signature() for p in plans[0].pieces if p.region.kind != GLUE}
    assert len(compiled) == len(distinct), "the prologue, each distinct block, the epilogue: no glue"


def test_blocks_mode_compiles_the_blocks_only(monkeypatch):
    """regions="blocks": Inductor for each distinct block, the prologue and the epilogue as they
    are (as regional compilation leaves them), the same output."""
    from dit_compile.passes.regions import BLOCK
    model, kw = tiny_models.wan(layers=3)
    compiled, plans = [], []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, *a, **k: compiled.append(gm) or gm.forward)
    real_split = backend.split
    monkeypatch.setattr(backend, "split", lambda gm, rmap: plans.append(real_split(gm, rmap)) or plans[-1])
    with torch.no_grad():
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"cache": None, "regions": "blocks"})(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    blocks = [p for p in plans[0].pieces if p.region.kind == BLOCK]
    assert len(blocks) == 3 and len(compiled) == 1
    assert [n.op for n in compiled[0].graph.nodes] == [n.op for n in blocks[0].module.graph.nodes]


@pytest.mark.inductor
def test_bf16_cache_off_is_within_the_eager_vs_inductor_difference():
    """In bf16 the regions may round differently from the whole graph, but no further from eager
    than plain Inductor's own rounding is (the issue's bar for bf16 on the GPU, held here on CPU)."""
    model, kw = tiny_models.wan(layers=2)
    model = model.to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) for k, v in kw.items()}
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0].float()
        plain = torch.compile(model, backend="inductor")(**kw, return_dict=False)[0].float()
        torch._dynamo.reset()
        ours = torch.compile(model, backend="mixcache", options={"cache": None})(
            **kw, return_dict=False)[0].float()
    assert ours.dtype == plain.dtype and ours.shape == plain.shape
    bar = (plain - eager).abs().max()
    # One bf16 ulp of the output's magnitude as slack, for outputs where Inductor matches exactly.
    ulp = eager.abs().max() * 2.0 ** -7
    assert (ours - eager).abs().max() <= 2 * bar + ulp, ((ours - eager).abs().max(), bar)


def _mixcache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("mixcache")]


@pytest.mark.parametrize("put_on", ["enable_cache", "apply"])
def test_diffusers_cache_hooks_turn_mixcache_caching_off_saying_so(put_on):
    """PyramidAttentionBroadcast's hooks trace into the graph (no break), reusing attention by
    counters a reused call would not advance: two caches on one forward. The backend caches
    nothing and says why; the output is the hooked model's. Put on by diffusers'
    ``apply_pyramid_attention_broadcast`` (the only way on a model without ``enable_cache``, such
    as PixArt), the hooks went unseen (``is_cache_enabled`` False): both caches reused, 0.3 off."""
    import copy
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers.hooks import apply_pyramid_attention_broadcast
    model, kw = tiny_models.wan(layers=2)
    now = {"t": 900}
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: now["t"])
    if put_on == "apply":
        apply_pyramid_attention_broadcast(model, config)
    else:
        model.enable_cache(config)
    eager = copy.deepcopy(model)
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [1, 2]}})
    with torch.no_grad(), pytest.warns(UserWarning, match="own cache hooks are on") as rec:
        for t in (900, 700, 500):
            now["t"] = t
            call = dict(kw, timestep=torch.full((1,), float(t)), return_dict=False)
            with model.cache_context("cond"), eager.cache_context("cond"):
                torch.testing.assert_close(f(**call)[0], eager(**call)[0], rtol=1e-5, atol=1e-5)
    assert not [w for w in _mixcache_warnings(rec) if "in place" in w], _mixcache_warnings(rec)
    with pytest.raises(ValueError):
        dit_compile.stats(f)
    with model.cache_context("cond"):
        report = dit_compile.explain(model, **call)
    assert "own cache hooks are on" in (report.fallback or ""), report


def test_graph_breaks_fall_back_per_graph_and_stay_correct():
    """HiDream's MoE dispatch, left as it is (lower_moe=False), syncs to the host and breaks the
    graph into 17: still a correct result, and one warning of each kind, naming the model (not a
    fragment's frame) and why."""
    model, kw = tiny_models.hidream()
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        with pytest.warns(UserWarning, match="mixcache") as rec:
            out = torch.compile(model, backend="mixcache",
                                options={"regions": "eager", "lower_moe": False})(
                **kw, return_dict=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fallback = [w for w in _mixcache_warnings(rec) if "without caching" in w]
    moe = [w for w in _mixcache_warnings(rec) if "MoE dispatch" in w]
    assert len(fallback) == 1 and len(moe) == 1, _mixcache_warnings(rec)
    assert fallback[0].startswith("mixcache: HiDreamImageTransformer2DModel: graph breaks split")
    assert "fullgraph=True" in fallback[0] and "TORCH_LOGS=graph_breaks" in fallback[0]
    assert moe[0].startswith("mixcache: HiDreamImageTransformer2DModel: 4 MoE dispatch(es)")
    assert "call dit_compile.lower_moe(model) before torch.compile" in moe[0]
    assert not any(dit_compile.passes.moe.find_moe(model).values()), "the model was changed"


def _wan_with_graph_break():
    """A graph break inside the block loop: Dynamo runs the forward eagerly and compiles the frames
    it calls (the rotary and time embeddings, each block, the norm) one by one."""
    model, kw = tiny_models.wan(layers=2)
    model.blocks[1].register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
    return model, kw


def test_graph_break_fragments_warn_once_naming_the_model():
    model, kw = _wan_with_graph_break()
    compiled = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="mixcache") as rec:
        for _ in range(2):
            out = compiled(**kw, return_dict=False)[0]
    assert _mixcache_warnings(rec) == [_mixcache_warnings(rec)[0]], _mixcache_warnings(rec)
    assert _mixcache_warnings(rec)[0].startswith("mixcache: WanTransformer3DModel: graph breaks")
    with torch.no_grad():
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)


def test_a_break_only_the_first_call_makes_is_traced_past():
    """Z-Image builds its rotary table at its first call, under a context manager Dynamo does not
    trace: that call breaks the graph, later ones would not, yet Dynamo's fragments (whose guards
    read nothing that changed) would serve them all, uncached. The backend has the forward traced
    once more: from the second call on, one graph, cached as asked. The first call's warning says
    that this will be tried. So for every instance: instances share Dynamo's graphs, and a third
    one found every fragment of its first call compiled already (no backend saw them, nothing was
    traced again: none of its calls was cached, and a fourth one was not even warned)."""
    sched = {"rule": "schedule", "step": [2, 4]}
    for instance in range(3):
        model, kw = tiny_models.zimage()
        compiled = torch.compile(model, backend="mixcache",
                                 options={"regions": "eager", "cache": sched, "timestep": "rising"})
        with warnings.catch_warnings(record=True) as rec, torch.no_grad():
            warnings.simplefilter("always")
            for t in (0.1, 0.3, 0.5, 0.7, 0.9):
                out = compiled(**dict(kw, t=torch.full_like(kw["t"], t)), return_dict=False)[0]
        said = _mixcache_warnings(rec)
        assert len(said) == 1 and "traced once more at its next call" in said[0], (instance, said)
        trace = dit_compile.stats(compiled)["trace"]
        assert [(r["step"], r["action"]) for r in trace] == [
            (0, "compute"), (1, "compute"), (2, "step"), (3, "compute")], (instance, trace)
    with torch.no_grad():
        torch.testing.assert_close(out, model(**dict(kw, t=torch.full_like(kw["t"], 0.9)),
                                              return_dict=False)[0], rtol=1e-5, atol=1e-5)


def test_a_break_every_call_makes_is_traced_past_once_only():
    """Lumina2 breaks before its blocks at every call. The forward is traced once more after its
    first call (the break might have been the first call's alone); after that its fragments serve,
    and a new batch size recompiles the fragments it needs, never the forward as a whole again
    (which would drop the graphs of every size compiled so far)."""
    model, kw = tiny_models.lumina2()
    _, kw2 = tiny_models.lumina2(batch=2)
    graphs = []

    def counting(gm, example_inputs):       # mixcache, counting the graphs it gets
        graphs.append(gm)
        return backend.mixcache(gm, example_inputs, options={"regions": "eager"})

    compiled = torch.compile(model, backend=counting)
    seen = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for inputs in (kw, kw, kw2, kw2, kw2, kw, kw2):
            out = compiled(**inputs, return_dict=False)[0]
            seen.append(len(graphs))
    assert seen[1] == seen[0] + 1, f"the forward traced once more: {seen}"
    assert seen[2:] == [seen[2]] * 5, f"compiled again after the first call at batch 2: {seen}"
    with torch.no_grad():
        torch.testing.assert_close(out, model(**kw2, return_dict=False)[0], rtol=1e-5, atol=1e-5)


def test_a_compiled_function_that_breaks_before_the_model_is_not_cached():
    """A compiled function (a denoising step) that breaks before it calls the model: the graph
    after the break holds the whole forward, but resumes mid-function, with the function's locals
    for inputs and its own work on the output. A fragment: warned, and every step computed, forced
    schedule or not. The state is the model's: ``stats`` of the function says to pass the model."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False

    def step(x, t):
        x = x * 1.0
        torch._dynamo.graph_break()
        return x - 0.1 * model(**dict(kw, hidden_states=x, timestep=t))[0]

    sched = {"rule": "schedule", "step": [1, 2]}
    compiled = torch.compile(step, backend="mixcache", options={"regions": "eager", "cache": sched})
    x = kw["hidden_states"]
    with torch.no_grad(), pytest.warns(UserWarning, match="mixcache") as rec:
        for t in (900.0, 800.0, 700.0):
            t = torch.tensor([t])
            torch.testing.assert_close(compiled(x, t), step(x, t), rtol=1e-5, atol=1e-5)
    assert "mixcache: the traced function: graph breaks split" in _mixcache_warnings(rec)[0]
    with pytest.raises(ValueError, match="no mixcache state"):
        dit_compile.stats(model)
    with pytest.raises(TypeError, match="pass an nn.Module .* not function"):
        dit_compile.stats(compiled)
    with pytest.raises(TypeError, match="traces an nn.Module .* not function"):
        dit_compile.explain(compiled, x, torch.tensor([900.0]))
    with pytest.raises(TypeError, match="lowers the MoE dispatches of an nn.Module, not function"):
        dit_compile.lower_moe(compiled)


def test_a_pipeline_given_for_its_model_is_told_to_pass_its_transformer():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    model, kw = tiny_models.wan(layers=2)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    for fn in (dit_compile.stats, dit_compile.reset, lambda p: dit_compile.explain(p, **kw),
               lambda p: dit_compile.export(p, "unused", kw), dit_compile.nest_blocks,
               dit_compile.unnest_blocks, dit_compile.lower_moe, dit_compile.restore_moe,
               dit_compile.functional_casting, dit_compile.wait_for_compiles,
               lambda p: dit_compile.register_moe(p, "forward", experts="experts"),
               lambda p: dit_compile.OnlineSplit(p, model, dit_compile.Settle(0.1))):
        with pytest.raises(TypeError, match=r"an nn.Module.*, not WanPipeline \(a pipeline: pass "
                                            r"its model, pipe.transformer\)"):
            fn(pipe)


def test_no_timestep_input_is_said_by_explain_and_the_backend_alike():
    """A Transformer2DModel as a U-Net calls it inside its blocks: block stacks, but no timestep.
    explain says that nothing will be cached and why, the backend warns the same once and
    computes every call, as eager does: under the default cache too, which the user compiled for
    (only ``cache: None``, asking for no caching, is not told)."""
    from diffusers import Transformer2DModel
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                               norm_num_groups=4, cross_attention_dim=16, num_layers=3).eval()
    kw = dict(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
              return_dict=False)
    report = dit_compile.explain(model, **kw)
    assert report.stacks == {"transformer_blocks": 3}
    assert report.fallback.startswith("could not tell which input is the timestep"), report
    compiled = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="mixcache") as rec:
        out = compiled(**kw)[0]
    said = _mixcache_warnings(rec)
    assert len(said) == 1 and report.fallback in said[0] and "U-Net" in said[0], said
    with torch.no_grad():
        torch.testing.assert_close(out, model(**kw)[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    off = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        off(**kw)


def test_a_latent_list_of_unequal_shapes_is_not_cached_and_said_so():
    """Z-Image takes a latent per sample, as a list, of any size each: samples of unequal shapes
    cannot be stacked into one batch to decide on (passes.inputs.sample_list). explain says so,
    the backend warns the same and computes every call, as eager does."""
    model, kw = tiny_models.zimage(batch=2)
    kw["x"][1] = torch.randn(4, 1, 8, 12)
    kw["return_dict"] = False
    with torch.no_grad():
        ref = model(**kw)[0]    # also builds its rotary table, a graph break of the first call
    report = dit_compile.explain(model, **kw)
    assert report.fallback.startswith("the latent comes as a list of 2 per-sample tensors of "
                                      "different shapes"), report
    # Not stacked: no "latent: a list of 2 per-sample tensors, decided on as one batch" line.
    assert report.samples == 0 and "latent: a list of" not in str(report), str(report)
    compiled = torch.compile(model, backend="mixcache", fullgraph=True,
                             options={"regions": "eager", "cache": "fast", "timestep": "rising"})
    with torch.no_grad(), pytest.warns(UserWarning, match="mixcache") as rec:
        out = compiled(**kw)[0]
    said = _mixcache_warnings(rec)
    assert len(said) == 1 and report.fallback in said[0], said
    for y, z in zip(out, ref):
        torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-5)


def test_a_latent_list_under_dynamic_shapes_is_stacked_where_its_shapes_agree():
    """A second size recompiles Z-Image with dynamic shapes, each sample's latent of sizes of
    its own: the samples are stacked where a call's shapes agree (the schedule reuses as at the
    first size), and a call where they do not is computed, said once, as eager computes it. A
    new caption (the captions are a list too) leaves nothing to reuse."""
    model, kw = tiny_models.zimage(batch=2)
    with torch.no_grad():
        model(**kw)     # builds its rotary table (a graph break): the compiled call is one graph
    sched = {"rule": "schedule", "step": [2], "block": [3]}
    f = torch.compile(model, backend="mixcache", fullgraph=True,
                      options={"regions": "eager", "cache": sched, "timestep": "rising"})

    def run(sizes, steps=4, new_caption_at=None):
        x = [torch.randn(4, 1, h, w) for h, w in sizes]
        with torch.no_grad():
            for i in range(steps):
                caps = (kw["cap_feats"] if new_caption_at is None or i < new_caption_at
                        else [-c for c in kw["cap_feats"]])
                f(x=x, cap_feats=caps, t=torch.full((2,), i / steps), return_dict=False)

    for gen, size in enumerate((8, 12)):
        run([(size, size)] * 2)
        assert [r["action"] for r in dit_compile.stats(f)["trace"] if r["generation"] == gen] == [
            "compute", "compute", "step", "block"], size
    # The captions are a list too: a new prompt from step 2 on leaves nothing to reuse there.
    run([(8, 8)] * 2, new_caption_at=2)
    assert [r["action"] for r in dit_compile.stats(f)["trace"] if r["generation"] == 2] == [
        "compute", "compute", "compute", "block"]
    x = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 12, 8)]
    call = dict(x=x, cap_feats=kw["cap_feats"], t=torch.full((2,), 0.5), return_dict=False)
    with torch.no_grad(), pytest.warns(UserWarning, match="different shapes"):
        out = f(**call)[0]
    with torch.no_grad():
        for y, z in zip(out, model(**call)[0]):
            torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-5)


def test_graph_break_before_the_blocks_warns_of_nothing_with_caching_on_or_off():
    """Lumina2 breaks before its blocks; the graph that holds them reads intermediates. Compiled
    with caching, the graph that holds the blocks is cached by what the first graph recorded of
    the call (test_relay.py): nothing to say. With caching off (cache=None), nothing either: it
    used to say that the breaks keep mixcache from caching, which caching on shows untrue, and
    stats names cache=None."""
    model, kw = tiny_models.lumina2()
    with torch.no_grad():
        for cache in (None, "balanced"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": cache})
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                for t in (0.5, 0.4):
                    kw["timestep"] = torch.full_like(kw["timestep"], t)
                    out = compiled(**kw, return_dict=False)[0]
            said = _mixcache_warnings(rec)
            if cache is None:
                assert said == [], said
                with pytest.raises(ValueError, match="compiled with cache=None"):
                    dit_compile.stats(compiled)
            else:
                assert said == [] and len(dit_compile.stats(compiled)["trace"]) == 2, said
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", ["dynamo.install_free_tensors", "inductor.freezing"])
def test_weights_installed_as_graph_constants_fall_back_with_the_setting_named(setting):
    """Dynamo's install_free_tensors, and Inductor's freezing (an inference setting) under
    no_grad, put every weight into the graph as an attribute: the split failed on them with an
    internal AssertionError, whatever the options."""
    model, kw = tiny_models.wan(layers=2)
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
    module, name = setting.split(".")
    config = torch._dynamo.config if module == "dynamo" else torch._inductor.config
    with config.patch(**{name: True}), torch.no_grad():
        f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
        with pytest.warns(UserWarning, match=f"{name}=True installs the model"):
            out = f(**kw, return_dict=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_diffusers_cache_hooks_are_named_in_the_fallback_warning():
    from diffusers import FirstBlockCacheConfig
    model, kw = tiny_models.wan(layers=2)
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    compiled = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with (torch.no_grad(), model.cache_context("cond"),
          pytest.warns(UserWarning, match="mixcache") as rec):
        out = compiled(**kw, return_dict=False)[0]     # the first call computes every block
    assert "WanTransformer3DModel.disable_cache()" in _mixcache_warnings(rec)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)



def test_whole_graph_without_blocks_warns_the_region_pass_reason():
    """No graph break, no block stack: the reason is the region pass's, not graph breaks."""
    with pytest.warns(UserWarning, match=r"mixcache: Linear: no nn.ModuleList of two or more") as rec:
        torch.compile(torch.nn.Linear(3, 3), backend="mixcache", options={"regions": "eager"})(
            torch.ones(2, 3))
    assert len(_mixcache_warnings(rec)) == 1


def test_a_hook_added_after_compile_is_not_said_to_leave_the_model_uncached():
    """A forward hook registered after torch.compile is a graph of its own (one op, no block):
    it runs as it is, and nothing says the model runs without caching, since its forward is still
    cached (the schedule's step-2 reuse happens)."""
    model, kw = tiny_models.wan(layers=2)
    compiled = torch.compile(model, backend="mixcache",
                             options={"regions": "eager", "cache": {"rule": "schedule", "step": [2]}})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        for i, t in enumerate((900.0, 800.0, 700.0)):
            if i == 1:
                model.register_forward_hook(lambda mod, args, out: (out[0] * 2,))
            compiled(**dict(kw, timestep=torch.tensor([t])), return_dict=False)
    assert [r["action"] for r in dit_compile.stats(compiled)["trace"]] == [
        "compute", "compute", "step"]


def test_a_hook_that_reads_the_host_neither_spends_the_retrace_nor_warns():
    """A pre-hook reading the timestep on the host (a logging or progress hook), added after
    torch.compile: its frame's graph ends at that break, and was counted as a fragment of the
    forward, so a fallback was warned of while the forward cached, and the forward's one retrace
    was spent on it (Z-Image, whose first call breaks, then never cached). A hook's frame is
    not the forward's."""
    from dit_compile.frames import _retraced
    model, kw = tiny_models.wan(layers=2)
    compiled = torch.compile(model, backend="mixcache",
                             options={"regions": "eager", "cache": {"rule": "schedule", "step": [2]}})
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(float(kwargs["timestep"].max())), with_kwargs=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        for t in (900.0, 800.0, 700.0):
            compiled(**dict(kw, timestep=torch.tensor([t])), return_dict=False)
    assert seen == [900.0, 800.0, 700.0] and not _retraced(model)
    assert [r["action"] for r in dit_compile.stats(compiled)["trace"]] == [
        "compute", "compute", "step"]


def test_explain_leaves_dynamo_nothing_of_its_trace():
    """Each explain compiles with a backend of its own, and Dynamo kept every one's graphs on the
    forward's code: eight explains reached its recompile limit, after which a fullgraph=True
    compile of the model failed outright. None is left now."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from dit_compile.frames import _forward_codes
    model, kw = tiny_models.wan(layers=2)
    dit_compile.explain(model, **kw)
    assert all(_debug_get_cache_entry_list(c) == [] for c in _forward_codes(model))


def test_explain_reports_regions():
    model, kw = tiny_models.wan(layers=2)
    report = dit_compile.explain(model, **kw, return_dict=False)
    text = str(report)
    assert "stack blocks: 2 blocks" in text and "timestep=" in text
    # Wan's first block projects norm1(x) * (1 + scale) + shift: the residual stream's shape.
    assert report.modulated == report.streams["blocks"][0] == (1, 32, 16)
    assert "modulated input (teacache's signal): (1, 32, 16)" in text
    assert (report.block_graphs, report.twins) == (1, 0)
    assert "block graphs compiled: 1 for 2 blocks (identical blocks share one)\n" in text
    assert report.fallback is None
    # What the model was compiled with: each block its own compile, or none compiled; and no
    # caching (said beside the first: one explain, one trace, for both).
    for options, line in (({"share_blocks": False, "cache": None},
                           "2 for 2 blocks (share_blocks=False"),
                          ({"regions": "eager"}, "none (regions='eager'")):
        text = str(dit_compile.explain(torch.compile(model, backend="mixcache", options=options),
                                       **kw, return_dict=False))
        assert "block graphs compiled: " + line in text, text
        assert ("no caching: compiled with cache=None" in text) == ("cache" in options), text
    # HunyuanVideo's first single-stream block is handed strided views of the double stream's
    # tokens, its last is read in part: both run their middle mate's compile.
    model, kw = tiny_models.hunyuan(single_layers=3)
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert (report.block_graphs, report.twins) == (2, 2)
    assert "2 block(s) run a stack-mate's compile" in str(report)


def test_explain_names_the_other_conditions_mixcache_watches():
    """Flux's pooled text is a condition beside the latent, timestep and text: MixCache computes
    a call where one switched (a ControlNet's residuals, in its pipeline). Its rotary ids feed a
    sinusoid, as a second timestep would, and LTX-2's audio latent has an output's shape: those
    move at every step by design, and are not watched."""
    model, kw = tiny_models.flux()
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.conditions == ["l_kwargs_pooled_projections_"]
    assert "other conditions" in str(report)
    wan, wan_kw = tiny_models.wan(layers=2)
    assert dit_compile.explain(wan, **wan_kw, return_dict=False).conditions == []
    ltx2, ltx2_kw = zoo_video.ltx2()
    watched = dit_compile.explain(ltx2, **ltx2_kw).conditions
    assert "l_kwargs_audio_encoder_hidden_states_" in watched
    assert "l_kwargs_audio_hidden_states_" not in watched


def test_explain_names_graph_breaks_when_no_graph_has_blocks():
    other, other_kw = tiny_models.lumina2()         # breaks too, for reasons of its own
    report = dit_compile.explain(other, **other_kw, return_dict=False)
    # fullgraph=True raises at its break: the report is of the fragments, the blocks in one.
    assert report.breaks and report.stacks == {"layers": 2}, report
    model, kw = _wan_with_graph_break()
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.graphs > 1 and not report.stacks
    # Where the break is: inside the block loop, which then runs outside the graphs.
    assert report.loose == ["blocks"], report.loose
    assert "stack blocks: no graph holds its blocks (a break inside the loop" in str(report)
    assert report.fallback.startswith(f"the forward traced as {report.graphs} graphs (graph breaks)")
    # Dynamo's own reason, and only this trace's: another model's break earlier in the process
    # is not this model's.
    assert len(report.breaks) == 1 and "graph_break()" in report.breaks[0], report.breaks
    assert "graph break: " in str(report)
    again = dit_compile.explain(model, **kw, return_dict=False)
    assert [b.splitlines()[0] for b in again.breaks] == [b.splitlines()[0] for b in report.breaks]


def test_explain_of_a_forward_broken_between_stacks_reports_both_stacks():
    """Kandinsky 5 broken between its text stack (2 blocks, the first graph) and its visual stack
    (3 blocks, a later graph): both stacks are reported, and the block graphs of both graphs (each
    compiles its own), as the backend compiles them; the inputs and regions are of the graph with
    the most blocks, the visual one, not of the first graph that holds blocks."""
    model, kw = tiny_models.kandinsky5()
    model.visual_rope_embeddings.register_forward_pre_hook(
        lambda mod, args: torch._dynamo.graph_break())
    report = dit_compile.explain(model, **kw)
    assert report.graphs > 1 and report.fallback.startswith("the forward traced as"), str(report)
    assert report.stacks == {"text_transformer_blocks": 2, "visual_transformer_blocks": 3}, str(report)
    assert report.graphs_with_blocks == 2 and "blocks in 2 graphs" in str(report), str(report)
    assert [n for n, _ in report.regions if "blocks" in n] == [
        f"visual_transformer_blocks.{i}" for i in range(3)], report.regions
    assert "block graphs compiled: 2 for 5 blocks" in str(report), str(report)


def test_explain_leaves_later_compiles_static(monkeypatch):
    """explain's trace at one size must not teach Dynamo that the shape changes: compiling at
    another size afterwards gives a static-shape graph, as it does without explain."""
    model, kw = tiny_models.wan(layers=2, size=8)
    _, small = tiny_models.wan(layers=2, size=4)
    dit_compile.explain(model, **small, return_dict=False)
    graphs = []
    real = backend.find_regions
    monkeypatch.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real(gm))
    with torch.no_grad():
        torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})(
            **kw, return_dict=False)
    assert len(graphs) == 1
    inputs = [n.meta["example_value"] for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert all(isinstance(x, torch.Tensor) for x in inputs), "a symbolic size became an input"
    assert all(isinstance(d, int) for x in inputs for d in x.shape)


def test_explain_reports_the_calls_sizes_whatever_ran_before():
    """After the model ran at two sizes (Dynamo's shape history then marks its sizes dynamic),
    explain traced symbolic sizes: a stream of 's22*((s18//2))*((s42//2))' tokens, for a model
    compiled with dynamic=False. It reports the call's own, and leaves the history as it was: the
    compiled model's next trace (explain makes it trace again) is of dynamic sizes still."""
    model, kw = tiny_models.wan(layers=2)

    def at(frames, size):
        return dict(kw, hidden_states=torch.randn(1, 4, frames, size, size), return_dict=False)
    first = dit_compile.explain(model, **at(2, 8)).streams
    compiled = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})
    with torch.no_grad():
        compiled(**at(2, 8))
        compiled(**at(3, 12))       # a dynamic-shape graph from here
    assert dit_compile.explain(compiled, **at(2, 8)).streams == first == {"blocks": [(1, 32, 16)]}
    graphs = []
    real = backend.find_regions
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real(gm))
        compiled(**at(4, 16))
    sizes = [d for n in graphs[0].graph.nodes if n.op == "placeholder"
             and isinstance(n.meta["example_value"], torch.Tensor) for d in n.meta["example_value"].shape]
    assert len(graphs) == 1 and any(isinstance(d, torch.SymInt) for d in sizes)


def test_explain_traces_under_error_on_recompile():
    """explain's trace is one more of the forward's code: with error_on_recompile set for the
    user's compiled calls, Dynamo raised at it, naming diffusers' wrapper, not explain."""
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    compiled = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})
    with torch.no_grad():
        compiled(**kw)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert dit_compile.explain(model, **kw).streams == {"blocks": [(1, 32, 16)]}


@pytest.mark.parametrize("name,n", [("hidream", 4), ("nucleus", 2)])
def test_moe_lowered_under_the_backend_then_one_graph(name, n):
    """Compiled as it is, the first call breaks at the MoE dispatches; the backend lowers them in
    place (saying so) and has Dynamo trace the forward again: the next call is one graph holding
    the fused ops, its stacks found (no fallback warning), its output that of the original model."""
    from dit_compile.passes.moe import count_moe_ops, find_moe
    model, kw = tiny_models.hidream(patchified=True) if name == "hidream" else tiny_models.nucleus()
    ops = []

    def counting(gm, example_inputs):       # mixcache, counting the graphs it gets
        ops.append(count_moe_ops(gm))
        return backend.mixcache(gm, example_inputs, options={"regions": "eager", "cache": None})

    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        with pytest.warns(UserWarning, match="mixcache") as rec:
            first = compiled(**kw, return_dict=False)[0]
        assert len(ops) > 1     # fragments: the first dispatch broke the trace before the lowering
        (moe,) = _mixcache_warnings(rec)            # and no fallback warning: the next is whole
        assert f"{n} MoE dispatch(es)" in moe and f"lowered {n} in place" in moe
        assert all(find_moe(model).values())
        ops.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = compiled(**kw, return_dict=False)[0]
    assert ops == [n]
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
    assert dit_compile.restore_moe(model) == n and not any(find_moe(model).values())


def test_moe_lowered_before_the_trace_so_fullgraph_works():
    """As a mixcache compile starts, Dynamo's start callback lowers the model's MoE dispatches in
    place (saying so), so the first trace is whole: fullgraph=True compiles the unmodified model
    (NucleusMoE here; HiDream in a fresh process below), in one graph, its output the original
    model's. Another backend's compile leaves a model as it is, and so does lower_moe=False."""
    from dit_compile.frames import install_trace_hook
    from dit_compile.passes.moe import find_moe
    model, kw = tiny_models.nucleus()
    n = 2
    torch._dynamo.reset()
    install_trace_hook()          # the reset dropped Dynamo's callbacks; a fresh process has it
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        torch.compile(model, backend="eager")(**kw, return_dict=False)
        assert not any(find_moe(model).values())
        torch.compile(model, backend="mixcache", options={"lower_moe": False, "cache": None, "regions": "eager"})(
            **kw, return_dict=False)
        assert not any(find_moe(model).values())
        torch._dynamo.reset()
        install_trace_hook()
        graphs = []
        real = backend.find_regions
        with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="mixcache") as rec:
            mp.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real(gm))
            out = torch.compile(model, backend="mixcache", fullgraph=True,
                                options={"regions": "eager"})(**kw, return_dict=False)[0]
    (said,) = _mixcache_warnings(rec)
    assert f"{n} MoE dispatch(es)" in said and f"lowered {n} in place before tracing" in said
    assert len(graphs) == 1 and all(find_moe(model).values())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert dit_compile.restore_moe(model) == n


def test_moe_model_compiles_fullgraph_in_a_fresh_process_without_import():
    """What a user runs: a fresh interpreter, no import of dit_compile, HiDream as diffusers makes
    it, torch.compile(..., backend="mixcache", fullgraph=True): one graph, eager's output."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import tiny_models
        model, kw = tiny_models.hidream()
        with torch.no_grad():
            ref = model(**kw, return_dict=False)[0]
            out = torch.compile(model, backend="mixcache", fullgraph=True,
                                options={"regions": "eager"})(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code, os.path.dirname(__file__)],
                       capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_hidream_after_moe_lowering_is_one_graph_with_regions():
    """With its MoE lowered, the forward is one graph up to unpatchify's .item(), its stacks found;
    without fullgraph=True the rest runs eagerly, so the backend caches nothing: explain says so
    (it reported one clean graph). Under fullgraph=True the whole forward is one graph, stitched
    output equal to eager: the fresh-process test above, same model and compile."""
    model, kw = tiny_models.hidream()
    assert dit_compile.lower_moe(model) == 4
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.graphs == 1 and "one graph that ends at a graph break" in report.fallback
    assert "fullgraph=True) captures those operators" in report.fallback
    assert report.stacks == {"double_stream_blocks": 2, "single_stream_blocks": 2}


def test_source_folders_are_not_top_level_packages_in_the_tests():
    """From the repository's root, `python -m pytest` would import kernels/ as `kernels`, which
    transformers imports for Hugging Face's package (conftest.py takes the root off the path)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("kernels", "passes", "runtime"):
        spec = importlib.util.find_spec(name)
        where = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), ""))
        assert not where or not os.path.abspath(where).startswith(root + os.sep), where


def test_wheel_installs_subpackages_under_dit_compile_only(tmp_path):
    """passes/, runtime/ and kernels/ ship as dit_compile.*, never as top-level packages.

    Built as a user's ``pip wheel .`` builds it, in an isolated environment where pip installs
    what the build backend asks for. With the test environment's own setuptools instead, it failed
    in a fresh Python 3.11 venv, whose setuptools (65.5) cannot build a wheel without the ``wheel``
    package, which only an isolated build adds."""
    import zipfile
    root = os.path.join(os.path.dirname(__file__), "..")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(tmp_path), root], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dit_compile"}
    for sub in ("passes/regions.py", "runtime/executor.py", "kernels/moe_op.py"):
        assert f"dit_compile/{sub}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mixcache = dit_compile.backend:mixcache" in zipfile.ZipFile(wheel).read(entry).decode()


def _shares(counts):
    return [c / sum(counts) for c in counts]


def test_piece_flops_are_counted_not_guessed():
    """Wan's prologue makes a real tensor (rotary frequencies) beside the fake inputs: its FLOPs
    are still counted, so the prologue and epilogue weigh something and the shares are the
    pieces' own, not the equal-blocks fallback."""
    from conftest import capture
    from dit_compile.passes.regions import find_regions
    from dit_compile.passes.split import split
    model, kw = tiny_models.wan(layers=3)
    gm = capture(model, kw)
    plan = split(gm, find_regions(gm))
    shares = _shares(flops.piece_flops(plan))
    kinds = [p.region.kind for p in plan.pieces]
    assert sum(shares) == pytest.approx(1.0)
    assert shares[kinds.index("prologue")] > 0 and shares[kinds.index("epilogue")] > 0, shares
    blocks = [s for s, k in zip(shares, kinds) if k == "block"]
    assert blocks[0] == pytest.approx(blocks[-1]) and blocks[0] != pytest.approx(1 / 3), shares


def test_piece_flops_that_cannot_be_counted_weigh_the_blocks_equally_and_the_rest_nothing(
        monkeypatch):
    """Where fake execution cannot count the pieces, each block weighs one and the prologue and
    epilogue nothing: a span of blocks reused is then its share of the blocks, not of every
    piece, and a call of that graph weighs nothing beside a counted graph's in ``stats``."""
    from conftest import capture
    from dit_compile.passes.regions import find_regions
    from dit_compile.passes.split import split

    def uncountable():
        raise RuntimeError("no counting here")
    model, kw = tiny_models.wan(layers=3)
    gm = capture(model, kw)
    plan = split(gm, find_regions(gm))
    monkeypatch.setattr(flops, "flop_counter", uncountable)
    assert [p.region.kind for p in plan.pieces] == [
        "prologue", "block", "block", "block", "epilogue"]
    assert flops.piece_flops(plan) == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_piece_flops_count_attention_on_the_cpu():
    """torch's FlopCounterMode counts the CUDA kernels of scaled_dot_product_attention but not the
    CPU's flash kernel, which the CPU runs for it: on the CPU a block's attention weighed nothing,
    so the shares (and every FLOPs fraction from them) differed from the GPU's. Checked against
    the matmuls counted per module plus attention by its formula (QK^T and AV, self and cross)."""
    from torch.utils.flop_counter import FlopCounterMode
    from conftest import capture
    from dit_compile.passes.regions import find_regions
    from dit_compile.passes.split import split
    model, kw = tiny_models.wan(layers=3)
    gm = capture(model, kw)
    plan = split(gm, find_regions(gm))
    shares = _shares(flops.piece_flops(plan))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**kw, return_dict=False)
    counts = fc.get_flop_counts()

    def matmuls(path):
        return sum(n for op, n in counts[path].items() if "attention" not in str(op))
    tokens, dim, text = 32, 16, 5        # 2 frames of 4 x 4 patches; 2 heads of 8; 5 text tokens
    attention = 4 * tokens * tokens * dim + 4 * tokens * text * dim
    block = matmuls("WanTransformer3DModel.blocks.0") + attention
    total = matmuls("Global") + 3 * attention
    blocks = [s for s, p in zip(shares, plan.pieces) if p.region.kind == "block"]
    assert blocks == pytest.approx([block / total] * 3)


def test_counting_flops_leaves_other_threads_compiled_calls_alone(monkeypatch):
    """While a compile counts its pieces' FLOPs, another thread calls a compiled model (a server;
    two sketch/render splits in two threads). The counter's module tracker registered
    process-wide module hooks for the count's duration; that thread's compiled call ran them,
    and Dynamo failed tracing them ("already tracked for mutation"). Here the other thread's
    call runs inside each count."""
    import threading

    import torch.utils.flop_counter as flop_counter
    warm, kw = tiny_models.wan(layers=2)
    compiled = torch.compile(warm, backend="mixcache", options={"regions": "eager"})
    with torch.no_grad():
        compiled(**kw)
    errors, threads = [], []

    def call_in_another_thread():
        try:
            with torch.no_grad():
                compiled(**kw)
        except Exception as why:  # noqa: BLE001 (the failure is the finding)
            errors.append(why)

    class Counting(flop_counter.FlopCounterMode):
        def __enter__(self):
            entered = super().__enter__()
            thread = threading.Thread(target=call_in_another_thread)
            thread.start()
            thread.join(timeout=5)      # it finishes at once; it blocked where it failed
            threads.append(thread)
            return entered
    monkeypatch.setattr(flop_counter, "FlopCounterMode", Counting)
    model, _ = tiny_models.wan(layers=3)
    with torch.no_grad():
        torch.compile(model, backend="mixcache", options={"regions": "eager"})(**kw)
    for thread in threads:
        thread.join()
    assert threads and not errors, errors


def test_piece_flops_counted_under_dynamic_shapes_without_error_logs(caplog):
    """Under dynamic=True the pieces' example inputs have symbolic sizes, on which HunyuanVideo's
    broadcasts fail in the fake kernels: the count fell back to equal blocks, after an ERROR log
    with a traceback that a user would take for a failure. Counted at the sizes of the call being
    compiled, the shares are the static compile's."""
    from dit_compile.passes.regions import find_regions
    from dit_compile.passes.split import split

    def shares(dynamic):
        graphs = []

        def record(gm, example_inputs, **_):
            graphs.append((split(gm, find_regions(gm)), example_inputs))
            return gm.forward
        torch._dynamo.reset()
        model, kw = tiny_models.hunyuan(batch=2)
        with torch.no_grad():
            torch.compile(model, backend=record, fullgraph=True, dynamic=dynamic)(
                **kw, return_dict=False)
        return _shares(flops.piece_flops(*graphs[-1]))

    with caplog.at_level(logging.ERROR):
        static, dynamic = shares(False), shares(True)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[:2000]
    assert dynamic == pytest.approx(static)
    assert static[0] > 0        # counted: the fallback gives the prologue nothing


def test_where_autograd_records_nothing_is_cached_and_gradients_match_eager():
    """A training loop (timesteps drawn at random, so often falling like a sampler's) under a
    forced schedule that reuses from the second call: where autograd records, a reused output
    would be another batch's and carry its graph. Nothing is cached, the user is told why once,
    and outputs and gradients equal eager's. Under no_grad the same compiled model caches."""
    from test_cache import generation
    model, kw = tiny_models.wan(layers=3)
    model.train()
    f = torch.compile(model, backend="mixcache", fullgraph=True,
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [1, 2, 3]}})
    torch.manual_seed(1)
    batches = [(torch.randn_like(kw["hidden_states"]), torch.full((1,), t))
               for t in (900.0, 700.0, 500.0, 300.0)]

    def train_step(fn, x, t):
        model.zero_grad()
        out = fn(**dict(kw, hidden_states=x, timestep=t), return_dict=False)[0]
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = [train_step(f, x, t) for x, t in batches]
    said = [w for w in caught if "autograd records" in str(w.message)]
    assert len(said) == 1 and "WanTransformer3DModel" in str(said[0].message)
    for (out, grads), (x, t) in zip(ours, batches):
        ref_out, ref_grads = train_step(model, x, t)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    model.eval()
    kw["return_dict"] = False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        generation(f, kw)       # under no_grad: recompiled for that grad mode, and cached
    assert dit_compile.stats(f)["reused"]["step"] == 6     # 3 steps x 2 branches


def test_a_trainable_block_beside_frozen_mates_compiles_apart_and_gets_its_gradients():
    """Fine-tuning one block of a stack: its graph is its frozen mates' op for op, but
    AOTAutograd compiles the frozen one's without a backward. Shared, the trainable block ran it
    and its parameters got no gradient at all, silently. (Inductor for the blocks alone: they are
    what is shared; the prologue's and epilogue's compiles, backwards included, add nothing.)"""
    model, kw = tiny_models.wan(layers=2)
    model.requires_grad_(False)
    model.blocks[1].requires_grad_(True)
    f = torch.compile(model, backend="mixcache", options={"regions": "blocks", "cache": None})
    f(**kw, return_dict=False)[0].square().mean().backward()
    ours = [p.grad for p in model.blocks[1].parameters()]
    model.zero_grad()
    model(**kw, return_dict=False)[0].square().mean().backward()
    for g, p in zip(ours, model.blocks[1].parameters()):
        assert g is not None
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_the_eager_first_call_of_eager_then_compile_is_no_broken_forward():
    """set_stance("eager_then_compile") runs the forward's first call eagerly and compiles the
    blocks' frames from the second block on: those graphs were taken for fragments of a forward
    broken by graph breaks, with a warning that nothing would be cached."""
    from test_cache import generation
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2, 3]}})
    with torch.compiler.set_stance("eager_then_compile"), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        generation(f, kw)
        generation(f, kw)
    assert dit_compile.stats(f)["reused"]["step"] > 0


def test_a_compiled_function_that_computes_outside_the_model_caches_nothing():
    """torch.compile of a whole denoising step (the model, then the sampler's update): the
    graph's output is the next latent, not the model's output, and step reuse of it returned the
    last latent unchanged (the sampler stalled). Said, and computed in full; a function that only
    calls the model still caches."""
    model, kw = tiny_models.wan(layers=2)
    text = kw["encoder_hidden_states"]

    def denoise_step(latent, t, dt):
        v = model(hidden_states=latent, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        return latent + dt * v

    schedule = {"regions": "eager", "cache": {"rule": "schedule", "step": [2]}}
    f = torch.compile(denoise_step, backend="mixcache", options=schedule)
    x = kw["hidden_states"]
    with torch.no_grad(), pytest.warns(UserWarning, match="computes outside the model it calls"):
        for t in (900.0, 700.0, 500.0):
            t = torch.full((1,), t)
            torch.testing.assert_close(f(x, t, -0.2), denoise_step(x, t, -0.2))
            x = denoise_step(x, t, -0.2)
    torch._dynamo.reset()
    g = torch.compile(lambda **k: model(**k), backend="mixcache", options=schedule)
    with torch.no_grad():
        outs = [g(**{**kw, "timestep": torch.full((1,), t)}, return_dict=False)[0]
                for t in (900.0, 700.0, 500.0)]
    assert torch.equal(outs[2], outs[1])


def test_small_glue_is_glue_of_at_most_four_operations():
    """Glue of up to four operations runs as it is; a fifth makes it worth a compile, and any
    other region, however small (a block), is compiled."""
    from types import SimpleNamespace
    from dit_compile.passes.regions import BLOCK, GLUE

    def piece(kind, ops):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        for _ in range(ops):
            x = graph.call_function(torch.neg, (x,))
        graph.output(x)
        return SimpleNamespace(region=SimpleNamespace(kind=kind),
                               module=torch.fx.GraphModule(torch.nn.Module(), graph))

    assert inductor._small_glue(piece(GLUE, 4)) and not inductor._small_glue(piece(GLUE, 5))
    assert not inductor._small_glue(piece(BLOCK, 1))


def test_a_span_its_blocks_do_not_hold_is_an_error_where_a_compile_saw_as_many_blocks():
    """A cache span that a graph of all the model's blocks does not hold is an error, also where an
    earlier compile of the model recorded that many blocks: only a graph of fewer (a call that
    skips some) runs uncached with a warning instead."""
    model, kw = tiny_models.wan(layers=3)
    with torch.no_grad():
        torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})(**kw)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"span=\[1, 9\]: must satisfy"):
            torch.compile(model, backend="mixcache", options={
                "regions": "eager", "cache": {"rule": "schedule", "block": [1], "span": [1, 9]}})(**kw)


def test_strides_compare_alike_where_a_dimension_has_size_one():
    """A dimension of size 1 takes any stride: [1, 3] laid out (1, 1) or (3, 1) is one layout, so
    an Inductor output in either is not copied, and a dense value of a dynamic graph keeps its
    order of dimensions whatever its size-1 strides."""
    assert inductor._same_strides((1, 3), (1, 1), (3, 1))
    assert not inductor._same_strides((2, 3), (1, 2), (3, 1))
    assert inductor._dense((2, 1, 3), [2, 1, 0]) == (3, 3, 1)


def test_eager_regions_compile_nothing(monkeypatch):
    """regions="eager": no piece goes to Inductor, the blocks included."""
    model, kw = tiny_models.wan(layers=2)
    compiled = []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, *a, **k: compiled.append(gm) or gm.forward)
    with torch.no_grad():
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"cache": None, "regions": "eager"})(**kw, return_dict=False)[0]
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    assert compiled == []


def test_a_dynamic_dense_value_is_laid_out_by_its_order_of_dimensions():
    """Under dynamic shapes a traced value's strides are expressions of the sizes: a dense one
    (here transposed, [s0, s1] with strides (1, s0)) is laid out at a call's sizes in its own
    order of dimensions, innermost first, not in row-major order; a value that is not dense is
    left as it comes (None)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def traced(real):
        return mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] * real.dim()))

    assert inductor._traced_layout(traced(torch.empty(3, 4).t()))((5, 6)) == (1, 5)
    assert inductor._traced_layout(traced(torch.empty(3, 4)))((5, 6)) == (6, 1)
    assert inductor._traced_layout(traced(torch.empty(3, 8)[:, ::2])) is None
