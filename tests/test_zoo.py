"""More of diffusers' DiTs (here, and tiny configs of 37 more in zoo_video.py and zoo_image.py):
the region pass finds their stacks and inputs with no per-model table, and a forced schedule reuses
what it says.

Single-stack models are checked against the eager reference of the reuse rules (step, cfg and block
reuse, ``reference_cache.Reference`` wrapping the model's own blocks); models with several stacks
(dual-stream, interleaved, control blocks) by their computed calls against eager, and by their
counts.
"""
import inspect
import warnings

import pytest
import torch

import dit_compile
from dit_compile import backend
import zoo_image
import zoo_video
from reference_cache import Reference
from test_cache import STEPS, compiled, generation
from tiny_models import diffusers_version, seeded


def sana():
    m = seeded("SanaTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=3,
               attention_head_dim=8, num_attention_heads=2, num_cross_attention_heads=2,
               cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
               sample_size=8)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0))


def pixart():
    m = seeded("PixArtTransformer2DModel", sample_size=8, num_layers=3, patch_size=2,
               attention_head_dim=8, num_attention_heads=2, in_channels=4, cross_attention_dim=16,
               out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
               num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
               norm_eps=1e-6, use_additional_conditions=False, caption_channels=16)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0),
                   added_cond_kwargs={"aspect_ratio": None, "resolution": None})


def ltx():
    """Video latents flattened to tokens, frame and patch counts as Python ints."""
    m = seeded("LTXVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16)
    return m, dict(hidden_states=torch.randn(1, 2 * 4 * 4, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), encoder_attention_mask=torch.ones(1, 6),
                   num_frames=2, height=4, width=4)


def hunyuandit():
    """The second half of the blocks reads long skips from the first half."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    m = seeded("HunyuanDiT2DModel", sample_size=8, patch_size=2, num_attention_heads=2,
               attention_head_dim=8, in_channels=4, cross_attention_dim=16, cross_attention_dim_t5=16,
               pooled_projection_dim=8, hidden_size=16, num_layers=6, text_len=6, text_len_t5=6)
    with torch.no_grad():   # the skip projections: give the long skips weight
        for name, p in m.named_parameters():
            if "skip" in name:
                p.normal_(0, 0.3)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16), text_embedding_mask=torch.ones(1, 6),
                   encoder_hidden_states_t5=torch.randn(1, 6, 16),
                   text_embedding_mask_t5=torch.ones(1, 6),
                   image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]),
                   style=torch.zeros(1, dtype=torch.long),
                   image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4),
                                                            output_type="pt"))


def latte():
    """Spatial and temporal blocks interleaved: two stacks, one loop."""
    m = seeded("LatteTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
               out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
               activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
               norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
               caption_channels=16, video_length=2)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16), enable_temporal_attentions=True)


def wan_vace():
    """Control blocks whose hints the main blocks add."""
    m = seeded("WanVACETransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2,
               attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
               ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
               vace_in_channels=8)
    with torch.no_grad():   # zero-initialised hint projections: give the control a path
        for name, p in m.named_parameters():
            if "vace_blocks" in name and "proj_out" in name:
                p.normal_(0, 0.1)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 5, 16),
                   control_hidden_states=torch.randn(1, 8, 2, 8, 8))


def qwenimage():
    """Dual-stream blocks that return (text, image), text first."""
    m = seeded("QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4,
               num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
               axes_dims_rope=(8, 4, 4))
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 7, 16),
              encoder_hidden_states_mask=torch.ones(1, 7), timestep=torch.full((1,), 500.0),
              img_shapes=[[(1, 4, 4)]])
    if "txt_seq_lens" in inspect.signature(type(m).forward).parameters:
        kw["txt_seq_lens"] = [7]    # older diffusers (0.35) did not read it off the mask
    return m, kw


# name: (factory, stacks the region pass must find, the single stack's attribute or None)
ZOO = {
    "sana": (sana, {"transformer_blocks": 3}, "transformer_blocks"),
    "pixart": (pixart, {"transformer_blocks": 3}, "transformer_blocks"),
    "ltx": (ltx, {"transformer_blocks": 3}, "transformer_blocks"),
    "hunyuandit": (hunyuandit, {"blocks": 6}, "blocks"),
    "latte": (latte, {"transformer_blocks": 2, "temporal_transformer_blocks": 2}, None),
    "wan_vace": (wan_vace, {"vace_blocks": 2, "blocks": 2}, None),
    "qwenimage": (qwenimage, {"transformer_blocks": 2}, None),
    **zoo_video.ZOO,
    **zoo_image.ZOO,
}
SCHEDULE = dict(step=[2], cfg=[3], block=[4])
# The text and timestep arguments, where they are not encoder_hidden_states and timestep.
TEXT = {"ernie_image": "text_bth", "cosmos3_omni": "input_ids"}
TIMESTEP = {"cosmos3_omni": "vision_timesteps"}
# Nested too: one model for each form its blocks' arguments take (nest_blocks hands them to the
# region flat and copies tensors that share storage, so what can break is in their forms, not in
# the model): tuples in tuples (allegro), a list (ernie_image), ints (helios, sana, motif_video),
# bools (ltx2), positional Nones (cogview4, latte), a None keyword (flux2), long skips
# (hunyuandit), control and interleaved stacks (wan_vace, wan_animate), a stack held in an
# nn.Sequential (longcat_audio). The other 31 add time to every CI run (about 4 s each on 2
# cores) and no form these lack.
NESTED = {"allegro", "cogview4", "ernie_image", "flux2", "helios", "hunyuandit", "latte",
          "longcat_audio", "ltx2", "motif_video", "sana", "wan_animate", "wan_vace"}


@pytest.mark.parametrize("name,nested", [(n, False) for n in sorted(ZOO)]
                         + [(n, True) for n in sorted(NESTED)],
                         ids=lambda v: v if isinstance(v, str) else ("nested" if v else "inlined"))
def test_more_diffusers_dits(name, nested, monkeypatch):
    """``nested``: the blocks as nested compile regions (``nest_blocks``): found, guarded and
    reused as the inlined ones. The region map is the backend's own (``explain`` reports the same
    map, from a trace of its own that would double the time of each model here)."""
    make, stacks, blocks_attr = ZOO[name]
    model, kw = make()
    if nested:
        assert dit_compile.nest_blocks(model) >= sum(stacks.values())
    found = []
    monkeypatch.setattr(backend, "find_regions",
                        lambda gm, real=backend.find_regions: found.append(real(gm)) or found[-1])
    text = TEXT.get(name, "encoder_hidden_states")
    timestep = TIMESTEP.get(name, "timestep")
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", **SCHEDULE})
    ours = generation(f, kw, text=text, timestep=timestep)
    assert len(found) == 1 and found[0].stacks == stacks, found
    # Each stack carries a stream from block to block, also where it passes through glue or
    # through the blocks of a stack interleaved with it (Latte, ConsisID, Wan-Animate).
    assert all(found[0].streams.get(s) for s in stacks), found[0].streams
    # The branches' condition: the graph input of the text argument (l_[kwargs_]<name>_).
    assert {"latent", "timestep", "text"} <= set(found[0].inputs)
    assert found[0].inputs["text"].endswith(f"_{text}_"), found[0].inputs
    counts = dit_compile.stats(f)["reused"]
    assert counts == {"step": 2, "cfg": 1, "block": 2}, counts
    if blocks_attr is not None:
        ref = Reference(model, blocks_attr=blocks_attr, **SCHEDULE).start(STEPS[0])
        theirs = generation(ref, kw, text=text, timestep=timestep)
    else:   # computed calls against eager; reused ones only where a reference exists
        theirs = generation(model, kw, text=text, timestep=timestep)
        computed = [i for i, r in enumerate(dit_compile.stats(f)["trace"]) if r["action"] == "compute"]
        ours, theirs = [ours[i] for i in computed], [theirs[i] for i in computed]
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")



@pytest.mark.parametrize("cache", [{"rule": "schedule", "step": [2], "block": [4]}, "fast"])
def test_a_model_without_text_caches_by_latent_and_timestep(cache, monkeypatch):
    """Kandinsky 6's super-resolution stage takes the latent and the timestep only (one call a
    step, no guidance): nothing to tell branches or batched guidance by, and nothing needed. A
    schedule reuses as the reference does; the ``fast`` preset, whose per-sample decisions
    look for batched guidance branches by the text, reuses steps."""
    model, kw = zoo_video.kandinsky6_sr()
    found = []
    monkeypatch.setattr(backend, "find_regions",
                        lambda gm, real=backend.find_regions: found.append(real(gm)) or found[-1])

    def run(f):     # one call a step; the reference returns the output, the model a tuple
        with torch.no_grad():
            ys = [f(**dict(kw, timestep=torch.full((1,), t)), return_dict=False) for t in STEPS]
        return [y[0] if isinstance(y, tuple) else y for y in ys]

    f = torch.compile(model, backend="mixcache", fullgraph=True,
                      options={"regions": "eager", "cache": cache})
    ours = run(f)
    assert "text" not in found[0].inputs, found[0].inputs
    if isinstance(cache, dict):
        assert dit_compile.stats(f)["reused"] == {"step": 1, "block": 1}
        ref = Reference(model, blocks_attr="visual_transformer_blocks", step=[2], block=[4])
        for i, (x, y) in enumerate(zip(ours, run(ref.start(STEPS[0])))):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    else:
        assert dit_compile.stats(f)["reused"].get("step", 0) >= 1


@pytest.mark.parametrize("name", ["QwenImage21Transformer2DModel", "DreamLiteTransformer2DModel"])
def test_models_nothing_can_be_cached_by_run_as_eager_and_say_why(name):
    """Qwen-Image 2.1 breaks eleven times before its blocks, its first graph takes no timestep,
    and no tensor of it reaches the blocks' graph (eager code rebuilds what they take): no
    record of the call's inputs can reach them. DreamLite's transformer, a module of its U-Net,
    is called with no timestep. Both run uncached under the default cache, each call equal to
    eager, and one warning names why."""
    g = torch.Generator().manual_seed(0)
    if name == "QwenImage21Transformer2DModel":
        model = seeded(name, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, context_in_dim=16, axes_dims_rope=(4, 6, 6))
        # 5 text slots and the 4 x 4 target latent's 4 image slots (2 x 2 tokens each)
        kw = dict(hidden_states=torch.randn(1, 16, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  img_shapes=[[(1, 4, 4)]], img_mask=torch.tensor([[False] * 5 + [True] * 4]))
        calls = [dict(kw, timestep=torch.tensor([t / 1000])) for t in STEPS[:3]]
        why = "graph breaks split its forward into several graphs"
    else:
        model = seeded(name, num_attention_heads=2, attention_head_dim=4, in_channels=8,
                       num_layers=2, norm_num_groups=4, cross_attention_dim=8)
        calls = [dict(hidden_states=torch.randn(1, 8, 4, 4, generator=g),
                      encoder_hidden_states=torch.randn(1, 3, 8, generator=g))] * 2
        why = "could not tell which input is the timestep"
    f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for i, call in enumerate(calls):
            torch.testing.assert_close(f(**call, return_dict=False)[0],
                                       model(**call, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5, msg=f"call {i}")
    said = [str(w.message) for w in rec if str(w.message).startswith("mixcache")]
    assert len(said) == 1 and why in said[0], said
    with pytest.raises(ValueError, match="no mixcache state"):
        dit_compile.stats(f)


def mochi():
    """Its attention keeps each sample's valid text tokens with nonzero: a graph break per block
    unless Dynamo captures ops whose output shape depends on data."""
    m = seeded("MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8,
               num_layers=3, pooled_projection_dim=16, in_channels=4, out_channels=None,
               qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
               max_sequence_length=16)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0),
                   encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))


def test_mochi_caches_once_its_breaks_are_captured(caplog):
    """explain names Mochi's break with Dynamo's hint, and says that fullgraph=True, which captures
    the operator (Dynamo's flag for it is on under fullgraph), makes the forward one graph: it
    reports that graph. Compiled so, it is cached as a forced schedule says (computed calls equal
    eager), and the FLOP count, which cannot run the padding of a size known only at run time,
    falls back without an error in the log."""
    model, kw = mochi()
    kw["return_dict"] = False
    report = dit_compile.explain(model, **kw)
    assert report.graphs > 1 and any("capture_dynamic_output_shape_ops = True" in b
                                     for b in report.breaks), report
    assert "fullgraph=True) captures those operators" in report.fallback, report
    assert report.stacks == {"transformer_blocks": 3} and report.inputs["text"], report
    # The report is of the one graph: no line saying no graph holds the blocks (the broken
    # trace's), and its first two blocks are one graph to compile (each selects its text with
    # nonzero, a size of its own name, u0 and u1, named in its runtime assertions: each
    # compiled apart, 47 compiles for Mochi's 48 blocks), the last another.
    assert not report.loose and "no graph holds" not in str(report), report
    assert report.block_graphs == 2, report
    f = compiled(model, {"rule": "schedule", **SCHEDULE})      # fullgraph=True, nothing else
    ours = generation(f, kw)
    theirs = generation(model, kw)
    trace = dit_compile.stats(f)["trace"]
    assert dit_compile.stats(f)["reused"] == {"step": 2, "cfg": 1, "block": 2}
    for i in [i for i, r in enumerate(trace) if r["action"] == "compute"]:
        torch.testing.assert_close(ours[i], theirs[i], rtol=1e-5, atol=1e-5, msg=f"call {i}")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.records


def framepack():
    """Its text is cut to the mask's length with ``.item()``: a size known only at run time, which
    its blocks pass on beside the streams."""
    m = seeded("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4,
               num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
               num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
               text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
               image_condition_type=None, has_image_proj=True, image_proj_dim=16,
               has_clean_x_embedder=True)
    idx = torch.arange(10)
    pre, x4, x2, x1, lat = idx.split([1, 4, 2, 1, 2])
    mask = torch.ones(1, 6)
    mask[:, -1] = 0
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=mask,
                   pooled_projections=torch.randn(1, 8), image_embeds=torch.randn(1, 5, 16),
                   indices_latents=lat, guidance=torch.full((1,), 6000.0),
                   latents_clean=torch.randn(1, 4, 2, 8, 8), indices_latents_clean=torch.cat([pre, x1]),
                   latents_history_2x=torch.randn(1, 4, 2, 8, 8), indices_latents_history_2x=x2,
                   latents_history_4x=torch.randn(1, 4, 4, 8, 8), indices_latents_history_4x=x4)


def test_framepack_caches_a_size_its_blocks_pass_on():
    """explain names the ``.item()`` break (a frame-ending one, which Dynamo counts apart); under
    fullgraph=True (scalars and data-dependent shapes captured) the forward is one graph whose
    blocks hand on the text length as a number. A reused span hands it on as it is, the memory
    bound counts tensors only, and the computed calls equal eager."""
    if diffusers_version() < (0, 36):
        pytest.skip("diffusers < 0.36: its rotary embedding guards on the data-dependent text "
                    "length")
    model, kw = framepack()
    kw["return_dict"] = False
    report = dit_compile.explain(model, **kw)
    assert any("capture_scalar_outputs = True" in b for b in report.breaks), report
    assert "fullgraph=True) captures those operators" in report.fallback, report
    # Its streams' token count is such a size, shown by Dynamo's name for it: said what it is.
    assert "sizes u0, u1, ...: known only at run time" in str(report), report
    f = compiled(model, {"rule": "schedule", **SCHEDULE, "extrapolate": 1}, cache_memory=10**9)
    ours = generation(f, kw)
    theirs = generation(model, kw)
    stats = dit_compile.stats(f)
    assert stats["reused"] == {"step": 2, "cfg": 1, "block": 2} and stats["cached_bytes"] > 0
    for i in [i for i, r in enumerate(stats["trace"]) if r["action"] == "compute"]:
        torch.testing.assert_close(ours[i], theirs[i], rtol=1e-5, atol=1e-5, msg=f"call {i}")
    # Without fullgraph the forward breaks before its blocks and inside their loop: no graph holds
    # the blocks whole, and each block's graph, between the forward's own, was quiet. Said once.
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = generation(f, kw, steps=STEPS[:2])   # said at the head's third call
    said = [str(w.message) for w in rec if "mixcache" in str(w.message)]
    assert len(said) == 1 and "none of them holds its blocks whole" in said[0], said
    assert "HunyuanVideoFramepackTransformer3DModel" in said[0]
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_zimage_omni_lists_of_lists_are_named_in_the_warning():
    """Z-Image Omni passes per sample a list of its condition images and its noisy latent: the
    latent's list (one sample's) was taken for the samples, and the warning counted the
    condition image as a sample ("a list of 2 per-sample tensors"). It runs uncached, saying
    what the latent came as, with eager's outputs."""
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, siglip_feat_dim=8,
        rope_theta=256.0, axes_dims=[4, 2, 2], axes_lens=[64, 16, 16]).eval()
    kw = dict(x=[[torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]], t=torch.tensor([0.3]),
              cap_feats=[[torch.randn(3, 16), torch.randn(5, 16), torch.randn(2, 16)]],
              siglip_feats=[[torch.randn(2, 2, 8), None]], image_noise_mask=[[0, 1]],
              return_dict=False)
    with torch.no_grad():
        ref = model(**kw)[0]
        f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
        with pytest.warns(UserWarning, match=r"an element of a list of lists \(L\['kwargs'\]\['x'\]\[0\]\[1\]\)"):
            out = f(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
