"""More of diffusers' DiTs, image and audio ones, for test_zoo's ``test_more_diffusers_dits``: tiny
seeded configs (random weights, fp32, eval mode) with batch-1 inputs shaped as their pipelines pass
them, and ``ZOO`` in test_zoo's format: name -> (factory, stacks the region pass must find, the single
stack's attribute for ``reference_cache.Reference`` or None).
"""
import torch

from tiny_models import seeded


def auraflow():
    """Dual-stream blocks that return (text, image), then single-stream blocks on the two joined."""
    m = seeded("AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4,
               num_mmdit_layers=2, num_single_dit_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
               out_channels=4, pos_embed_max_size=64)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0))


def _flux_ids(seq, txt, axes=3):
    return dict(img_ids=torch.randn(seq, axes), txt_ids=torch.randn(txt, axes))


def bria():
    """Dual- and single-stream stacks, both of blocks that return (text, image)."""
    m = seeded("BriaTransformer2DModel", patch_size=1, in_channels=4, num_layers=2,
               num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=16, axes_dims_rope=[4, 4, 8])
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), **_flux_ids(16, 6))


def bria_fibo():
    """Dual- and single-stream stacks; each block swaps in its own text-encoder layer between blocks."""
    m = seeded("BriaFiboTransformer2DModel", patch_size=1, in_channels=4, num_layers=2,
               num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=16, axes_dims_rope=[4, 4, 8], text_encoder_dim=16)
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   text_encoder_layers=[torch.randn(1, 6, 16) for _ in range(4)],
                   timestep=torch.full((1,), 500.0), **_flux_ids(16, 6))


def _sizes():
    return dict(original_size=torch.tensor([[64.0, 64.0]]), target_size=torch.tensor([[64.0, 64.0]]),
                crop_coords=torch.tensor([[0.0, 0.0]]))


def cogview3plus():
    """Dual-stream blocks that return (image, text), called with keywords."""
    m = seeded("CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=2,
               attention_head_dim=8, num_attention_heads=2, out_channels=4, text_embed_dim=16,
               time_embed_dim=16, condition_dim=4, pos_embed_max_size=8, sample_size=8)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), **_sizes())


def cogview4():
    """Dual-stream blocks, ``(image, text) -> (image, text)``: marked ``two`` for the reference."""
    m = seeded("CogView4Transformer2DModel", patch_size=2, in_channels=4, out_channels=4,
               num_layers=2, attention_head_dim=8, num_attention_heads=2, text_embed_dim=16,
               time_embed_dim=16, condition_dim=4, pos_embed_max_size=8, sample_size=8,
               rope_axes_dim=(8, 8))
    for block in m.transformer_blocks:
        block.two = True
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), **_sizes())


def flux2():
    """Dual- and single-stream stacks whose blocks share one modulation, computed before them."""
    m = seeded("Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=2,
               num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
               guidance_embeds=False)
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), **_flux_ids(16, 6, axes=4))


def longcat_image():
    """Dual- and single-stream stacks, both of blocks that return (text, image)."""
    m = seeded("LongCatImageTransformer2DModel", patch_size=1, in_channels=4, num_layers=2,
               num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), **_flux_ids(16, 6))


def ovis_image():
    """Dual- and single-stream stacks, both of blocks that return (text, image)."""
    m = seeded("OvisImageTransformer2DModel", patch_size=1, in_channels=4, out_channels=4,
               num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=16, axes_dims_rope=(4, 4, 8))
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), **_flux_ids(16, 6))


def prx():
    m = seeded("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=16,
               hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=3, axes_dim=[8, 8])
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0))


def stable_audio():
    """Audio latents (channels, length); a global token prepended to the sequence, dropped after."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    m = seeded("StableAudioDiTModel", sample_size=8, in_channels=4, num_layers=2,
               attention_head_dim=8, num_attention_heads=2, num_key_value_attention_heads=1,
               out_channels=4, cross_attention_dim=16, time_proj_dim=8, global_states_input_dim=16,
               cross_attention_input_dim=16)
    return m, dict(hidden_states=torch.randn(1, 4, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   global_hidden_states=torch.randn(1, 1, 16), timestep=torch.full((1,), 500.0),
                   rotary_embedding=get_1d_rotary_pos_embed(4, 9, use_real=True,
                                                            repeat_interleave_real=False))


def krea2():
    """Text-fusion blocks (one of each kind) on the text before the joint stack."""
    m = seeded("Krea2Transformer2DModel", in_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
               timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
               text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
               num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    ids = torch.zeros(6 + 16, 3)
    ids[6:, 1] = torch.arange(4).repeat_interleave(4)
    ids[6:, 2] = torch.arange(4).repeat(4)
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 2, 16),
                   timestep=torch.full((1,), 500.0), position_ids=ids)


def ernie_image():
    """Its text is ``text_bth`` (with ``text_lens``): found by dataflow, not by name."""
    m = seeded("ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=2,
               ffn_hidden_size=32, in_channels=4, out_channels=4, patch_size=1, text_in_dim=16,
               rope_axes_dim=(4, 6, 6))
    return m, dict(hidden_states=torch.randn(1, 4, 4, 4), text_bth=torch.randn(1, 6, 16),
                   text_lens=torch.tensor([6]), timestep=torch.full((1,), 500.0))


# name: (factory, stacks the region pass must find, the single stack's attribute or None)
ZOO = {
    "auraflow": (auraflow, {"joint_transformer_blocks": 2, "single_transformer_blocks": 2}, None),
    "bria": (bria, {"transformer_blocks": 2, "single_transformer_blocks": 2}, None),
    "bria_fibo": (bria_fibo, {"transformer_blocks": 2, "single_transformer_blocks": 2}, None),
    "cogview3plus": (cogview3plus, {"transformer_blocks": 2}, None),
    "cogview4": (cogview4, {"transformer_blocks": 2}, "transformer_blocks"),
    "flux2": (flux2, {"transformer_blocks": 2, "single_transformer_blocks": 2}, None),
    "longcat_image": (longcat_image, {"transformer_blocks": 2, "single_transformer_blocks": 2}, None),
    "ovis_image": (ovis_image, {"transformer_blocks": 2, "single_transformer_blocks": 2}, None),
    "prx": (prx, {"blocks": 3}, "blocks"),
    "stable_audio": (stable_audio, {"transformer_blocks": 2}, "transformer_blocks"),
    "krea2": (krea2, {"transformer_blocks": 2}, "transformer_blocks"),
    "ernie_image": (ernie_image, {"layers": 2}, "layers"),
}
