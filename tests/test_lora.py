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
