"""More of diffusers' DiTs, image and audio ones, for test_zoo's ``test_more_diffusers_dits``: tiny
seeded configs (random weights, fp32, eval mode) with batch-1 inputs shaped as their pipelines pass
them, and ``ZOO`` in test_zoo's format: name -> (factory, stacks the region pass must find, the single
stack's attribute for ``reference_cache.Reference`` or None).
"""
import pytest
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
    with torch.no_grad():   # zero-initialised modulation gates every block shut: open them
        for b in m.blocks:
            b.modulation.lin.weight.normal_(0, 0.1)
            b.modulation.lin.bias.normal_(0, 0.1)
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


def stable_audio_edm(layers: int = 3):
    """StableAudioDiTModel inside StableAudioPipeline with its EDM scheduler, whose timestep
    (``ln(sigma) / 4``) falls below zero mid-run; no text encoder: pass prompt embeddings of width
    12. Returns the pipeline."""
    from diffusers import AutoencoderOobleck, EDMDPMSolverMultistepScheduler, StableAudioPipeline
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    model = seeded("StableAudioDiTModel", sample_size=8, in_channels=4, num_layers=layers,
                   attention_head_dim=8, num_attention_heads=2, num_key_value_attention_heads=1,
                   out_channels=4, cross_attention_dim=16, time_proj_dim=8,
                   global_states_input_dim=16, cross_attention_input_dim=8)
    torch.manual_seed(1)
    projection = StableAudioProjectionModel(text_encoder_dim=12, conditioning_dim=8, min_value=0,
                                            max_value=512)
    vae = AutoencoderOobleck(encoder_hidden_size=4, downsampling_ratios=[2, 2],
                             channel_multiples=[1, 2], decoder_channels=4,
                             decoder_input_channels=4, audio_channels=2, sampling_rate=32)
    pipe = StableAudioPipeline(vae=vae, text_encoder=None, projection_model=projection,
                               tokenizer=None, transformer=model,
                               scheduler=EDMDPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_stable_audio(pipe, steps: int = 6) -> torch.Tensor:
    """One generation of ``stable_audio_edm``'s pipeline, seeded, as latents."""
    g = torch.Generator().manual_seed(0)
    text, negative = torch.randn(1, 6, 12, generator=g), torch.randn(1, 6, 12, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative, guidance_scale=7.0,
                    num_inference_steps=steps, output_type="latent", generator=g).audios


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
    with torch.no_grad():   # zero-initialised modulation and output layer: the output was zeros
        for layer in (m.adaLN_modulation[1], m.final_linear):
            layer.weight.normal_(0, 0.1)
            layer.bias.normal_(0, 0.1)
    return m, dict(hidden_states=torch.randn(1, 4, 4, 4), text_bth=torch.randn(1, 6, 16),
                   text_lens=torch.tensor([6]), timestep=torch.full((1,), 500.0))


def bria_fibo2():
    """Noise-refiner blocks on the image, then gist tokens (a Perceiver over the text) prepended,
    and one stack of which some blocks (the injection layers) also cross-attend to the text."""
    m = seeded("BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=4,
               n_refiner_layers=2, n_heads=2, cap_feat_dim=16, injection_layer_ids=(1, 3),
               perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
               gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(32, 16, 16))
    with torch.no_grad():   # zero-initialised cross-attention gates: give the text a path
        for b in m.layers:
            if b.cross_attention is not None:
                b.cross_attn_gate.fill_(0.5)
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.full((1,), 0.5),
              encoder_hidden_states=torch.randn(1, 3, 6, 16))
    # Its rotary table is built on the first call, under a torch.device context Dynamo cannot
    # enter (fullgraph=True fails there, with any backend): built by an eager call first.
    with torch.no_grad():
        m(**kw)
    return m, kw


def ace_step():
    """Audio tokens (B, T, C) joined with context latents; sliding-window and full attention in
    turn (a mask for every other block); a second timestep, ``timestep_r``."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12):
        pytest.skip("torch 2.11's Dynamo breaks its forward into 11 graphs ('Unexpected type in "
                    "sourceless builder', a Dynamo bug): uncached, with mixcache's warning")
    m = seeded("AceStepTransformer1DModel", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, in_channels=12,
               audio_acoustic_hidden_dim=4, patch_size=2, rope_theta=10000.0, sliding_window=4,
               encoder_hidden_size=16)
    return m, dict(hidden_states=torch.randn(1, 16, 4), timestep=torch.full((1,), 0.5),
                   timestep_r=torch.full((1,), 0.5), encoder_hidden_states=torch.randn(1, 6, 16),
                   context_latents=torch.randn(1, 16, 8))


def glm_image():
    """Dual-stream blocks ``(image, text) -> (image, text)``. Beside the text: prior (AR-model)
    token ids added onto the image tokens, a per-token drop mask (all True on the pipeline's
    unconditional call), size conditions, and a ``GlmImageKVCache`` object (mode None in
    text-to-image), a Python object Dynamo guards on."""
    m = seeded("GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4,
               num_layers=2, attention_head_dim=8, num_attention_heads=2, text_embed_dim=16,
               time_embed_dim=16, condition_dim=4, prior_vq_quantizer_codebook_size=32)
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
    for block in m.transformer_blocks:
        block.two = True
    tokens = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(1))
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   prior_token_id=tokens, prior_token_drop=torch.zeros_like(tokens, dtype=torch.bool),
                   timestep=torch.full((1,), 998.0), target_size=torch.tensor([[64.0, 64.0]]),
                   crop_coords=torch.zeros(1, 2), kv_caches=GlmImageKVCache(num_layers=2))


def ideogram4():
    """One stack over a packed ``[pad, text, image]`` sequence: the latent zero over the text
    region, the text features zero over the image's, per-token role, segment and (t, h, w)
    position ids from the pipeline's own ``_prepare_ids`` (its unconditional branch is a second
    model, on the image tokens alone)."""
    m = seeded("Ideogram4Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, intermediate_size=64, adaln_dim=16, llm_features_dim=24,
               rope_theta=10000, mrope_section=(2, 2, 2))
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline
    pad, text, image = 6, 5, 16
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids([text], 4, 4, pad, "cpu")
    feats = torch.randn(1, pad, 24)
    feats[:, :pad - text] = 0.0
    return m, dict(hidden_states=torch.cat([torch.zeros(1, pad, 16), torch.randn(1, image, 16)], 1),
                   encoder_hidden_states=torch.cat([feats, torch.zeros(1, image, 24)], 1),
                   timestep=torch.full((1,), 0.5), position_ids=position_ids,
                   segment_ids=segment_ids, indicator=indicator)


def lumina_next():
    """Self- and cross-attention mixed per head by a tanh gate (zero-initialised); a complex 2-D
    rotary table built as its pipeline builds it; proportional attention through
    ``cross_attention_kwargs``. (Its pipeline passes 1 - t / 1000, which rises: test_cache.)"""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    m = seeded("LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32,
               num_layers=3, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
               cross_attention_dim=16, learn_sigma=True, qk_norm=True)
    with torch.no_grad():   # the gates: give the text a path
        for b in m.layers:
            b.gate.fill_(0.5)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.full((1,), 0.5),
                   encoder_hidden_states=torch.randn(1, 6, 16),
                   encoder_mask=torch.ones(1, 6, dtype=torch.long),
                   image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 384, 384),
                   cross_attention_kwargs={"base_sequence_length": 16})


def stable_audio3():
    """Audio latents (channels, length); memory tokens prepended, dropped after; the duration both
    a global condition and one more text token."""
    m = seeded("StableAudio3DiTModel", io_channels=4, patch_size=1, embed_dim=32, depth=2,
               num_heads=2, cond_token_dim=16, global_cond_dim=16, local_add_cond_dim=5,
               timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=4)
    with torch.no_grad():   # the residual convs around the transformer, zero-initialised
        for conv in (m.preprocess_conv, m.postprocess_conv):
            conv.weight.normal_(0, 0.1)
    duration = torch.randn(1, 16)
    return m, dict(hidden_states=torch.randn(1, 4, 16), timestep=torch.full((1,), 0.5),
                   encoder_hidden_states=torch.cat([torch.randn(1, 6, 16), duration[:, None]], 1),
                   global_hidden_states=duration,
                   encoder_attention_mask=torch.ones(1, 7, dtype=torch.long))


def longcat_audio():
    """Audio tokens ``(B, T, C)`` beside a latent condition (zeros in text-to-audio); the text
    through ConvNeXt blocks held in an ``nn.Sequential`` (a text-only stack); one AdaLN for all
    blocks; a long skip from before the blocks to after."""
    m = seeded("LongCatAudioDiTTransformer", dit_dim=32, dit_depth=3, dit_heads=2, dit_text_dim=16,
               latent_dim=4, ff_mult=2.0)
    with torch.no_grad():   # zero-initialised modulation, output norm and projection
        for layer in (m.adaln_global_mlp.mlp[-1], m.norm_out.linear, m.proj_out):
            layer.weight.normal_(0, 0.1)
            layer.bias.normal_(0, 0.1)
    return m, dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                   encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool),
                   timestep=torch.full((1,), 0.5), attention_mask=torch.ones(1, 16, dtype=torch.bool),
                   latent_cond=torch.zeros(1, 16, 4))


def minimax_music3():
    """Frame-aligned conditioning ``(B, T, C)`` joined to the latent's channels before the blocks;
    the timestep's embedding prepended as a token."""
    m = seeded("MiniMaxMusic3Transformer1DModel", in_channels=4, condition_dim=16, num_layers=3,
               num_attention_heads=2, attention_head_dim=16, ff_inner_dim=32, rotary_dim=8,
               fourier_embedding_dim=16)
    return m, dict(hidden_states=torch.randn(1, 4, 16), timestep=torch.full((1,), 0.5),
                   encoder_hidden_states=torch.randn(1, 16, 16))

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
    "bria_fibo2": (bria_fibo2, {"noise_refiner": 2, "layers": 4}, None),
    "ace_step": (ace_step, {"layers": 4}, "layers"),
    "glm_image": (glm_image, {"transformer_blocks": 2}, "transformer_blocks"),
    "ideogram4": (ideogram4, {"layers": 2}, "layers"),
    "lumina_next": (lumina_next, {"layers": 3}, "layers"),
    "stable_audio3": (stable_audio3, {"transformer_blocks": 2}, "transformer_blocks"),
    "longcat_audio": (longcat_audio, {"text_conv_layer": 4, "blocks": 3}, None),
    "minimax_music3": (minimax_music3, {"transformer_blocks": 3}, "transformer_blocks"),
}
