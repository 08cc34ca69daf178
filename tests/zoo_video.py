"""diffusers' video DiTs at tiny configs for test_zoo: constructors and ``ZOO`` in its format."""
import torch

from tiny_models import seeded


def allegro():
    """Rotary frequencies and token positions passed in, as its pipeline builds them."""
    m = seeded("AllegroTransformer3DModel", patch_size=2, patch_size_t=1, num_attention_heads=2,
               attention_head_dim=12, in_channels=4, out_channels=4, num_layers=3,
               cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=2,
               caption_channels=16)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro
    *freqs, t, h, w = get_3d_rotary_pos_embed_allegro(12, ((0, 0), (4, 4)), (4, 4), 2,
                                                      interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(t.long(), h.long(), w.long()).T.reshape(3, 1, -1)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), encoder_attention_mask=torch.ones(1, 6),
                   image_rotary_emb=(tuple(freqs), tuple(pos)))


def chronoedit():
    """Image tokens before the text, which its attention takes as the last 512 (its text length);
    two latent frames, whose rotary frequencies it takes from the ends of its temporal range."""
    m = seeded("ChronoEditTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2,
               attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
               ffn_dim=32, num_layers=3, image_dim=16, added_kv_proj_dim=16, rope_max_seq_len=32)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 512, 16),
                   encoder_hidden_states_image=torch.randn(1, 5, 16))


def consisid():
    """Frames before channels; face features from a local extractor, added by perceiver
    cross-attention after each block (a second stack, interleaved)."""
    m = seeded("ConsisIDTransformer3DModel", num_attention_heads=2, attention_head_dim=16,
               in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2,
               sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
               temporal_compression_ratio=4, max_text_seq_length=6,
               use_rotary_positional_embeddings=True, is_train_face=True, cross_attn_interval=1,
               cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=8, LFE_vit_dim=8,
               LFE_depth=2, LFE_dim_head=4, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4,
               LFE_output_dim=21, LFE_ff_mult=1, LFE_num_scale=2)   # 21: the perceivers' kv width
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 2, use_real=True)
    return m, dict(hidden_states=torch.randn(1, 2, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), image_rotary_emb=rope, id_cond=torch.randn(1, 8),
                   id_vit_hidden=[torch.randn(1, 5, 8) for _ in range(2)])


def cosmos():
    m = seeded("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=16, num_layers=3, mlp_ratio=2.0, text_embed_dim=16,
               adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2),
               concat_padding_mask=False)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16), fps=24)


def easyanimate():
    """MMDiT blocks that return (image, text)."""
    m = seeded("EasyAnimateTransformer3DModel", num_attention_heads=2, attention_head_dim=16,
               in_channels=4, out_channels=4, patch_size=2, sample_width=8, sample_height=8,
               num_layers=2, mmdit_layers=2, time_embed_dim=8, text_embed_dim=16)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16))


def sana_video():
    m = seeded("SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=8, num_layers=3, num_cross_attention_heads=2,
               cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
               sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                   timestep=torch.full((1,), 500.0), encoder_attention_mask=torch.ones(1, 6))


def skyreels_v2():
    """Diffusion forcing: one timestep per latent frame."""
    m = seeded("SkyReelsV2Transformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2,
               attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
               ffn_dim=32, num_layers=3, rope_max_seq_len=32, inject_sample_info=True)
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1, 2), 500.0),
                   encoder_hidden_states=torch.randn(1, 5, 16), enable_diffusion_forcing=True, fps=[0])


def ltx2():
    """Video and audio streams through one stack, each with its own text; two outputs."""
    m = seeded("LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
               audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
               audio_cross_attention_dim=16, num_layers=2, caption_channels=16)
    return m, dict(hidden_states=torch.randn(1, 2 * 4 * 4, 4), audio_hidden_states=torch.randn(1, 5, 4),
                   encoder_hidden_states=torch.randn(1, 6, 16),
                   audio_encoder_hidden_states=torch.randn(1, 6, 16), timestep=torch.full((1,), 500.0),
                   encoder_attention_mask=torch.ones(1, 6), audio_encoder_attention_mask=torch.ones(1, 6),
                   num_frames=2, height=4, width=4, fps=24.0, audio_num_frames=5)


def motif_video():
    """Dual- then single-stream blocks; the last single block, a decoder, runs on the latent as it
    entered the blocks with the stream the others made as its context."""
    m = seeded("MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
               attention_head_dim=8, num_layers=2, num_single_layers=3, num_decoder_layers=1,
               patch_size=2, text_embed_dim=16, rope_axes_dim=(4, 2, 2))
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6))


def helios():
    """History latents at three scales joined before the blocks, modulated as at t = 0."""
    m = seeded("HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2,
               attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
               ffn_dim=32, num_layers=3, rope_dim=(4, 2, 2))
    prefix, long, mid, short, latent = torch.arange(10).split([1, 4, 2, 1, 2])
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 5, 16), indices_hidden_states=latent[None],
                   indices_latents_history_short=torch.cat([prefix, short])[None],
                   indices_latents_history_mid=mid[None], indices_latents_history_long=long[None],
                   latents_history_short=torch.randn(1, 4, 2, 8, 8),
                   latents_history_mid=torch.randn(1, 4, 2, 8, 8),
                   latents_history_long=torch.randn(1, 4, 4, 8, 8))


def wan_animate():
    """A face adapter after every other block (a second stack, interleaved); pose latents added to
    all frames but the first."""
    m = seeded("WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2,
               attention_head_dim=8, in_channels=12, latent_channels=4, out_channels=4, text_dim=16,
               freq_dim=16, ffn_dim=32, num_layers=4, image_dim=16, added_kv_proj_dim=16,
               rope_max_seq_len=32, motion_encoder_channel_sizes={"8": 8, "4": 8},
               motion_encoder_size=8, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8,
               face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=2)
    return m, dict(hidden_states=torch.randn(1, 12, 2, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 512, 16),
                   encoder_hidden_states_image=torch.randn(1, 5, 16),
                   pose_hidden_states=torch.randn(1, 4, 1, 8, 8),
                   face_pixel_values=torch.randn(1, 3, 1, 8, 8))


def joyimage_edit():
    """Items (a reference image, then the noisy target) as a 6-D latent, which the model reorders
    target first; dual-stream blocks."""
    m = seeded("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, out_channels=4,
               hidden_size=16, num_attention_heads=2, text_dim=16, mlp_width_ratio=2.0, num_layers=3,
               rope_dim_list=[2, 2, 4])
    return m, dict(hidden_states=torch.randn(1, 2, 4, 1, 8, 8), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16))


def joyimage_edit_plus():
    """Items patchified apart and padded into one 6-D patch tensor ``(B, patches, C, pt, ph, pw)``:
    the noisy target first, then a reference image; per-item rotary positions from
    ``shape_list``; a padded text token masked out; dual-stream blocks."""
    m = seeded("JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4,
               out_channels=4, hidden_size=16, num_attention_heads=2, text_dim=16,
               mlp_width_ratio=2.0, num_layers=3, rope_dim_list=[2, 2, 4])
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, -1] = 0
    return m, dict(hidden_states=torch.randn(1, 32, 4, 1, 2, 2), timestep=torch.full((1,), 500.0),
                   encoder_hidden_states=torch.randn(1, 6, 16), encoder_hidden_states_mask=mask,
                   shape_list=[[(1, 4, 4), (1, 4, 4)]])


def kandinsky6():
    """Two text-only stacks (the video's and the audio's text) before the fused video/audio
    stack, whose blocks return ``(video, audio)``; latents ``(B, T, H, W, 2c + 1)`` (the
    conditioning latent and mask channels zero), audio latents, a text padding mask, pooled
    CLIP text; two outputs. The released checkpoints' flags."""
    m = seeded("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=16,
               in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2), model_dim=16, ff_dim=32,
               num_text_blocks=2, num_visual_blocks=2, axes_dims=(4, 2, 2), visual_cond=True,
               in_audio_dim=4, out_audio_dim=4, text_token_padding=True, ca_rope=True,
               cross_gates=True, fix_modulation=True)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, -1] = False
    return m, dict(hidden_states=torch.randn(1, 2, 8, 8, 9), audio_hidden_states=torch.randn(1, 5, 4),
                   encoder_hidden_states=torch.randn(1, 6, 16), pooled_projections=torch.randn(1, 8),
                   timestep=torch.full((1,), 500.0), encoder_attention_mask=mask)


def kandinsky6_sr():
    """The super-resolution stage: latent and timestep only (no text, no guidance), NABLA sparse
    attention through flex attention, a block mask built in every block (64-token blocks: the
    token grid 8-divisible)."""
    m = seeded("Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=4, time_dim=16,
               patch_size=(1, 1, 1), model_dim=16, ff_dim=32, num_visual_blocks=2,
               axes_dims=(4, 2, 2), nabla_window=(3, 3, 3))
    return m, dict(hidden_states=torch.randn(1, 2, 8, 8, 9), timestep=torch.full((1,), 500.0))


def minimax_h3():
    """One packed sequence (text, audio rows, video rows) put together by ``index_copy`` at the
    indices the pipeline passes, float64 (t, h, w) positions, per-row timesteps as the distinct
    values and each row's index into them, a token refiner on the text in the prologue; two
    outputs (video, audio)."""
    m = seeded("MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16,
               hidden_size=32, num_layers=2, num_refiner_layers=2, ffn_dim=32, in_channels=4,
               audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
               time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)
    text, audio, frames, rows = 6, 4, 2, 4
    seq = text + audio + frames * rows
    text_i, audio_i = torch.arange(text), torch.arange(text, text + audio)
    video_i = torch.arange(text + audio, seq)
    tags = torch.zeros(seq, dtype=torch.long)
    tags[text_i], tags[audio_i] = 1, 2
    pos = torch.zeros(seq, 3, dtype=torch.float64)
    pos[:text + audio, 0] = torch.arange(text + audio, dtype=torch.float64)
    hw = torch.cartesian_prod(torch.arange(2.0), torch.arange(2.0))
    for f in range(frames):
        pos[video_i[f * rows:(f + 1) * rows]] = torch.cat([torch.full((rows, 1), text + f), hw],
                                                          1).double()
    t_index = torch.ones(seq, dtype=torch.long)
    t_index[audio_i] = 0
    return m, dict(hidden_states=torch.randn(1, frames * rows, 16),
                   audio_hidden_states=torch.randn(1, audio, 4),
                   encoder_hidden_states=torch.randn(1, text, 16), timestep=torch.tensor([0.4, 0.5]),
                   timestep_indices=t_index, token_tags=tags, position_ids=pos,
                   video_indices=video_i, audio_indices=audio_i, text_indices=text_i)


def sana_wm():
    """Camera-controlled video: per-frame timesteps ``(B, 1, T)`` (the conditioning frame's 0),
    text ``(B, 1, L, D)`` with its mask, the pipeline's own camera raymap and Plucker tensors;
    blocks of one class whose attention alternates linear (gated delta rule) and softmax, so
    their graphs differ."""
    m = seeded("SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32,
               num_attention_heads=2, patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16,
               chunk_plucker_post_attn_blocks=2, caption_channels=16, mlp_ratio=2.0)
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import prepare_camera
    frames, size = 9, 128          # 2 latent frames of 4x4 (VAE stride 8 in time, 32 in space)
    c2w = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
    c2w[:, 2, 3] = np.linspace(0.0, 0.5, frames)       # a slow dolly
    intrinsics = np.tile(np.array([[0.8 * size, 0.8 * size, size / 2, size / 2]], np.float32),
                         (frames, 1))
    cam = prepare_camera(c2w, intrinsics, target_size=(size, size), vae_stride=(8, 32, 32))
    timestep = torch.full((1, 1, 2), 500.0)
    timestep[..., 0] = 0.0
    return m, dict(hidden_states=torch.randn(1, 4, 2, 4, 4), timestep=timestep,
                   encoder_hidden_states=torch.randn(1, 1, 6, 16),
                   mask=torch.ones(1, 6, dtype=torch.long),
                   data_info={"img_hw": torch.tensor([[128.0, 128.0]])},
                   camera_conditions=cam["raymap"][None], chunk_plucker=cam["chunk_plucker"][None])


def cosmos3_omni():
    """Text-to-video: one packed sequence with no batch dim, the prompt's token ids (which the
    model embeds itself) then the video's patch tokens, at float 3-D rotary positions from the
    pipeline's own helpers; per-token timesteps (``vision_timesteps``) and a latent in a list,
    both found by dataflow; dual-stream (understanding, generation) layers."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
        get_3d_mrope_ids_text_tokens, get_3d_mrope_ids_vae_tokens)
    m = seeded("Cosmos3OmniTransformer", head_dim=8, hidden_size=16, intermediate_size=32,
               latent_channel=4, latent_patch_size=2, num_attention_heads=2, num_hidden_layers=3,
               num_key_value_heads=1, patch_latent_dim=16, vocab_size=32, rope_theta=10000.0,
               rope_axes_dim=[2, 1, 1])
    text, (t, h, w), p = 6, (2, 8, 8), 2
    text_ids, after = get_3d_mrope_ids_text_tokens(text, 0, use_float_positions=True)
    vision_ids, _ = get_3d_mrope_ids_vae_tokens(t, h // p, w // p, after + 15000,
                                                reset_spatial_indices=True, fps=24.0, base_fps=24.0,
                                                temporal_compression_factor=4)
    vision = t * (h // p) * (w // p)
    return m, dict(input_ids=torch.randint(0, 32, (text,), generator=torch.Generator().manual_seed(0)),
                   text_indexes=torch.arange(text), position_ids=torch.cat([text_ids, vision_ids], 1),
                   und_len=text, sequence_length=text + vision,
                   vision_tokens=[torch.randn(1, 4, t, h, w)], vision_token_shapes=[(t, h // p, w // p)],
                   vision_sequence_indexes=torch.arange(text, text + vision),
                   vision_mse_loss_indexes=torch.arange(text, text + vision),
                   vision_timesteps=torch.full((vision,), 500.0),
                   vision_noisy_frame_indexes=[torch.arange(t)])

# name: (factory, stacks the region pass must find, the single stack's attribute or None)
ZOO = {
    "allegro": (allegro, {"transformer_blocks": 3}, "transformer_blocks"),
    "chronoedit": (chronoedit, {"blocks": 3}, "blocks"),
    "consisid": (consisid, {"transformer_blocks": 2, "perceiver_cross_attention": 2}, None),
    "cosmos": (cosmos, {"transformer_blocks": 3}, "transformer_blocks"),
    "easyanimate": (easyanimate, {"transformer_blocks": 2}, None),
    "sana_video": (sana_video, {"transformer_blocks": 3}, "transformer_blocks"),
    "skyreels_v2": (skyreels_v2, {"blocks": 3}, "blocks"),
    "ltx2": (ltx2, {"transformer_blocks": 2}, None),
    "motif_video": (motif_video, {"transformer_blocks": 2, "single_transformer_blocks": 3}, None),
    "helios": (helios, {"blocks": 3}, "blocks"),
    "wan_animate": (wan_animate, {"blocks": 4, "face_adapter": 2}, None),
    "joyimage_edit": (joyimage_edit, {"double_blocks": 3}, None),
    "joyimage_edit_plus": (joyimage_edit_plus, {"double_blocks": 3}, None),
    "kandinsky6": (kandinsky6, {"video_text_transformer_blocks": 2,
                                "audio_text_transformer_blocks": 2, "visual_transformer_blocks": 2}, None),
    "minimax_h3": (minimax_h3, {"transformer_blocks": 2}, "transformer_blocks"),
    "sana_wm": (sana_wm, {"blocks": 2}, "blocks"),
    "cosmos3_omni": (cosmos3_omni, {"layers": 3}, None),
}
