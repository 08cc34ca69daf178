"""Cache guards and runtime state: forced schedules against an eager reference, lifecycle rules,
per-sample decisions, memory bound, bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_compile
import dit_compile.backend as backend
import random_dits
import tiny_models
from reference_cache import Reference

STEPS = (900.0, 750.0, 600.0, 450.0, 300.0, 150.0)


def generation(f, kw, steps=STEPS, branches=2):
    """One sampler run: per step, one call per guidance branch (different text, same timestep)."""
    outs = []
    with torch.no_grad():
        for t in steps:
            for b in range(branches):
                call = dict(kw, timestep=torch.full_like(kw["timestep"], t),
                            encoder_hidden_states=kw["encoder_hidden_states"] * (1.0 - 2.0 * b))
                y = f(**call)
                outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def compiled(model, cache, **opts):
    return torch.compile(model, backend="mixcache", fullgraph=True,
                         options={"regions": "eager", "cache": cache, **opts})


def _rd(model):
    return lambda **kw: model(**kw)


schedules = st.fixed_dictionaries({
    "step": st.sets(st.integers(1, len(STEPS) - 1)),
    "cfg": st.sets(st.integers(1, len(STEPS) - 1)),
    "block": st.sets(st.integers(1, len(STEPS) - 1)),
})


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=random_dits.specs().filter(lambda s: len(s.depths) == 1 and not s.two_streams),
       sched=schedules, data=st.data())
def test_forced_schedules_match_eager_reference(spec, sched, data):
    torch._dynamo.reset()
    model, kw = random_dits.build(spec)
    n = spec.depths[0]
    a = data.draw(st.integers(1, n - 1))
    b = data.draw(st.integers(a + 1, n))
    cache = {"rule": "schedule", **{k: sorted(v) for k, v in sched.items()}, "span": [a, b]}
    ours = generation(compiled(model, cache), kw)
    ref = Reference(model, step=sched["step"], cfg=sched["cfg"], block=sched["block"],
                    span=(a, b)).start(STEPS[0])
    theirs = generation(ref, kw)
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")


def test_wan_forced_schedule_matches_reference_and_counts():
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    sched = dict(step=[2], cfg=[1, 3], block=[4, 5])
    f = compiled(model, {"rule": "schedule", **sched, "span": [1, 4]})
    ours = generation(f, kw)
    ref = Reference(model, **sched, span=(1, 4)).start(STEPS[0])
    for x, y in zip(ours, generation(ref, kw)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    s = dit_compile.stats(f)
    assert s["calls"] == 12
    assert s["reused"] == {"step": 2, "cfg": 2, "block": 4}
    assert [(r["step"], r["branch"]) for r in s["trace"]][:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert 0 < s["flops_fraction"] < 1


def test_no_cache_option_reuses_nothing_and_no_recompiles(monkeypatch):
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    traces = []
    real = backend.find_regions
    monkeypatch.setattr(backend, "find_regions", lambda gm: traces.append(1) or real(gm))
    f = compiled(model, {"rule": "first_block", "threshold": 1e-9})
    ref = generation(lambda **k: model(**k), kw)
    for x, y in zip(generation(f, kw), ref):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert dit_compile.stats(f)["reused"] == {}
    assert len(traces) == 1, "no recompilation across steps and branches"


def test_new_generation_drops_cache():
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3, 4, 5]})
    generation(f, kw)
    first = generation(f, kw)           # the timestep goes up: a new generation
    ref = generation(lambda **k: model(**k), kw, steps=STEPS[:1])
    torch.testing.assert_close(first[0], ref[0], rtol=1e-6, atol=1e-6)
    gens = {r["generation"] for r in dit_compile.stats(f)["trace"]}
    assert len(gens) == 2
    assert [r["action"] for r in dit_compile.stats(f)["trace"] if r["step"] == 0] == ["compute"] * 4


def _calls(f, kw, texts):
    """One call per (timestep, text) in order; ``texts[k]`` lists step k's branch texts."""
    with torch.no_grad():
        return [f(**dict(kw, timestep=torch.full_like(kw["timestep"], t), encoder_hidden_states=e))[0]
                for t, es in zip(STEPS, texts) for e in es]


def test_prompt_change_mid_generation_is_never_served_from_cache():
    """A new prompt (same shapes) for branch 0 from step 3 on: its first call computes, for the
    new prompt; the other branch keeps its cache. Equal embeddings rebuilt as a new tensor at
    every step are the same prompt and keep reusing."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cond, uncond = kw["encoder_hidden_states"], -kw["encoder_hidden_states"]
    other = torch.randn_like(cond)
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3, 4]})
    texts = [[cond.clone(), uncond]] * 3 + [[other, uncond]] * 2
    outs = _calls(f, kw, texts)
    actions = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert actions[2:6] == [(1, 0, "step"), (1, 1, "step"), (2, 0, "step"), (2, 1, "step")]
    assert actions[6:] == [(3, 0, "compute"), (3, 1, "step"), (4, 0, "step"), (4, 1, "step")]
    ref = _calls(_rd(model), kw, texts)
    torch.testing.assert_close(outs[6], ref[6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[8], outs[6])    # step reuse of the new prompt's output


def test_one_step_sampler_called_again_keeps_state_bounded():
    """A one-step generation repeated looks like one step with ever more branches: past
    MAX_BRANCHES calls at one timestep a new generation starts, so the cached state stays bounded."""
    from dit_compile.runtime.cache import MAX_BRANCHES, find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]})
    generation(f, kw, steps=STEPS[:1], branches=3 * MAX_BRANCHES)
    state = find_state(f)
    assert len(state.branches) <= MAX_BRANCHES
    assert len({r["generation"] for r in dit_compile.stats(f)["trace"]}) == 3
    assert all(r["action"] == "compute" for r in dit_compile.stats(f)["trace"])


def test_shape_change_mid_generation_is_a_new_generation():
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3]})
    generation(f, kw, steps=STEPS[:2], branches=1)
    other = dict(kw, hidden_states=torch.randn(1, 4, 2, 8, 12))
    with torch.no_grad():
        y = f(**dict(other, timestep=torch.tensor([STEPS[2]])))[0]
        torch.testing.assert_close(y, model(**dict(other, timestep=torch.tensor([STEPS[2]])))[0],
                                   rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(f)["trace"][-1]["action"] == "compute"


def test_reset_and_two_models_share_nothing():
    m1, kw = tiny_models.wan(layers=3)
    m2, _ = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f1 = compiled(m1, {"rule": "schedule", "step": [1, 2]})
    f2 = compiled(m2, {"rule": "schedule", "step": [1, 2]})
    generation(f1, kw, steps=STEPS[:2])
    assert dit_compile.stats(f1)["cached_bytes"] > 0
    with pytest.raises(ValueError, match="no mixcache state"):
        dit_compile.stats(f2)
    generation(f2, kw, steps=STEPS[:1])
    assert dit_compile.stats(f2)["calls"] == 2
    dit_compile.reset(f1)
    assert dit_compile.stats(f1)["cached_bytes"] == 0
    with torch.no_grad():   # after reset, the same timestep is a fresh generation, not a branch
        y = f1(**dict(kw, timestep=torch.tensor([STEPS[1]])))[0]
    assert dit_compile.stats(f1)["trace"][-1]["action"] == "compute"


def test_model_compiled_again_with_other_options_gets_a_fresh_state():
    """Compiling the same model again with another cache configuration (as a benchmark does from
    one method to the next) starts from a fresh state: no counters, no cache, and the new
    configuration's settings (under CUDA graphs, copies of what it caches)."""
    from dit_compile.runtime.cache import find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    generation(compiled(model, {"rule": "schedule", "step": [1, 2, 3]}), kw, steps=STEPS[:4])
    first = find_state(model)
    assert first.stats()["flops_fraction"] == pytest.approx(0.25) and not first.clone
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2]},
                               "mode": "reduce-overhead"})
    generation(f, kw, steps=STEPS[:4])
    s = dit_compile.stats(f)
    assert s["calls"] == 8 and s["flops_fraction"] == pytest.approx(0.75)
    assert find_state(model) is not first and find_state(model).clone


def test_block_decisions_are_per_sample():
    """A batch of two prompts gives each sample what it gets alone under First-Block-Cache."""
    model, kw = tiny_models.wan(layers=4, batch=2)
    kw["return_dict"] = False
    kw["hidden_states"][1] *= 3.0
    cache = {"rule": "first_block", "threshold": 0.35}
    both = generation(compiled(model, cache), kw, branches=1)
    alone = []
    for i in range(2):
        torch._dynamo.reset()
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in kw.items()}
        m = tiny_models.wan(layers=4)[0]
        alone.append(generation(compiled(m, cache), one, branches=1))
    for k, y in enumerate(both):
        torch.testing.assert_close(y, torch.cat([alone[0][k], alone[1][k]]), rtol=1e-5, atol=1e-5)


def test_memory_bound_is_a_clear_error():
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]}, cache_memory=64)
    with pytest.raises(Exception, match=r"cache_memory=64"):
        generation(f, kw, steps=STEPS[:2])


@pytest.mark.parametrize("cache,match", [
    ({"rule": "schedule", "step": [0]}, "step 0 cannot reuse"),
    ({"rule": "schedule", "block": [2], "span": [1, 9]}, r"span=\[1, 9\].*has 3 blocks"),
    ({"rule": "schedule", "block": [2], "probe": 3}, r"probe=3"),
    ({"rule": "first_block", "threshold": -0.1}, r"threshold=-0.1"),
    ({"rule": "fastercache", "every": 1}, r"every=1"),
    ({"rule": "magic"}, r"cache rule 'magic'"),
    ({"rule": "teacache", "threshold": 0.1, "treshold": 1}, r"unknown key\(s\) \['treshold'\]"),
])
def test_bad_cache_options(cache, match):
    model, kw = tiny_models.wan(layers=3)
    with pytest.raises(Exception, match=match):
        compiled(model, cache)(**kw, return_dict=False)


def test_wan_pipeline_with_cache_two_generations():
    import sys, os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    model, _ = tiny_models.wan(layers=3)
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipelines.run_wan(pipe, steps=4)
    pipe.transformer = compiled(model, {"rule": "schedule", "cfg": [1, 2, 3]})
    torch.testing.assert_close(pipelines.run_wan(pipe, steps=4)[:, :, :1], ref[:, :, :1],
                               rtol=1e6, atol=1e6)  # runs; exact equality is not expected
    pipelines.run_wan(pipe, steps=4)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert len(trace) == 16
    assert [r["branch"] for r in trace[:4]] == [0, 1, 0, 1]
    assert {r["generation"] for r in trace} == {0, 1}
    assert [r["action"] for r in trace if r["branch"] == 1 and r["step"] > 0] == ["cfg"] * 6


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_first_block_rule_reproduces_diffusers_first_block_cache(threshold):
    """The first_block rule over mixcache's guard points gives what diffusers' own hook gives."""
    import os, sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    from diffusers.hooks import FirstBlockCacheConfig
    model, _ = tiny_models.wan(layers=4)
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    ref = pipelines.run_wan(pipe, steps=8)
    model.disable_cache()
    pipe.transformer = compiled(model, {"rule": "first_block", "threshold": threshold,
                                        "per_sample": False})
    out = pipelines.run_wan(pipe, steps=8)
    assert dit_compile.stats(pipe.transformer)["reused"].get("block", 0) > 0
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.inductor
def test_reduce_overhead_keeps_copies_of_what_it_returns():
    """CUDA graphs overwrite a graph's outputs on the next replay, so a cache holding the returned
    tensors would reuse whatever the replay wrote (a known failure of hook-based caches). Under
    mode="reduce-overhead" the runtime caches copies: a caller that overwrites every returned
    output in place, as a replay would, must get the same generation as one that does not."""
    steps = tuple(float(t) for t in range(1000, 0, -50))
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = torch.compile(model, backend="mixcache", mode="reduce-overhead")
    g = torch.compile(tiny_models.wan(layers=3)[0], backend="mixcache",
                      options={"mode": "reduce-overhead", "cache": "balanced"})

    def run(f, overwrite):
        def call(**k):
            y = f(**k)
            kept = y[0].clone()
            if overwrite:
                y[0].fill_(1e4)          # what the next replay would leave in the buffer
            return (kept,)
        outs = generation(call, kw, steps=steps)
        return outs, [r["action"] for r in dit_compile.stats(f)["trace"][-len(outs):]]

    with torch.no_grad():
        clean, actions = run(f, overwrite=False)
        dirty, _ = run(f, overwrite=True)
        # The same, with the mode given as an option beside others (torch.compile refuses both);
        # compiled afresh, so it cannot borrow the first model's graph.
        torch._dynamo.reset()
        dirty_too, _ = run(g, overwrite=True)
    assert "step" in actions, "the default policy must reuse for this test to mean anything"
    for a, b, c in zip(clean, dirty, dirty_too):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
