"""diffusers' own transformer classes at tiny configs, with inputs shaped as their pipelines pass them.

Each factory returns (model, kwargs) for ``model(**kwargs, return_dict=False)``; weights are random
(seeded), fp32, eval mode.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch


def diffusers_class(name: str) -> type:
    """diffusers' class ``name``; the test skips where the installed diffusers has none (the
    package supports older releases than the newest models need)."""
    import diffusers
    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return cls


def diffusers_version() -> tuple[int, int]:
    """The installed diffusers' (major, minor): where an older release traces otherwise."""
    import diffusers
    return tuple(int(p) for p in diffusers.__version__.split(".")[:2])


def seeded(cls_name: str, **config) -> torch.nn.Module:
    """diffusers' class ``cls_name`` built from ``config`` with seed 0, in eval mode."""
    cls = diffusers_class(cls_name)
    torch.manual_seed(0)
    return cls(**config).eval()


def wan(layers: int = 3, batch: int = 1, frames: int = 2, size: int = 8) -> tuple[torch.nn.Module, dict]:
    WanTransformer3DModel = diffusers_class("WanTransformer3DModel")
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                              num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32).eval()
    return m, dict(hidden_states=torch.randn(batch, 4, frames, size, size),
                   timestep=torch.full((batch,), 500.0),
                   encoder_hidden_states=torch.randn(batch, 5, 16))


def flux(batch: int = 1, single_layers: int = 2) -> tuple[torch.nn.Module, dict]:
    FluxTransformer2DModel = diffusers_class("FluxTransformer2DModel")
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2,
                               num_single_layers=single_layers,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    seq, txt = 16, 6
    return m, dict(hidden_states=torch.randn(batch, seq, 4),
                   encoder_hidden_states=torch.randn(batch, txt, 32),
                   pooled_projections=torch.randn(batch, 32), timestep=torch.full((batch,), 0.5),
                   img_ids=torch.randn(seq, 3), txt_ids=torch.randn(txt, 3))


def hunyuan(batch: int = 1, single_layers: int = 2) -> tuple[torch.nn.Module, dict]:
    HunyuanVideoTransformer3DModel = diffusers_class("HunyuanVideoTransformer3DModel")
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=10, num_layers=2,
                                       num_single_layers=single_layers,
                                       num_refiner_layers=2, patch_size=1, patch_size_t=1,
                                       guidance_embeds=True, text_embed_dim=16,
                                       pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    return m, dict(hidden_states=torch.randn(batch, 4, 2, 4, 4), timestep=torch.full((batch,), 500.0),
                   encoder_hidden_states=torch.randn(batch, 6, 16),
                   pooled_projections=torch.randn(batch, 8),
                   encoder_attention_mask=torch.ones(batch, 6),
                   guidance=torch.full((batch,), 3500.0))


def hidream(batch: int = 1, patchified: bool = False) -> tuple[torch.nn.Module, dict]:
    """``patchified``: the latent as HiDreamImagePipeline passes it (tokens, masks, ids and sizes);
    a 4-D latent makes unpatchify read tensor values, a graph break of its own."""
    HiDreamImageTransformer2DModel = diffusers_class("HiDreamImageTransformer2DModel")
    torch.manual_seed(0)
    m = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                       num_single_layers=2, attention_head_dim=8,
                                       num_attention_heads=4, caption_channels=[8, 4],
                                       text_emb_dim=8, num_routed_experts=2,
                                       num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                       max_resolution=(32, 32), llama_layers=(0, 1, 2, 3)).eval()
    kw = dict(hidden_states=torch.randn(batch, 4, 16, 16), timesteps=torch.full((batch,), 500.0),
              encoder_hidden_states_t5=torch.randn(batch, 8, 8),
              encoder_hidden_states_llama3=torch.randn(4, batch, 8, 4),
              pooled_embeds=torch.randn(batch, 8))
    if patchified:
        tokens, _, _, img_ids = m.patchify(kw.pop("hidden_states"))
        kw.update(hidden_states=tokens, hidden_states_masks=torch.ones(batch, tokens.shape[1]),
                  img_ids=img_ids, img_sizes=[(8, 8)] * batch)
    return m, kw


def sd3(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    SD3Transformer2DModel = diffusers_class("SD3Transformer2DModel")
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                              caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                              pos_embed_max_size=16).eval()
    return m, dict(hidden_states=torch.randn(batch, 4, 8, 8),
                   encoder_hidden_states=torch.randn(batch, 5, 16),
                   pooled_projections=torch.randn(batch, 8), timestep=torch.full((batch,), 500.0))


def chroma(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    """Per-block modulation sliced from one pooled embedding between blocks (glue)."""
    ChromaTransformer2DModel = diffusers_class("ChromaTransformer2DModel")
    torch.manual_seed(0)
    m = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                 approximator_hidden_dim=16, approximator_layers=2).eval()
    return m, dict(hidden_states=torch.randn(batch, 16, 4),
                   encoder_hidden_states=torch.randn(batch, 6, 32),
                   timestep=torch.full((batch,), 0.5), img_ids=torch.randn(16, 3),
                   txt_ids=torch.randn(6, 3))


def kandinsky5(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    """A text-only block stack before the visual one."""
    Kandinsky5Transformer3DModel = diffusers_class("Kandinsky5Transformer3DModel")
    torch.manual_seed(0)
    m = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                     out_visual_dim=4, patch_size=(1, 2, 2), model_dim=16, ff_dim=32,
                                     num_text_blocks=2, num_visual_blocks=3, axes_dims=(4, 2, 2)).eval()
    with torch.no_grad():   # zero-initialised modulation: give the timestep a path to the output
        for name, p in m.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.1)
    return m, dict(hidden_states=torch.randn(batch, 2, 8, 8, 4),
                   encoder_hidden_states=torch.randn(batch, 5, 16),
                   pooled_projections=torch.randn(batch, 8), timestep=torch.full((batch,), 500.0),
                   visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                   text_rope_pos=torch.arange(5))


def flux3(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    """Image blocks in an nn.ModuleDict (``mode_blocks["image"]``), one level below the text and
    single-stream stacks."""
    Flux3Transformer2DModel = diffusers_class("Flux3Transformer2DModel")
    torch.manual_seed(0)
    m = Flux3Transformer2DModel(in_channels=4, cond_in_channels=4, num_layers=2, num_single_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()
    seq, txt = 16, 6
    return m, dict(hidden_states=torch.randn(batch, seq, 4),
                   encoder_hidden_states=torch.randn(batch, txt, 16),
                   timestep=torch.full((batch,), 0.5), img_ids=torch.randn(seq, 4),
                   txt_ids=torch.randn(txt, 4))


def nucleus(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    """NucleusMoE: expert-choice routing, its experts' loop syncs to the host."""
    NucleusMoEImageTransformer2DModel = diffusers_class("NucleusMoEImageTransformer2DModel")
    torch.manual_seed(0)
    m = NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2,
                                          joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
                                          moe_intermediate_dim=24, num_experts=4,
                                          capacity_factors=2.0, dense_moe_strategy="all_moe").eval()
    for p in m.parameters():    # the experts are allocated with torch.empty
        torch.nn.init.normal_(p, std=0.2)
    return m, dict(hidden_states=torch.randn(batch, 16, 16), img_shapes=[(1, 4, 4)] * batch,
                   encoder_hidden_states=torch.randn(batch, 5, 12),
                   encoder_hidden_states_mask=torch.ones(batch, 5, dtype=torch.bool),
                   timestep=torch.full((batch,), 0.5))


def lumina2(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    """Its forward graph-breaks before the blocks (a Python set of the caption lengths decides
    whether to mask): the graph that holds them reads intermediates, not the model's inputs."""
    Lumina2Transformer2DModel = diffusers_class("Lumina2Transformer2DModel")
    torch.manual_seed(0)
    m = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24,
                                  num_layers=2, num_refiner_layers=1, num_attention_heads=3,
                                  num_kv_heads=1, multiple_of=2, axes_dim_rope=(4, 2, 2),
                                  axes_lens=(128, 128, 128), cap_feat_dim=8).eval()
    return m, dict(hidden_states=torch.randn(batch, 4, 8, 8), timestep=torch.full((batch,), 0.5),
                   encoder_hidden_states=torch.randn(batch, 6, 8),
                   encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool))


def zimage(batch: int = 1) -> tuple[torch.nn.Module, dict]:
    """Lists in (one latent and one caption per sample), and a timestep that rises through a
    generation as its pipeline passes it: 1 - sigma."""
    ZImageTransformer2DModel = diffusers_class("ZImageTransformer2DModel")
    torch.manual_seed(0)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16,
                                 n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                 cap_feat_dim=16, rope_theta=256.0, axes_dims=[4, 2, 2],
                                 axes_lens=[64, 16, 16]).eval()
    return m, dict(x=[torch.randn(4, 1, 8, 8) for _ in range(batch)], t=torch.full((batch,), 0.5),
                   cap_feats=[torch.randn(8, 16) for _ in range(batch)])


MODELS: dict[str, Callable[..., tuple[torch.nn.Module, dict[str, Any]]]] = {
    "wan": wan, "flux": flux, "hunyuan": hunyuan, "hidream": hidream, "flux3": flux3}
