"""cfg reuse on batch halves: CogVideoXPipeline batches [uncond, cond] into one transformer call.

On a reuse step the runtime computes the cond half alone and rebuilds the uncond half from the
difference cached at the last full compute; checked against an eager reference of the same rule
inside diffusers' own pipeline, and for what must never share anything.
"""
import copy
import dataclasses
import gc
import os
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dit_compile
import dit_compile.backend as backend
import dit_compile.inductor as inductor
import random_dits
import tiny_models
from reference_cache import BatchedCfgReference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

STEPS = 5


def _pipe(model):
    pipe = pipelines.cogvideox_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compile(model, cache, **opts):
    return torch.compile(model, backend="mixcache",
                         options={"regions": "eager", "cache": cache, **opts})


def _reference(model, cfg_steps):
    """The eager reference's pipeline output (a generation) for the given cfg steps."""
    return pipelines.run_cogvideox(_pipe(BatchedCfgReference(model, cfg=cfg_steps).model), STEPS)


def _check_trace(trace, cfg_steps, generations):
    assert len(trace) == STEPS * generations
    for r in trace:
        assert r["branch"] == 0, "one call per step"
        if r["step"] in cfg_steps:
            assert (r["action"], r["flops"]) == ("cfg", 0.5), r
        else:
            assert (r["action"], r["flops"]) == ("compute", 1.0), r


@pytest.mark.parametrize("cache,cfg_steps,in_place", [
    ({"rule": "schedule", "cfg": [1, 3, 4]}, {1, 3, 4}, False),
    # model.compile(...): the half forward calls the module, whose call is then the compiled one.
    ({"rule": "schedule", "cfg": [1, 3, 4]}, {1, 3, 4}, True),
    ({"rule": "fastercache", "every": 2}, {1, 3}, False),
    ({"rule": "fastercache", "every": 2, "start": 2}, {3}, False),  # computes at 2, counts from there
])
def test_cogvideox_batched_cfg_matches_eager_reference(cache, cfg_steps, in_place):
    model = pipelines.cogvideox_transformer()
    ref = _reference(model, cfg_steps)
    full = pipelines.run_cogvideox(_pipe(model), STEPS)
    assert (ref - full).abs().max() > 1e-3, "the rule must change the result for the test to bite"

    pipe = _pipe(model)
    if in_place:
        model.compile(backend="mixcache", options={"regions": "eager", "cache": cache})
    else:
        pipe.transformer = _compile(model, cache)
    with warnings.catch_warnings():
        # The half-batch path exists: mixcache has nothing to warn about.
        warnings.filterwarnings("error", message="mixcache")
        torch.testing.assert_close(pipelines.run_cogvideox(pipe, STEPS), ref, rtol=1e-5, atol=1e-5)
        # A second generation starts from nothing cached and reuses the same way.
        torch.testing.assert_close(pipelines.run_cogvideox(pipe, STEPS), ref, rtol=1e-5, atol=1e-5)
    _check_trace(dit_compile.stats(pipe.transformer)["trace"], cfg_steps, generations=2)


def test_a_flow_map_continuing_a_video_reuses_cfg_as_the_reference():
    """AnyFlowPipeline: a flow map, each call given the timestep it jumps to (``r_timestep``)
    beside its own, both per latent frame, and the first frame given (its timestep zero). The
    half forward takes both timesteps' conditional half, the noise level is the noisiest
    frame's, and the output is the eager reference's, generation after generation."""
    tiny_models.diffusers_class("AnyFlowPipeline")
    model = pipelines.anyflow_transformer()
    cfg_steps = {1, 3, 4}

    def pipe(m):
        p = pipelines.anyflow_pipeline(m)
        p.set_progress_bar_config(disable=True)
        return p

    ref = pipelines.run_anyflow(pipe(BatchedCfgReference(model, cfg=cfg_steps).model), STEPS)
    assert (ref - pipelines.run_anyflow(pipe(model), STEPS)).abs().max() > 1e-3
    compiled = pipe(model)
    compiled.transformer = _compile(model, {"rule": "schedule", "cfg": sorted(cfg_steps)})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        for _ in range(2):
            torch.testing.assert_close(pipelines.run_anyflow(compiled, STEPS), ref,
                                       rtol=1e-5, atol=1e-5)
    _check_trace(dit_compile.stats(compiled.transformer)["trace"], cfg_steps, generations=2)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=random_dits.specs().filter(lambda s: not s.extra_input),
       cfg_steps=st.sets(st.integers(1, STEPS - 1)), falls=st.lists(st.integers(40, 150), min_size=STEPS),
       broken=st.booleans())
def test_random_dits_batched_cfg_match_the_reference(spec, cfg_steps, falls, broken):
    """Random DiTs (one or two stacks, dual-stream blocks, cross-attention, adaLN, gates; one or
    two samples a branch) called as a pipeline batching [uncond, cond] on one latent: under a cfg
    schedule, every call equals the eager reference of the same rule, and each scheduled step
    computes half the batch. ``broken``: a graph break before the blocks (OmniGen's), the half
    forward built from the first graph and run from the one holding the blocks (runtime.relay)."""
    model, _ = random_dits.build(dataclasses.replace(spec, broken=broken))
    reference = BatchedCfgReference(model, cfg=cfg_steps).model
    torch._dynamo.reset()
    f = _compile(model, {"rule": "schedule", "cfg": sorted(cfg_steps)})
    text = torch.randn(2 * spec.batch, 3, 6)
    t = 999.0
    with torch.no_grad():
        for step, fall in zip(range(STEPS), falls):
            latent = torch.randn(spec.batch, spec.tokens, 4)
            call = dict(hidden_states=torch.cat([latent, latent]), encoder_hidden_states=text,
                        timestep=torch.full((2 * spec.batch,), t), return_dict=False)
            torch.testing.assert_close(f(**call)[0], reference(**call)[0], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"step {step}: {m}")
            t -= fall
    trace = dit_compile.stats(f)["trace"]
    assert [(r["action"], r["flops"]) for r in trace] == [
        ("cfg", 0.5) if r["step"] in cfg_steps else ("compute", 1.0) for r in trace]


def test_an_argument_read_after_a_graph_break_keeps_the_full_batch():
    """A forward broken before its blocks that reads an argument only after the break (the
    pooled vector): its first graph never takes it, so the half forward could not be handed it.
    cfg steps compute the full batch, as full compute does, and the warning names the argument."""
    spec = random_dits.Spec(dim=8, depths=(2,), cross_attn=True, adaln=True, gated=False,
                            two_streams=False, extra_input=True, batch=1, tokens=4, broken=True)
    model, _ = random_dits.build(spec)
    torch._dynamo.reset()
    f = _compile(model, {"rule": "schedule", "cfg": [1, 2]})
    text, pooled = torch.randn(2, 3, 6), torch.randn(2, 5)
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for step, t in enumerate([900.0, 800.0, 700.0]):
            latent = torch.randn(1, 4, 4)
            call = dict(hidden_states=torch.cat([latent, latent]), encoder_hidden_states=text,
                        timestep=torch.full((2,), t), pooled=pooled, return_dict=False)
            torch.testing.assert_close(f(**call)[0], model(**call)[0], rtol=1e-5, atol=1e-5)
    said = [str(w.message) for w in rec if "no half-batch forward" in str(w.message)]
    why = "the argument pooled of RandomDiT.forward is read only after the graph break"
    assert len(said) == 1 and why in said[0], said
    assert [r["flops"] for r in dit_compile.stats(f)["trace"]] == [1.0, 1.0, 1.0]
    report = dit_compile.explain(model, **call)
    assert report.relayed and why in report.cfg_halves, str(report)


def test_class_labels_are_the_condition_of_a_class_conditional_dit():
    """DiTPipeline batches [labels, null class] with the latent twice: the labels are the
    condition (found by their name), so cfg reuse works on the batch halves there as well, equal
    to the eager reference of the rule through the pipeline's own VAE decode."""
    model = pipelines.dit_transformer()
    assert dit_compile.explain(model, hidden_states=torch.randn(2, 4, 8, 8),
                               timestep=torch.tensor([500, 500]),
                               class_labels=torch.tensor([3, 1000])).inputs["text"] == \
        "l_class_labels_"
    pipe = pipelines.dit_pipeline(_compile(model, {"rule": "schedule", "cfg": [2, 4]}))
    pipe.set_progress_bar_config(disable=True)
    ours = pipelines.run_dit(pipe)
    assert dit_compile.stats(pipe.transformer)["reused"] == {"cfg": 2}
    pipe.transformer = BatchedCfgReference(model, cfg=[2, 4], cond="class_labels").model
    torch.testing.assert_close(ours, pipelines.run_dit(pipe), rtol=1e-5, atol=1e-5)
    pipe.transformer = model
    assert not torch.allclose(ours, pipelines.run_dit(pipe), rtol=1e-4, atol=1e-4), \
        "the reuse must change something"



def test_lumina_next_computes_its_second_half_as_the_reference_does():
    """LuminaPipeline batches ``[positive, negative]`` as tensors with its text mask, and passes a
    timestep that rises (1 - t / 1000): read as rising from its sampler (the default, "auto"),
    its calls are told as halves and cfg reuse computes the second half, the negative one, and
    rebuilds the first, equal to the eager reference of that rule in the same pipeline."""
    import zoo_image
    model, _ = zoo_image.lumina_next()
    pipe = pipelines.lumina_next_pipeline(_compile(model, {"rule": "schedule", "cfg": [2, 3, 5]}))
    pipe.set_progress_bar_config(disable=True)
    ours = pipelines.run_lumina_next(pipe)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [(r["action"], r["flops"], r["halves"]) for r in trace] == [
        ("cfg", 0.5, True) if i in (2, 3, 5) else ("compute", 1.0, True) for i in range(6)]
    pipe.transformer = BatchedCfgReference(model, cfg=[2, 3, 5], rising=True).model
    torch.testing.assert_close(ours, pipelines.run_lumina_next(pipe), rtol=1e-5, atol=1e-5)
    pipe.transformer = model
    assert not torch.allclose(ours, pipelines.run_lumina_next(pipe), rtol=1e-4, atol=1e-4), \
        "the reuse must change something"

@pytest.mark.parametrize("name", ["cogvideox", "dit"])
def test_default_cache_decides_for_both_halves_of_a_batched_cfg_call(name):
    """The presets reuse steps only, so they need no half-batch forward, but their decisions are
    per sample: the halves of a batched-CFG call (its two guidance branches) must still decide as
    one, or a call reuses for one half while the whole batch computes, and the guidance
    difference is taken between a prediction and a computed output."""
    make, pipe_of, run = {"cogvideox": (pipelines.cogvideox_transformer, _pipe, None),
                          "dit": (pipelines.dit_transformer, pipelines.dit_pipeline, pipelines.run_dit)}[name]
    pipe = pipe_of(_compile(make(), "balanced"))
    pipe.set_progress_bar_config(disable=True)
    (run or pipelines.run_cogvideox)(pipe, 20)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    steps = [r for r in trace if r["action"] == "step"]
    assert steps, "the test must reuse"
    assert all(r["reused"] is None for r in steps), [r["reused"] for r in steps]


def test_perturbed_attention_guidance_branches_decide_as_one():
    """PixArtSigmaPAGPipeline batches three guidance branches, ``[uncond, cond, perturbed]`` on
    one latent: a per-sample rule must tie them as it ties batched CFG's halves. Untied, the
    perturbed third (its first block's attention made the identity, so its probe moves apart)
    reused alone at some steps while the whole batch computed (``reused`` (False, False, True))."""
    from tiny_models import seeded
    model = seeded("PixArtTransformer2DModel", sample_size=8, num_layers=3, patch_size=2,
                   attention_head_dim=8, num_attention_heads=2, in_channels=4,
                   cross_attention_dim=16, out_channels=8, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                   use_additional_conditions=False, caption_channels=16)
    pipe = pipelines.pixart_pag_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    # In place: the pipeline finds the attention layers to perturb by their names in the model.
    model.compile(backend="mixcache", options={"regions": "eager",
                                               "cache": {"rule": "first_block", "threshold": 0.16}})
    pipelines.run_pixart_pag(pipe)
    trace = dit_compile.stats(model)["trace"]
    assert [r["action"] for r in trace].count("block") >= 6, trace
    assert all(r["reused"] is None for r in trace), [r["reused"] for r in trace]


def test_guidance_groups_are_equal_latent_halves_or_thirds():
    from dit_compile.runtime.cache import Step
    from dit_compile.runtime.halves import guidance_groups
    from dit_compile.runtime.policy import tie_groups
    a, b, c = torch.randn(3, 1, 4)
    t = torch.full((6,), 500.0)
    assert guidance_groups(torch.cat([a, b, a, b]), t[:4]) == 2
    assert guidance_groups(torch.cat([a, b, a, b, a, b]), t) == 3    # PAG, two images a prompt
    assert guidance_groups(torch.cat([a, b, c, a, b, c]), t) == 2    # CFG, three images a prompt
    assert guidance_groups(torch.cat([a] * 6), t) == 2    # halves and thirds: halves first
    # ... but for the text: PAG's [u, u, c, c, p, p] of one latent (perturbed takes cond's text),
    # whose halves would pair uncond with cond and cond with perturbed; CFG's [u, u, u, c, c, c].
    u, cond = torch.randn(2, 1, 3, 8)
    assert guidance_groups(torch.cat([a] * 6), t, torch.cat([u, u, cond, cond, cond, cond])) == 3
    assert guidance_groups(torch.cat([a] * 6), t, torch.cat([u, u, u, cond, cond, cond])) == 2
    assert guidance_groups(torch.cat([a] * 6), t, [u[0], u[0], cond[0], cond[0], cond[0],
                                                   cond[0]]) == 3    # a list, one per sample
    assert guidance_groups(torch.cat([a, a, b]), t[:3]) == 1
    assert guidance_groups(torch.cat([a, a, a]), torch.tensor([500.0, 500.0, 400.0])) == 1
    mask = torch.tensor([True, True, False, True, True, True])
    assert tie_groups(Step(0, 1, 0, 500.0, groups=3), mask).tolist() == [False, True] * 3
    assert tie_groups(Step(0, 1, 0, 500.0, groups=2), mask).tolist() == [True, True, False] * 2
    assert tie_groups(Step(0, 1, 0, 500.0), mask).tolist() == mask.tolist()


def test_two_instances_share_the_graph_not_the_weights(monkeypatch):
    """Dynamo serves every instance of a class with one graph: the half forward must run the
    weights of the instance being called, not those of the one traced. Nor may it need the one
    traced: freed (a server unloading its pipeline), the other's cfg steps are still reused."""
    traces = []
    real = backend.find_regions
    monkeypatch.setattr(backend, "find_regions", lambda gm: traces.append(1) or real(gm))
    m1 = pipelines.cogvideox_transformer()
    m2 = pipelines.cogvideox_transformer()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cache = {"rule": "schedule", "cfg": [2, 4]}
    pipes = []
    for m in (m1, m2):
        pipe = _pipe(m)
        pipe.transformer = _compile(m, cache)
        torch.testing.assert_close(pipelines.run_cogvideox(pipe, STEPS), _reference(m, {2, 4}),
                                   rtol=1e-5, atol=1e-5)
        _check_trace(dit_compile.stats(pipe.transformer)["trace"], {2, 4}, generations=1)
        pipes.append(pipe)
    assert len(traces) == 1, "the second instance reuses the first one's graph"
    del m1, m, pipe, pipes[0]
    gc.collect()
    dit_compile.reset(pipes[0].transformer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        torch.testing.assert_close(pipelines.run_cogvideox(pipes[0], STEPS), _reference(m2, {2, 4}),
                                   rtol=1e-5, atol=1e-5)
    _check_trace(dit_compile.stats(pipes[0].transformer)["trace"], {2, 4}, generations=1)


def _calls(model, latents, texts):
    """A generation of direct calls: batch 2, timestep expanded to the batch."""
    outs = []
    with torch.no_grad():
        for t in (900, 700, 500, 300):
            outs.append(model(hidden_states=latents, encoder_hidden_states=texts,
                              timestep=torch.full((2,), t), return_dict=False)[0])
    return outs


@pytest.mark.parametrize("same_latent,same_text", [(False, False), (False, True), (True, True)])
def test_batch_that_is_not_cfg_shares_nothing(same_latent, same_text):
    """Two prompts with their own latents (or the same prompt twice) are not guidance branches."""
    model = pipelines.cogvideox_transformer()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 8, generator=g)
    texts = torch.randn(2, 16, 32, generator=g)
    if same_latent:
        latents[1] = latents[0]
    if same_text:
        texts[1] = texts[0]
    f = _compile(model, [{"rule": "schedule", "cfg": [1, 2, 3]}, {"rule": "fastercache", "every": 2}])
    for x, y in zip(_calls(f, latents, texts), _calls(model, latents, texts)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(f)["reused"] == {}


def test_prompts_batched_on_one_noise_are_one_generation():
    """Two prompts on one initial noise (``latents=`` the same for both), guidance off: the first
    call's halves look like batched CFG (equal latents, different texts), the next call's differ.
    That is not a new generation: the schedule counts its steps from the pipeline's first call,
    and each sample comes out as it does alone under the same schedule (it used to restart at
    step 1, so step 2's reuse fell on step 3)."""
    model = tiny_models.wan(layers=3)[0]
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = _compile(model, {"rule": "schedule", "step": [2], "cfg": [4]})
    g = torch.Generator().manual_seed(0)
    texts = torch.randn(2, 8, 16, generator=g)
    noise = torch.randn(1, 4, 2, 4, 4, generator=g)

    def run(texts, noise):
        return pipe(prompt_embeds=texts, latents=noise, height=32, width=32, num_frames=5,
                    num_inference_steps=6, guidance_scale=1.0, output_type="latent").frames

    batch = run(texts, noise.expand(2, -1, -1, -1, -1).clone())
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [(r["generation"], r["step"], r["action"]) for r in trace] == [
        (0, i, "step" if i == 2 else "compute") for i in range(6)]
    for i in range(2):
        torch.testing.assert_close(batch[i:i + 1], run(texts[i:i + 1], noise.clone()),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_batch", [True, False])
def test_cfg_reuse_on_halves_is_not_said_to_lack_a_branch(cfg_batch):
    """Batch halves are two guidance branches: a schedule that reused them is not warned about
    when the generation ends; a batch of two prompts (no guidance) is."""
    import warnings
    model = pipelines.cogvideox_transformer()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1 if cfg_batch else 2, 3, 4, 8, 8, generator=g).expand(2, -1, -1, -1, -1)
    texts = torch.randn(2, 16, 32, generator=g)
    f = _compile(model, {"rule": "schedule", "cfg": [1, 2]})
    _calls(f, latents, texts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(f, latents, texts)
    said = [w for w in caught if "one guidance branch per step" in str(w.message)]
    assert len(said) == (0 if cfg_batch else 1)
    assert bool(dit_compile.stats(f)["reused"]) == cfg_batch


def test_direct_calls_keep_the_output_structure():
    """return_dict=True: the model's output class around the rebuilt batch."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    model = pipelines.cogvideox_transformer()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 3, 4, 8, 8, generator=g).repeat(2, 1, 1, 1, 1)
    texts = torch.randn(2, 16, 32, generator=g)
    f = _compile(model, {"rule": "schedule", "cfg": [1, 2]})
    ref = BatchedCfgReference(model, cfg=[1, 2]).model
    with torch.no_grad():
        for t in (900, 700, 500):
            call = dict(hidden_states=latents, encoder_hidden_states=texts,
                        timestep=torch.full((2,), t))
            ours, theirs = f(**call), ref(**call)
            assert isinstance(ours, Transformer2DModelOutput)
            torch.testing.assert_close(ours.sample, theirs.sample, rtol=1e-5, atol=1e-5)
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute", "cfg", "cfg"]


def test_a_tensor_argument_the_graph_never_takes_does_not_stop_the_half_forward():
    """``ofs``, unused by this config, is no graph input: the half forward gets zeros of its
    shape (it used to be refused, and cfg reuse computed the full batch)."""
    from reference_cache import BatchedCfgReference
    model = pipelines.cogvideox_transformer()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 3, 4, 8, 8, generator=g).repeat(2, 1, 1, 1, 1)
    texts = torch.randn(2, 16, 32, generator=g)
    f = _compile(model, {"rule": "schedule", "cfg": [1, 2, 3]})

    def run(m):
        outs = []
        with torch.no_grad():
            for t in (900, 700, 500, 300):
                outs.append(m(hidden_states=latents, encoder_hidden_states=texts,
                              timestep=torch.full((2,), t), ofs=torch.ones(2),
                              return_dict=False)[0])
        return outs

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        ours = run(f)
    for x, y in zip(ours, run(BatchedCfgReference(model, cfg={1, 2, 3}).model)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(f)["reused"] == {"cfg": 3}


def test_llama_states_batched_in_dim_1_are_halved_there():
    """HiDreamImagePipeline batches both guidance branches, its Llama states ``(layers, batch,
    tokens, dim)`` in dim 1; the graph takes them one layer (index of dim 0) at a time. cfg reuse
    on the batch halves halves them in dim 1 and matches the eager reference (passed whole, they
    were folded into the half's one sample: a wrong conditional half, refused since)."""
    model, _ = tiny_models.hidream()
    dit_compile.lower_moe(model)       # as the backend does: the same model on both sides

    def pipe(transformer):
        p = pipelines.hidream_pipeline(transformer)
        p.set_progress_bar_config(disable=True)
        return p
    with torch.no_grad():
        full = pipelines.run_hidream(pipe(model))
        ref = pipelines.run_hidream(pipe(BatchedCfgReference(
            model, cfg={1, 3}, cond="encoder_hidden_states_t5", time="timesteps",
            dims={"encoder_hidden_states_llama3": 1}).model))
    assert (ref - full).abs().max() > 1e-3, "the rule must change the result for the test to bite"
    compiled = pipe(torch.compile(model, backend="mixcache", fullgraph=True,   # unpatchify's .item()
                                  options={"regions": "eager", "cache": {"rule": "schedule",
                                                                          "cfg": [1, 3]}}))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        torch.testing.assert_close(pipelines.run_hidream(compiled), ref, rtol=1e-5, atol=1e-5)
    actions = [r["action"] for r in dit_compile.stats(compiled.transformer)["trace"]]
    assert actions == ["compute", "cfg", "compute", "cfg"], actions


class _ExtraWan(tiny_models.diffusers_class("WanTransformer3DModel")):
    """A Wan taking a second text ``(tokens, batch, dim)``, averaged over its tokens: its batch
    is in dim 1, and the graph does not take it one index of dim 0 at a time."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, extra, return_dict=True):
        return super().forward(hidden_states, timestep,
                               encoder_hidden_states + extra.mean(0)[:, None],
                               return_dict=return_dict)


def test_an_argument_batched_in_another_dim_it_is_not_indexed_by_is_refused():
    """The half forward cannot tell which dim of such an argument is the batch: it is refused,
    naming the argument, and cfg reuse computes the full batch (never a wrong half)."""
    base, kw = tiny_models.wan(batch=2)
    model = _ExtraWan.from_config(base.config).eval()
    model.load_state_dict(base.state_dict())
    kw["hidden_states"] = kw["hidden_states"][:1].repeat(2, 1, 1, 1, 1)    # one latent, two prompts
    kw["extra"] = torch.randn(3, 2, 16)
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "cfg": [1]}})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"extra.*\(3, 2, 16\).*in dim 1"):
        for t in (900.0, 700.0):
            call = dict(kw, timestep=torch.full((2,), t), return_dict=False)
            torch.testing.assert_close(f(**call)[0], model(**call)[0], rtol=1e-5, atol=1e-5)
    # explain says so before a generation runs.
    report = dit_compile.explain(model, **dict(kw, timestep=torch.full((2,), 900.0)))
    assert "(3, 2, 16) carries the batch (2) in dim 1" in report.cfg_halves, report.cfg_halves
    assert "a cfg reuse step computes the full batch: graph input" in str(report), str(report)


def test_explain_says_a_batched_cfg_call_computes_one_half():
    """CogVideoX called as its pipeline calls it, ``[uncond, cond]`` on one latent: explain says
    a cfg reuse step computes one half; a call of one branch says nothing of it."""
    model = pipelines.cogvideox_transformer()
    x = torch.randn(1, 3, 4, 8, 8)
    call = dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.randn(2, 16, 32),
                timestep=torch.full((2,), 500))
    report = dit_compile.explain(model, **call)
    assert report.cfg_halves == "", report.cfg_halves
    assert "a cfg reuse step computes one half (the half-batch forward)" in str(report)
    one = dit_compile.explain(model, **{k: v[1:] for k, v in call.items()})
    assert one.cfg_halves is None and "guidance branches" not in str(one), str(one)
    # Nothing is reused where the model is compiled with cache=None: nothing said of cfg steps.
    off = dit_compile.explain(_compile(model, None), **call)
    assert off.fallback and off.cfg_halves is None, str(off)


def test_explain_says_nothing_of_cfg_steps_where_the_call_is_not_cached():
    """A batched-CFG call ([uncond, cond] on one latent) on a model mixcache does not cache, for a
    reason found in the trace (diffusers' own cache hooks on a whole graph; a graph break after
    the blocks): no cfg reuse step runs, so the report says nothing of one (cfg_halves None), as
    where the model is compiled with cache=None."""
    from diffusers import PyramidAttentionBroadcastConfig
    x = torch.randn(1, 4, 2, 8, 8)
    call = dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.randn(2, 5, 16),
                timestep=torch.full((2,), 900.0), return_dict=False)
    model, _ = tiny_models.wan(layers=2)
    cached = dit_compile.explain(model, **call)     # the same call, cached: one half said
    assert cached.fallback is None and cached.cfg_halves == "", str(cached)
    model.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: 900))
    with model.cache_context("cond"):
        hooked = dit_compile.explain(model, **call)
    assert hooked.graphs == 1 and "own cache hooks are on" in (hooked.fallback or ""), str(hooked)
    assert hooked.cfg_halves is None and "guidance branches" not in str(hooked), str(hooked)
    model, _ = tiny_models.wan(layers=2)
    model.norm_out.register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
    broken = dit_compile.explain(model, **call)
    assert broken.stacks == {"blocks": 2} and "graph breaks" in (broken.fallback or ""), str(broken)
    assert broken.cfg_halves is None and "guidance branches" not in str(broken), str(broken)


def test_half_forward_under_dynamic_shapes_matches_reference():
    """dynamic=True makes the batch a symbol (the graph's outputs carry it as an expression) and
    every module float (a norm's eps) a graph input, a new tensor at every call: the half forward
    was refused for both, and cfg reuse computed the full batch (said once)."""
    model = pipelines.cogvideox_transformer()
    ref = _reference(model, {2, 3})
    pipe = _pipe(model)
    pipe.transformer = torch.compile(model, backend="mixcache", dynamic=True, options={
        "regions": "eager", "cache": {"rule": "schedule", "cfg": [2, 3]}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        torch.testing.assert_close(pipelines.run_cogvideox(pipe, STEPS), ref, rtol=1e-5, atol=1e-5)
    _check_trace(dit_compile.stats(pipe.transformer)["trace"], {2, 3}, generations=1)


@pytest.mark.inductor
@pytest.mark.parametrize("stamp", [False, True])
def test_half_forward_through_inductor_matches_reference(stamp, monkeypatch):
    """The half-batch forward compiled with its own torch.compile, called from inside ours.
    (Inductor for the blocks alone: the nesting is what is tested here, and the prologues' and
    epilogues' compiles would double the test's time.) With stamped blocks: the half forward's
    compile (Inductor's) traces them as nested regions, and neither compile makes the other's
    graph trace again (each would, were the stamps guarded and changed between them)."""
    from torch._dynamo.utils import counters
    model = pipelines.cogvideox_transformer()
    ref = _reference(model, {2, 3})
    if stamp:
        assert dit_compile.nest_blocks(model, stamp=True) >= 2
        dit_compile.frames.install_trace_hook()     # reset() dropped it (a fresh process has it)
    stamped, real = [], backend.stamp_blocks
    monkeypatch.setattr(backend, "stamp_blocks", lambda gm: stamped.append(sum(
        n.target is torch.ops.dit_compile.stamped_block.default for n in gm.graph.nodes)) or real(gm))
    compiled, real_fx = [], inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, *a, **k: compiled.append(gm) or real_fx(gm, *a, **k))
    pipe = _pipe(model)
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "blocks", "cache": {"rule": "schedule", "cfg": [2, 3]}})
    counters.clear()
    torch.testing.assert_close(pipelines.run_cogvideox(pipe, STEPS), ref, rtol=1e-4, atol=1e-4)
    assert counters["frames"]["ok"] == 2, "the model's graph, then the half forward's"
    # The half forward's graph compiled region by region too, as regions="blocks" asks: its
    # blocks, not the whole forward (whose prologue embeds the patches), every block inlined, as
    # plain Inductor would. The tiny CogVideoX's two blocks: the model's graph compiles them
    # apart (the first handed strided slices of a batch of two, the last returning less); at the
    # half forward's batch of one the last runs the first's compile (split.pruned_twins), but
    # for stamped blocks, traced nested there, whose first clones its inputs: another graph.
    assert len(compiled) == (4 if stamp else 3) and not any(
        "patch_embed" in str(n.meta.get("nn_module_stack")) for gm in compiled
        for n in gm.graph.nodes), [len(gm.graph.nodes) for gm in compiled]
    assert (stamped[0] > 0) == stamp and len(stamped) == 1
    _check_trace(dit_compile.stats(pipe.transformer)["trace"], {2, 3}, generations=1)


def test_controlnet_samples_per_block_are_sliced_to_the_half():
    """SD3 as StableDiffusion3ControlNetPipeline calls it: batched CFG, the ControlNet's samples a
    list with one (batch, tokens, dim) per block, of which the last block (``context_pre_only``)
    never reads its own. A cfg reuse step computes the cond half with each sample's cond half, as
    the eager reference does (the half forward used to be refused for the unread sample, and list
    tensors were never sliced: cfg reuse computed the full batch)."""
    model, _ = tiny_models.sd3()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    fixed = dict(encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                 pooled_projections=torch.randn(2, 8, generator=g),
                 block_controlnet_hidden_states=[torch.randn(2, 16, 16, generator=g)
                                                 for _ in range(3)], return_dict=False)
    f = _compile(model, {"rule": "schedule", "cfg": [2, 3]})
    diff = None     # the guidance difference of the last step computed
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        for step, t in enumerate((900.0, 700.0, 500.0, 300.0)):
            call = dict(fixed, hidden_states=torch.cat([x, x]), timestep=torch.full((2,), t))
            if step >= 2:
                half = {n: v[1:] if isinstance(v, torch.Tensor) else
                        [c[1:] for c in v] if isinstance(v, list) else v for n, v in call.items()}
                cond = model(**half)[0]
                ref = torch.cat([cond + diff, cond])
            else:
                ref = model(**call)[0]
                diff = ref[:1] - ref[1:]
            torch.testing.assert_close(f(**call)[0], ref, rtol=1e-5, atol=1e-5)
            x = x - 0.1 * ref[1:]
    assert dit_compile.stats(f)["reused"] == {"cfg": 2}


def test_layout_is_the_generations_first_calls():
    """A branch difference taken on batch halves is never used by a per-branch call, nor the
    other way round: a generation keeps its first call's layout, and a call whose halves differ
    later (prompts on one noise, alike only at the first step) drops it and what it took."""
    from dit_compile.runtime.cache import CacheState
    from dit_compile.runtime.policy import CFG, COMPUTE, Policy
    st = CacheState()
    pol = Policy(cfg_steps=frozenset({1, 2, 3}))
    st.begin(900.0, "sig", halves=True)
    st.cfg_diff[0] = [torch.zeros(1)]
    assert pol.step(st.begin(800.0, "sig", halves=True), st, torch.zeros(2))[0] == CFG
    s = st.begin(700.0, "sig", halves=False)
    assert (s.generation, s.step, s.halves, st.cfg_diff) == (0, 2, False, {})
    assert pol.step(s, st, torch.zeros(2))[0] == COMPUTE
    assert not st.begin(600.0, "sig", halves=True).halves     # not halves again in this generation
    assert st.begin(900.0, "sig", halves=True).halves          # the next generation's own


def _pixart():
    """PixArt-alpha as at 1024px: ``use_additional_conditions``, so the pipeline passes
    ``added_cond_kwargs`` resolution (2k, 2) and aspect ratio (2k, 1) beside the batched CFG
    (their embeddings take a third of the width each: heads x head_dim divisible by 3)."""
    import diffusers
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, sample_size=8, patch_size=2, caption_channels=12,
        use_additional_conditions=True).eval()
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    # Per-sample conditions that differ between the halves: only the cond half's may reach it.
    call = dict(hidden_states=torch.cat([latent, latent]),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
                added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0], [32.0, 48.0]]),
                                   "aspect_ratio": torch.tensor([[1.0], [1.5]])})
    return model, call


def _cond_half(call):
    """The call's conditional half ([k:]), dict arguments included."""
    k = call["hidden_states"].shape[0] // 2
    return {n: ({a: t[k:] for a, t in v.items()} if isinstance(v, dict) else v[k:])
            for n, v in call.items()}


def test_dict_arguments_are_sliced_to_the_half():
    """A cfg reuse step on PixArt computes the cond half with the cond half's ``added_cond_kwargs``
    and rebuilds the uncond half from the difference of the last full compute."""
    model, call = _pixart()
    f = _compile(model, {"rule": "fastercache", "every": 2})
    ours, expected, diff = [], [], None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        for i, t in enumerate((900, 600, 300)):
            call["timestep"] = torch.full((2,), t)
            ours.append(f(**call, return_dict=False)[0])
            if i == 1:
                cond = model(**_cond_half(call), return_dict=False)[0]
                expected.append(torch.cat([cond + diff, cond]))
            else:
                expected.append(model(**call, return_dict=False)[0])
                diff = expected[-1][:1] - expected[-1][1:]
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute", "cfg", "compute"]
    full = model(**dict(call, timestep=torch.full((2,), 600)), return_dict=False)[0]
    assert (expected[1] - full).abs().max() > 1e-3, "the reuse must change the result to bite"
    for x, y in zip(ours, expected):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_half_forward_that_raises_warns_once_and_computes_the_full_batch(monkeypatch):
    from dit_compile.runtime import halves

    calls = []

    def broken(*_args, **_kwargs):
        calls.append(1)
        raise RuntimeError("the half forward broke\nsecond line")

    monkeypatch.setattr(halves, "_functional", broken)
    monkeypatch.setattr(halves, "_functional_eager", broken)    # regions="eager"'s
    model, call = _pixart()
    f = _compile(model, {"rule": "schedule", "cfg": [1, 2, 3]})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"half-batch forward raised RuntimeError: "
                                       r"the half forward broke; computing the full batch") as rec:
        for t in (900, 700, 500, 300):
            call["timestep"] = torch.full((2,), t)
            torch.testing.assert_close(f(**call, return_dict=False)[0],
                                       model(**call, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    assert sum("half-batch forward raised" in str(w.message) for w in rec) == 1
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute"] * 4
    assert len(calls) == 1      # a forward that failed once is not tried at every cfg step


class Halved(torch.nn.Module):
    """Stands for a transformer: a weight (a parameter) and a table that is neither parameter nor
    buffer (Dynamo still hands it to the graph as an input)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.table = torch.ones(4)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        h = self.lin(hidden_states) * timestep[:, None, None] * self.table
        return (h + encoder_hidden_states.mean(1, keepdim=True),)


class HalvedReadingASize(Halved):
    """Reads only the size of ``ofs``: Dynamo guards on it, and the graph does not take it."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, ofs=None):
        out = super().forward(hidden_states, timestep, encoder_hidden_states)[0]
        return (out.expand(ofs.shape[0], -1, -1),)


def _recipe(batch=2, out_shapes=None, cls=Halved, **unused):
    """HalfBatch.build as the backend calls it, for ``cls`` at ``batch``; ``unused``: tensor
    arguments the graph does not take."""
    from dit_compile.runtime.halves import HalfBatch
    model = cls()
    x, e = torch.randn(batch, 3, 4), torch.randn(batch, 5, 4)
    call = dict(hidden_states=x, timestep=torch.full((batch,), 0.5), encoder_hidden_states=e,
                **unused)
    inputs = [x, call["timestep"], e, model.lin.weight, model.lin.bias, model.table]
    placeholders = [("L['hidden_states']", False), ("L['timestep']", False),
                    ("L['encoder_hidden_states']", False), ("L['self'].lin.weight", True),
                    ("L['self'].lin.bias", True), ("L['self'].table", True)]
    recipe = HalfBatch.build(model, call, placeholders, inputs, [0, 2, 1], batch,
                             out_shapes or [(batch, 3, 4)], backend=None)
    return model, inputs, recipe


def test_half_forward_runs_what_the_module_computes_on_the_half_or_declines():
    """The conditional half computed alone equals the module on that half; a timestep of one
    sample (broadcast over the batch) is handed on whole, not sliced. Another instance's call
    runs that instance, with its own table (neither parameter nor buffer). Where the half cannot
    be trusted it declines (None, with a warning naming the model): a batch of odd size, outputs
    of other shapes than the graph's, no instance of the class calling it."""
    model, inputs, half = _recipe()
    x, t, e = inputs[:3]
    with torch.no_grad():
        ref = model(x[1:], t[1:], e[1:])[0]
        torch.testing.assert_close(half(inputs, 1, model)[0], ref)
        one_t = [x, t[:1], e, *inputs[3:]]
        torch.testing.assert_close(half(one_t, 1, model)[0], ref)
        other = Halved()
        other.table = torch.full((4,), 2.0)
        env = [x, t, e, other.lin.weight, other.lin.bias, other.table]
        torch.testing.assert_close(half(env, 1, other)[0], other(x[1:], t[1:], e[1:])[0])
    assert "not two halves" in _recipe(batch=3)[2]
    traced, inputs, wrong = _recipe(out_shapes=[(2, 3, 8)])
    with pytest.warns(UserWarning, match="Halved: batched-CFG call: the module's outputs do not "
                                         "match the graph's"):
        assert wrong(inputs, 1, traced) is None
    # A graph with more outputs than the module: what the forward wrote into an argument.
    traced, inputs, more = _recipe(out_shapes=[(2, 3, 8)] * 3)
    with pytest.warns(UserWarning, match="the graph returns 3 tensors, the module 1: the forward "
                                         "writes values into an argument"):
        assert more(inputs, 1, traced) is None
    with pytest.warns(UserWarning, match="no Halved calls this graph"):
        assert half(inputs, 1) is None
    # An argument the graph does not take is passed as zeros of its shape, at the half's batch
    # where it carried the batch.
    model, inputs, half = _recipe(cls=HalvedReadingASize, ofs=torch.ones(2))
    x, t, e = inputs[:3]
    with torch.no_grad():
        ref = model(x[1:], t[1:], e[1:], ofs=t[1:])[0]
        torch.testing.assert_close(half(inputs, 1, model)[0], ref)
    # A text that carries the batch, read as if it did not, is passed whole: the result comes out
    # at the full batch, of the graph's shape past dim 0, and is declined.
    model, inputs, half = _recipe()
    whole = dataclasses.replace(half, batch_inputs={0: 0, 1: 0})
    with pytest.warns(UserWarning, match="the module's outputs do not match the graph's"):
        assert whole(inputs, 1, model) is None


def test_mixcache_reuses_cfg_on_batch_halves_as_its_forced_schedule_would():
    """MixCache given the cfg granularity decides cfg reuse on batched calls too: the steps it
    chose, forced as a schedule and as the eager reference, give the same generation."""
    model = pipelines.cogvideox_transformer()
    pipe = _pipe(model)
    pipe.transformer = _compile(model, {"rule": "mixcache", "granularities": ["cfg"],
                                        "budget": 1.0, "warmup": 0.0, "settle": 10.0})
    ours = pipelines.run_cogvideox(pipe, STEPS)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    chosen = {r["step"] for r in trace if r["action"] == "cfg"}
    assert chosen and all(r["flops"] == 0.5 for r in trace if r["action"] == "cfg")
    torch.testing.assert_close(ours, _reference(model, chosen), rtol=1e-5, atol=1e-5)
    _check_trace(trace, chosen, generations=1)


def test_a_step_reused_after_a_cfg_step_on_halves_is_the_per_branch_pipelines():
    """A cfg reuse on batch halves computes the conditional half: a step reused next takes it, as a
    pipeline calling each branch alone gets its computed conditional branch. The history kept
    only full computes: the batched pipeline's step 3 was step 1's output (0.27 off the
    per-branch one on SD3)."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    g = torch.Generator().manual_seed(0)
    uncond = torch.randn(kw["encoder_hidden_states"].shape, generator=g)
    levels = [1000.0, 800.0, 600.0, 400.0, 200.0]
    xs = [torch.randn(kw["hidden_states"].shape, generator=g) for _ in levels]
    schedule = {"rule": "schedule", "cfg": [2], "step": [3]}
    batched = _compile(model, schedule)
    with torch.no_grad():
        outs = [batched(**dict(kw, hidden_states=torch.cat([x, x]), timestep=torch.full((2,), t),
                               encoder_hidden_states=torch.cat([uncond, kw["encoder_hidden_states"]])
                               ))[0] for x, t in zip(xs, levels)]
        branches = _compile(copy.deepcopy(model), schedule)     # a state of its own
        per = [torch.cat([branches(**dict(kw, hidden_states=x, timestep=torch.full((1,), t),
                                          encoder_hidden_states=text))[0]
                          for text in (kw["encoder_hidden_states"], uncond)][::-1])
               for x, t in zip(xs, levels)]
    assert [r["action"] for r in dit_compile.stats(batched)["trace"]] == [
        "compute", "compute", "cfg", "step", "compute"]
    for step, (a, b) in enumerate(zip(outs, per)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("granularities,expected", [(["step", "cfg", "block"], {"step"}),
                                                     (["cfg", "block"], {"cfg"}),
                                                     (["block"], {"block"})])
def test_mixcache_granularities_on_batch_halves_replay_as_a_schedule(granularities, expected):
    """Step, cfg (on the halves) or block reuse chosen by MixCache in one generation: the same
    decisions forced as a schedule give the same output, bit for bit. (With every granularity
    allowed and this budget, a step reuse, which saves the whole call, fits wherever the trigger
    is on, so cfg and blocks get runs of their own.)"""
    spec = {"rule": "mixcache", "granularities": granularities, "budget": 1.0,
            "warmup": 0.0, "settle": 10.0, "per_sample": False, "max_reuse": 2}
    model = pipelines.cogvideox_transformer()
    pipe = _pipe(model)
    pipe.transformer = _compile(model, spec)
    ours = pipelines.run_cogvideox(pipe, 8)
    actions: dict[str, list[int]] = {}
    for r in dit_compile.stats(pipe.transformer)["trace"]:
        actions.setdefault(r["action"], []).append(r["step"])
    assert expected <= set(actions), actions
    torch._dynamo.reset()
    pipe.transformer = _compile(model, {"rule": "schedule", "extrapolate": 2,
                                        **{k: v for k, v in actions.items() if k != "compute"}})
    assert torch.equal(pipelines.run_cogvideox(pipe, 8), ours)


def test_numbers_a_recompile_made_dynamic_reach_the_half_forward():
    """LTXPipeline passes height, width and num_frames as Python ints. A generation at a second
    size recompiles with them dynamic (graph inputs); the half-batch forward once replayed the
    compiling call's values, so a third size with the same token count got the second's rotary
    positions on its cfg-reuse step (no error, another result)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=8, cross_attention_dim=16, num_layers=3,
                                       caption_channels=16).eval()

    def run(transformer, height, width):
        pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                           text_encoder=None, tokenizer=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=g),
                    prompt_attention_mask=torch.ones(1, 6),
                    negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                    negative_prompt_attention_mask=torch.ones(1, 6), height=height, width=width,
                    num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                    output_type="latent", generator=g).frames

    compiled = _compile(model, {"rule": "schedule", "cfg": [2]})
    for size in ((128, 128), (96, 192), (192, 96)):
        torch.testing.assert_close(run(compiled, *size),
                                   run(BatchedCfgReference(model, cfg={2}).model, *size),
                                   rtol=1e-5, atol=1e-5, msg=f"{size}")
    assert dit_compile.stats(compiled)["reused"] == {"cfg": 3}


def test_a_number_inside_an_argument_is_named_as_one():
    """A LoRA scale in ``attention_kwargs``, made dynamic by a second value, reaches the graph as
    a tensor input; the half forward is refused for it (it would replay the compiling call's
    value), and the reason names a number inside an argument, not a tensor that is no argument."""
    from dit_compile.runtime.halves import _resolve
    frame = {"self": object(), "args": (), "kwargs": {"attention_kwargs": {"scale": 0.5},
                                                      "sizes": [3, (4, 5)]}}
    assert _resolve("L['kwargs']['attention_kwargs']['scale']", frame) == 0.5
    assert _resolve("L['kwargs']['sizes'][1][0]", frame) == 4
    for missing in ("L['kwargs']['attention_kwargs']['lora']", "L['kwargs']['sizes'][7]",
                    "L['self'].weight", "G['torch']"):
        assert _resolve(missing, frame) is None


def test_tensors_inside_an_argument_are_halved_where_they_are_per_sample():
    """Inside a dict, any tensor whose dim 0 is the batch is per sample (PixArt's resolution and
    aspect ratio); inside a list or tuple only those of rank 3 and more (ControlNet samples per
    block): a rotary pair or position ids (tokens, dim) whose token count equals the batch are
    passed whole."""
    from dit_compile.runtime.halves import _per_sample_leaves
    cos, sin, ids = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3)
    samples, resolution = torch.randn(4, 6, 8), torch.randn(4, 2)
    index = {id(x): i for i, x in enumerate([cos, sin, ids, samples, resolution])}
    assert _per_sample_leaves((cos, sin), index, 4) == set()
    assert _per_sample_leaves([ids, samples], index, 4) == {3}
    assert _per_sample_leaves({"resolution": resolution, "ids": ids}, index, 4) == {4, 2}
    assert _per_sample_leaves({"resolution": resolution}, index, 2) == set()
