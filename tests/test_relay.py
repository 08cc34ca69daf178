"""Forwards that Dynamo breaks before their blocks: the first graph records the call's inputs, the
graph that runs the blocks to the forward's return is cached by them (runtime.relay)."""
import threading
import warnings

import pytest
import torch

import dit_compile
from dit_compile import backend
from dit_compile.runtime.relay import TAG, Head, received
import tiny_models
from reference_cache import Reference
from test_cache import STEPS, generation
from tiny_models import seeded

SCHEDULE = dict(step=[2], cfg=[3], block=[4])


def omnigen():
    """Its rotary module breaks the trace (position ids read on the host); the prompt comes as
    token ids the model embeds."""
    m = seeded("OmniGenTransformer2DModel", in_channels=4, patch_size=2, hidden_size=16,
               num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, num_layers=3,
               pad_token_id=0, vocab_size=100, pos_embed_max_size=8,
               rope_scaling={"short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    tokens, seq = 5, 5 + 1 + 16         # text, the time token, the latent's 4 x 4 patches
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([0.5]),
                   input_ids=torch.randint(1, 100, (1, tokens), generator=torch.Generator().manual_seed(0)),
                   input_img_latents=[], input_image_sizes={},
                   attention_mask=torch.ones(1, seq, seq), position_ids=torch.arange(seq)[None],
                   return_dict=False)


MODELS = {"omnigen": (omnigen, "layers", "input_ids"),
          "lumina2": (tiny_models.lumina2, "layers", "encoder_hidden_states")}


def _mixcache_warnings(rec):
    return [str(w.message) for w in rec if str(w.message).startswith("mixcache")]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_forward_broken_before_its_blocks_reuses_as_the_reference(name, monkeypatch):
    """The forward's last graph holds every block: a forced schedule reuses there what the eager
    reference of the same rules reuses, over one generation of two branches, and nothing warns."""
    make, blocks, text = MODELS[name]
    model, kw = make()
    kw["return_dict"] = False
    found = []
    monkeypatch.setattr(backend, "find_regions",
                        lambda gm, real=backend.find_regions: found.append(real(gm)) or found[-1])
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", **SCHEDULE}})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = generation(f, kw, text=text)
    assert _mixcache_warnings(rec) == []
    assert any(r.stacks.get(blocks) for r in found), [r.stacks for r in found]
    assert dit_compile.stats(f)["reused"] == {"step": 2, "cfg": 1, "block": 2}
    theirs = generation(Reference(model, blocks_attr=blocks, **SCHEDULE).start(STEPS[0]), kw,
                        text=text)
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    graphs = len(found)     # the tagged tensors are not guarded on: no graph compiled again
    generation(f, kw, text=text)
    assert len(found) == graphs


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


def test_a_record_is_taken_only_in_the_call_that_made_it():
    """A tensor a head returned carries its call's inputs; once the head has run again, the old
    tensor's record is no longer taken (a model that keeps a tensor from an earlier call must not
    hand that call's timestep on), nor a record of another thread's call."""
    head = Head(lambda x, t: (x * 2, t + 1), (0, 1, None))
    x, t = torch.ones(2), torch.tensor([0.5])
    first = head(x, t)
    assert received(first).latent is x and received(first).timestep is t
    assert not hasattr(x, TAG), "an input of the call is not tagged"
    second = head(x + 1, t)
    assert received(first) is None and received([first[0], second[1]]) is received(second[1:])
    theirs = []
    thread = threading.Thread(target=lambda: theirs.extend(head(x, t)))
    thread.start()
    thread.join()
    assert received(theirs) is None and received(second) is not None
