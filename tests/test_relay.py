"""Forwards that Dynamo breaks before their blocks: the first graph records the call's inputs, the
graph that runs the blocks to the forward's return is cached by them (runtime.relay)."""
import copy
import os
import sys
import threading
import warnings

import pytest
import torch

import dit_compile
from dit_compile import backend
from dit_compile.runtime.relay import TAG, Head, received
import tiny_models
from reference_cache import BatchedCfgReference, Reference
from test_cache import STEPS, generation
from tiny_models import seeded

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

SCHEDULE = dict(step=[2], cfg=[3], block=[4])


omnigen = pipelines.omnigen_transformer


def _mixcache_warnings(rec):
    return [str(w.message) for w in rec if str(w.message).startswith("mixcache")]


def test_a_forward_broken_before_its_blocks_reuses_as_the_reference(monkeypatch):
    """OmniGen's last graph holds every block: a forced schedule reuses there what the eager
    reference of the same rules reuses, over one generation of two branches, and nothing warns."""
    model, kw = omnigen()
    found = []
    monkeypatch.setattr(backend, "find_regions",
                        lambda gm, real=backend.find_regions: found.append(real(gm)) or found[-1])
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", **SCHEDULE}})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = generation(f, kw, text="input_ids")
    assert _mixcache_warnings(rec) == []
    assert [r.stacks for r in found] == [{"layers": 3}] * len(found), [r.stacks for r in found]
    assert dit_compile.stats(f)["reused"] == {"step": 2, "cfg": 1, "block": 2}
    theirs = generation(Reference(model, blocks_attr="layers", **SCHEDULE).start(STEPS[0]), kw,
                        text="input_ids")
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    graphs = len(found)     # the tagged tensors are not guarded on: no graph compiled again
    generation(f, kw, text="input_ids")
    assert len(found) == graphs


def hunyuan15():
    """Its forward branches on ``all(image_embeds == 0)`` (a break) and reorders the text tokens
    by mask in a loop: with Dynamo's default config the loop's break leaves the rest of the
    forward eager."""
    m = seeded("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4,
               num_attention_heads=2, attention_head_dim=8, num_layers=3, num_refiner_layers=1,
               text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
               target_size=32)
    for block in m.transformer_blocks:    # (image, text) -> (image, text): for the reference
        block.two = True
    g = torch.Generator().manual_seed(0)
    return m, dict(hidden_states=torch.randn(1, 4, 1, 4, 4, generator=g),
                   timestep=torch.tensor([500.0]),
                   encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
                   encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                   encoder_hidden_states_2=torch.randn(1, 4, 8, generator=g),
                   encoder_attention_mask_2=torch.tensor([[1, 1, 1, 0]]),
                   image_embeds=torch.zeros(1, 3, 8), return_dict=False)


def test_captured_data_dependent_operators_leave_a_break_before_the_blocks_only():
    """HunyuanVideo 1.5 with Dynamo capturing data-dependent operators (the two config flags the
    fallback warning names): its mask indexing is captured, the break on the image embeddings
    stays, before the blocks, and the graph after it is cached by the relay as the reference
    reuses (its text stream's length is read from the mask at run time). ``explain`` says so
    under the default config, where the forward runs uncached."""
    model, kw = hunyuan15()
    report = dit_compile.explain(model, **{k: v for k, v in kw.items() if k != "return_dict"})
    assert not report.relayed and "capture_dynamic_output_shape_ops set" in report.fallback, \
        str(report)
    sched = dict(step=[2], block=[4])
    with torch._dynamo.config.patch(capture_scalar_outputs=True,
                                    capture_dynamic_output_shape_ops=True):
        f = torch.compile(model, backend="mixcache",
                          options={"regions": "eager", "cache": {"rule": "schedule", **sched}})
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ours = generation(f, kw)
    assert _mixcache_warnings(rec) == []
    assert dit_compile.stats(f)["reused"] == {"step": 2, "block": 2}
    theirs = generation(Reference(model, blocks_attr="transformer_blocks", **sched).start(
        STEPS[0]), kw)
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    # Caching off: nothing to warn of (it used to say that the breaks stop caching, and to set
    # the very flags that were set).
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True,
                                    capture_dynamic_output_shape_ops=True):
        f = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            generation(f, kw, steps=STEPS[:1])
    assert _mixcache_warnings(rec) == []


def test_a_relayed_forward_under_autograd_is_said_uncached_once():
    """Lumina 2 (broken before its blocks) in a training loop: its graph after the break runs
    uncached, saying autograd is why; the first graph, whose records no graph took, then also
    warned of a break inside the block loop, which there is not."""
    model, kw = tiny_models.lumina2()
    f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            call = dict(kw, timestep=torch.full((1,), 0.9 - 0.1 * i), return_dict=False)
            f(**call)[0].square().mean().backward()
    said = [str(w.message) for w in caught if "mixcache" in str(w.message)]
    assert len(said) == 1 and "autograd records" in said[0], said


def test_a_relayed_model_deleted_is_freed():
    """The first graph kept its last call's record, every input of the graph, the model's
    weights among them, in Dynamo's cache on the class's forward: a deleted model's embedders
    stayed alive (OmniGen's token embedding, about 200 MB in bf16)."""
    import gc
    import weakref
    model, kw = tiny_models.lumina2()
    f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with torch.no_grad():
        f(**kw, return_dict=False)
    weights = [weakref.ref(p) for p in model.parameters()]
    del model, f
    gc.collect()
    assert not [w for w in weights if w() is not None]


def test_lumina2_pipeline_reuses_as_the_reference():
    """Lumina2Pipeline (one call per guidance branch, a timestep that rises: 1 - sigma) around
    Lumina 2, whose rotary embedder breaks the trace before the blocks: the pipeline's output
    with a forced schedule is the eager reference's, and not full compute's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    model, _ = tiny_models.lumina2()
    pipe = Lumina2Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=None, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)

    def run():
        g, mask = torch.Generator().manual_seed(0), torch.ones(1, 6, dtype=torch.bool)
        return pipe(prompt_embeds=torch.randn(1, 6, 8, generator=g), prompt_attention_mask=mask,
                    negative_prompt_embeds=torch.randn(1, 6, 8, generator=g),
                    negative_prompt_attention_mask=mask, height=16, width=16,
                    num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    generator=g).images

    full = run()
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "schedule", **SCHEDULE}})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = run()
    assert _mixcache_warnings(rec) == []
    assert [r["action"] for r in dit_compile.stats(pipe.transformer)["trace"]] == [
        "compute"] * 4 + ["step", "step", "compute", "cfg", "block", "block"] + ["compute"] * 2
    ref = Reference(model, blocks_attr="layers", rising=True, **SCHEDULE).start(0.0)
    pipe.transformer = copy.deepcopy(model)
    pipe.transformer.forward = lambda return_dict, **kw: (ref(**kw),)
    torch.testing.assert_close(ours, run(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, full, rtol=1e-4, atol=1e-4), "the schedule must change it"


def _residual_refused(model, kw, match):
    """Compiled with the residual step mode, the model's first call raises, matching ``match``."""
    f = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": {
        "rule": "schedule", "step": [1], "step_mode": "residual"}})
    with torch.no_grad(), pytest.raises(Exception, match=match):
        f(**kw, return_dict=False)


def test_residual_step_mode_on_a_relayed_forward_needs_an_output_shaped_like_the_latent():
    """The latent of a forward broken before its blocks is the one its first graph recorded: the
    residual step mode's shape check waits for it, at the first call, and says what the check of
    a whole forward says (a latent of 4 channels, an output of 8)."""
    model, kw = tiny_models.lumina2()
    model = seeded("Lumina2Transformer2DModel", out_channels=8, **{
        k: v for k, v in model.config.items() if not k.startswith("_") and k != "out_channels"})
    _residual_refused(model, kw, r"step_mode='residual'.*\(1, 4, 8, 8\).*\(1, 8, 8, 8\)")


def test_residual_step_mode_names_the_output_not_shaped_like_the_latent():
    """LTX-2 returns the video and the audio prediction: the second is not the latent's shape, and
    the refusal names it (it used to say "the output", as if the model had one)."""
    from zoo_video import ltx2
    _residual_refused(*ltx2(), r"\(1, 32, 4\) and output 2 of 2 \(1, 5, 4\).*LTX-2's audio")


@pytest.mark.parametrize("dynamic,regions", [
    (False, "eager"), (True, "eager"),
    pytest.param(False, "blocks", marks=pytest.mark.inductor)])
def test_both_guidance_branches_in_one_call_compute_one_half_at_cfg_steps(dynamic, regions):
    """OmniGenPipeline batches its branches ``[cond, uncond]`` into one call: at a cfg step the
    forward runs whole (break included) on one half, its other half rebuilt as the eager
    reference of the same rule rebuilds it, and nothing warns. Under dynamic shapes the graph
    holding the blocks has a batch of its own, a symbol. Through Inductor the half forward is
    compiled as the model's graphs are, the head's graph whole (no blocks in it: plain
    Inductor's compile, whatever ``regions`` says) and the blocks' region by region. (Inductor for
    the blocks alone: the full batch's head, prologue and epilogue compiles, and the half
    forward's prologue and epilogue, add nothing the half forward's path needs.)"""
    model, kw = omnigen()
    cfg = [1, 3, 4]
    reference = BatchedCfgReference(model, cfg=cfg, cond="input_ids").model
    f = torch.compile(model, backend="mixcache", dynamic=dynamic,
                      options={"regions": regions, "cache": {"rule": "schedule", "cfg": cfg}})
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([kw["input_ids"], torch.randint(1, 100, kw["input_ids"].shape, generator=g)])
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for i, t in enumerate(STEPS[:5]):
            latent = torch.randn(1, 4, 8, 8, generator=g)
            call = dict(kw, hidden_states=torch.cat([latent, latent]), input_ids=ids,
                        timestep=torch.full((2,), t / 1000),
                        attention_mask=kw["attention_mask"].expand(2, -1, -1),
                        position_ids=kw["position_ids"].expand(2, -1))
            torch.testing.assert_close(f(**call)[0], reference(**call)[0], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"call {i}: {m}")
    assert _mixcache_warnings(rec) == []
    assert [(r["action"], r["flops"]) for r in dit_compile.stats(f)["trace"]] == [
        ("cfg", 0.5) if i in cfg else ("compute", 1.0) for i in range(5)]
    report = dit_compile.explain(model, **call)
    assert report.relayed and report.cfg_halves == "", str(report)


def test_threads_reusing_cfg_on_batch_halves_each_get_their_own_half():
    """Two threads generate at once with one compiled OmniGen, batching their branches: each
    cfg step's half forward runs on its own call's inputs (the graph holding the blocks is one
    object for both), each generation equals its eager reference, and nothing is left changed for
    the process: the eager half forward once forced Dynamo's process-wide stance to eager, and two
    overlapping left it so, every compiled call after them running uncompiled."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 12):
        pytest.skip("torch 2.11: compiled code run in two threads changes later traces "
                    "(test_cache's two-threads test)")
    model, kw = omnigen()
    cfg = [1, 2, 3, 4]
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "cfg": cfg}})
    turns, worst, errors = threading.Barrier(2), {}, []

    def run(seed):
        try:
            reference = BatchedCfgReference(model, cfg=cfg, cond="input_ids").model
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(1, 100, (2, kw["input_ids"].shape[1]), generator=g)
            with torch.no_grad():
                for t in STEPS[:5]:
                    latent = torch.randn(1, 4, 8, 8, generator=g)
                    call = dict(kw, hidden_states=torch.cat([latent, latent]), input_ids=ids,
                                timestep=torch.full((2,), t / 1000),
                                attention_mask=kw["attention_mask"].expand(2, -1, -1),
                                position_ids=kw["position_ids"].expand(2, -1))
                    turns.wait()
                    ours = f(**call)[0]
                    worst[seed] = max(worst.get(seed, 0.0),
                                      float((ours - reference(**call)[0]).abs().max()))
        except BaseException as e:     # noqa: BLE001 (said by the main thread)
            errors.append(e)
            turns.abort()
    with torch.no_grad():   # compiled first in this thread
        f(**kw)
    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert worst == {1: 0.0, 2: 0.0}, worst
    compiles = []
    g = torch.compile(lambda x: x + 1, backend=lambda gm, _: compiles.append(gm) or gm.forward)
    g(torch.ones(2))
    assert compiles, "a compiled function ran eagerly after the threads"


def test_explain_says_a_forward_broken_before_its_blocks_is_cached():
    model, kw = omnigen()
    kw.pop("return_dict")
    report = dit_compile.explain(model, **kw)
    assert report.relayed and report.fallback is None, str(report)
    assert report.stacks == {"layers": 3} and report.inputs["text"] == "l_input_ids_", str(report)
    assert "cached by the call's inputs" in str(report)


def test_a_new_prompt_reaches_the_graph_that_holds_the_blocks():
    """The text is the call's own token ids, as the first graph saw them: the first call of a
    prompt changed in the middle of a generation is computed, where the blocks' graph sees only an embedding of it
    joined with the image tokens."""
    model, kw = omnigen()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [1, 2, 3]}})
    new = kw["input_ids"].roll(1, -1)
    with torch.no_grad():
        for i, t in enumerate(STEPS[:4]):
            call = dict(kw, timestep=torch.tensor([t / 1000]), input_ids=kw["input_ids"] if i < 2 else new)
            out = f(**call)[0]
            if i == 2:
                torch.testing.assert_close(out, model(**call)[0], rtol=1e-5, atol=1e-5)
    trace = dit_compile.stats(f)["trace"]
    assert [r["action"] for r in trace] == ["compute", "step", "compute", "step"], trace


class _TextAfterTheBreak(torch.nn.Module):
    """A forward broken before its blocks whose first graph never reads the text: the blocks are
    the first to."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x, self.text = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x, temb, text):
            return x + self.x(x) * temb[:, None, None] + self.text(text).mean(1, keepdim=True)

    def __init__(self):
        super().__init__()
        self.t = torch.nn.Linear(1, 8)
        self.blocks = torch.nn.ModuleList(self.Block() for _ in range(3))

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        temb = self.t(torch.sin(timestep[:, None] / 1000)).mean(-1)
        x = hidden_states * 2
        torch._dynamo.graph_break()
        for block in self.blocks:
            x = block(x, temb, encoder_hidden_states)
        return x


def test_a_new_prompt_is_seen_where_the_first_graph_takes_no_text():
    """The head records no text where the forward reads it only after the break: the blocks'
    graph takes it by name then, so a prompt changed mid-generation computes, as in an unbroken
    forward, instead of reusing the old prompt's output."""
    torch.manual_seed(0)
    model = _TextAfterTheBreak().eval()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2, 3]}})
    x, text, new = torch.randn(2, 6, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8) * 5
    with torch.no_grad():
        for i, t in enumerate(STEPS[:4]):
            call = dict(hidden_states=x + i, timestep=torch.full((2,), t),
                        encoder_hidden_states=text if i < 2 else new)
            out = f(**call)
            if i == 2:
                torch.testing.assert_close(out, model(**call), rtol=1e-5, atol=1e-5)
    trace = dit_compile.stats(f)["trace"]
    assert [r["action"] for r in trace] == ["compute", "compute", "compute", "step"], trace
    report = dit_compile.explain(model, **call)
    assert report.relayed and report.inputs["text"] == "l_encoder_hidden_states_", str(report)


def test_a_record_is_taken_only_in_the_call_that_made_it():
    """A tensor a head computed carries its call's inputs; once the head has run again, the old
    tensor's record is no longer taken (a model that keeps a tensor from an earlier call must not
    hand that call's timestep on), nor a record of another thread's call."""
    head = Head(lambda x, t: (x * 2, t + 1), (0, 1, None), (0, 1))
    x, t = torch.ones(2), torch.tensor([0.5])
    first = head(x, t)
    assert received(first).latent is x and received(first).timestep is t
    second = head(x + 1, t)
    assert received(first) is None and received([first[0], second[1]]) is received(second[1:])
    theirs = []
    thread = threading.Thread(target=lambda: theirs.extend(head(x, t)))
    thread.start()
    thread.join()
    assert received(theirs) is None and received(second) is not None
    # Two heads' last records met (a forward nested in another's): neither is guessed at.
    inner = Head(lambda x, t: (x * 3,), (0, 1, None), (0,))
    nested = inner(second[0], t)
    assert received(nested).latent is second[0] and received([second[0], *nested]) is None


def test_a_head_compiled_by_inductor_tags_its_outputs():
    """Inductor's compiled graph is a boxed callable (it takes its inputs as one list, and empties
    it); Dynamo calls it, and the head, with the inputs as arguments."""
    from torch._inductor.compile_fx import compile_fx
    gm = torch.fx.symbolic_trace(lambda x, t: (x * t, t + 1, x))
    x, t = torch.ones(3), torch.tensor([0.5])
    head = Head(compile_fx(gm, [x, t]), (0, 1, None), (0, 1))
    outs = head(x, t)
    assert received(outs).latent is x and received(outs).timestep is t
    assert outs[2] is x and not hasattr(x, TAG), "an input returned as it is is not tagged"
    torch.testing.assert_close(outs[0], x * t)


def test_a_call_whose_record_does_not_arrive_computes_in_full(monkeypatch):
    """Where the record is not its head's last (here: never), the blocks' graph cannot tell the
    call's step or branch: every call computes, as eager, and the user hears of it once."""
    from dit_compile.runtime import relay
    monkeypatch.setattr(relay.Head, "last", lambda self: None)
    model, kw = omnigen()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [1, 2]}})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = generation(f, kw, steps=STEPS[:3], branches=1, text="input_ids")
    said = _mixcache_warnings(rec)
    assert len(said) == 1 and "got no record of the call's inputs" in said[0], said
    theirs = generation(model, kw, steps=STEPS[:3], branches=1, text="input_ids")
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
