"""LoRA adapters (peft, as diffusers' ``load_lora_weights`` and ``add_adapter`` make them) on a
mixcache-compiled transformer: peft's layers wrap the blocks' projections, on every block or only
on some, and a scale or an adapter switched between generations reuses nothing of the last."""
import pytest
import torch

import dit_compile
import tiny_models
from reference_cache import Reference
from test_cache import STEPS, generation

peft = pytest.importorskip("peft")

SCHED = dict(step=[2], cfg=[3], block=[4, 5])
SPAN = (1, 3)


def _with_lora(model, targets, name="default", seed=1):
    """``model`` with a random (not zero-initialised) LoRA on ``targets``, the adapter active."""
    torch.manual_seed(seed)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=targets), adapter_name=name)
    return model


def _compiled(model):
    return torch.compile(model, backend="mixcache", fullgraph=True, options={
        "regions": "eager", "cache": {"rule": "schedule", **SCHED, "span": list(SPAN)}})


def _close(ours, theirs):
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")


@pytest.mark.parametrize("targets", [
    ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj"],    # every block alike
    r"blocks\.1\.attn1\.to_q",                                  # one block unlike the others
])
def test_lora_forced_schedule_matches_eager_reference(targets):
    """A forced schedule through peft's LoRA layers equals the eager reference of the same rule;
    a second generation at another ``attention_kwargs`` scale (another graph) equals a fresh
    reference at that scale, so nothing of the first was reused."""
    torch._dynamo.reset()
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    _with_lora(model, targets)
    compiled = _compiled(model)
    first = generation(compiled, kw)
    _close(first, generation(Reference(model, **SCHED, span=SPAN).start(STEPS[0]), kw))
    assert {r["action"] for r in dit_compile.stats(compiled)["trace"]} == {
        "compute", "step", "cfg", "block"}

    half = dict(kw, attention_kwargs={"scale": 0.5})
    second = generation(compiled, half)
    ref = Reference(model, **SCHED, span=SPAN).start(STEPS[0])
    _close(second, generation(ref, half))
    assert max((x - y).abs().max() for x, y in zip(first, second)) > 1e-3, "the scale must show"


def test_an_adapter_switched_between_generations_reuses_nothing_of_the_other():
    """``set_adapters`` between generations: the second generation, under the other adapter,
    equals a fresh reference of the schedule under it."""
    torch._dynamo.reset()
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    _with_lora(model, ["to_q", "to_v"], name="a", seed=1)
    _with_lora(model, ["to_q", "to_v"], name="b", seed=2)
    compiled = _compiled(model)
    outs = {}
    for name in ("a", "b"):
        model.set_adapters(name)
        outs[name] = generation(compiled, kw)
        _close(outs[name], generation(Reference(model, **SCHED, span=SPAN).start(STEPS[0]), kw))
    assert max((x - y).abs().max() for x, y in zip(outs["a"], outs["b"])) > 1e-3
    generations = {r["generation"] for r in dit_compile.stats(compiled)["trace"]}
    assert len(generations) == 2


def test_a_scale_in_the_call_that_changes_is_read_in_each_region(monkeypatch):
    """``attention_kwargs={"scale": s}`` at a second value: Dynamo makes it an input, read with
    ``.item()`` before the blocks. Handed to the blocks as a number, it was a region's output,
    which Inductor cannot return (its compile failed at the second scale, where plain Inductor
    ran); each region now reads it itself. Equal to eager at each scale, through Inductor."""
    import dit_compile.backend as backend
    model = _with_lora(tiny_models.wan(layers=2)[0], ["to_q", "to_v"])
    kw = tiny_models.wan(layers=2)[1]
    plans, real = [], backend.split
    monkeypatch.setattr(backend, "split", lambda gm, rmap: plans.append(real(gm, rmap)) or plans[-1])
    f = torch.compile(model, backend="mixcache", options={"regions": "blocks", "cache": None})
    with torch.no_grad():
        for scale in (0.5, 0.25, 0.75):
            out = f(**kw, attention_kwargs={"scale": scale}, return_dict=False)[0]
            ref = model(**kw, attention_kwargs={"scale": scale}, return_dict=False)[0]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"scale {scale}")
    assert len(plans) >= 2, "a recompile: the scale an input from the second"
    numbers = [a.name for plan in plans for p in plan.pieces
               for a in p.module.graph.output_node().all_input_nodes
               if isinstance(a.meta.get("example_value", a.meta.get("val")), torch.SymFloat)]
    assert not numbers, numbers
