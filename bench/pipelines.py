"""diffusers' own pipelines around tiny random transformers, fed ``prompt_embeds`` (no text encoder,
no VAE: ``output_type="latent"``), for the demo, the tests and the benchmarks."""
from __future__ import annotations

import torch


def wan_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def run_wan(pipe, steps: int = 8, seed: int = 0, size: int = 64, frames: int = 5,
            text_dim: int = 16, guidance: float = 5.0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 8, text_dim, generator=g).to(device)
    negative = torch.randn(1, 8, text_dim, generator=g).to(device)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=size, width=size,
                num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", generator=g).frames


def wan_ti2v_pipeline(transformer: torch.nn.Module):
    """Wan 2.2's text-image-to-video (TI2V-5B's ``expand_timesteps``): the image's latent is the
    first latent frame, its tokens' timestep zero, the others' the step's (per token), and a tiny
    Wan VAE encodes the image."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    torch.manual_seed(0)
    z = transformer.config.out_channels
    vae = AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * z,
                           latents_std=[1.0] * z).eval()
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   expand_timesteps=True)


def run_wan_ti2v(pipe, steps: int = 8, seed: int = 0, size: int = 32, frames: int = 5,
                 text_dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=g)
    embeds = torch.randn(1, 6, text_dim, generator=g)
    negative = torch.randn(1, 6, text_dim, generator=g)
    return pipe(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative, height=size,
                width=size, num_frames=frames, num_inference_steps=steps, guidance_scale=5.0,
                output_type="latent", generator=g).frames


def wan_i2v_transformer(layers: int = 3) -> torch.nn.Module:
    """Wan 2.1's image-to-video model, tiny: the latent beside the image's (4 + 4 channels) and
    the frame mask (4), and the image's CLIP features as a second text (``image_dim``)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=12, out_channels=4, text_dim=16, freq_dim=16,
                                 ffn_dim=32, num_layers=layers, cross_attn_norm=True,
                                 rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=16).eval()


def wan_i2v_pipeline(transformer: torch.nn.Module):
    """Wan 2.1's image-to-video: a tiny Wan VAE encodes the image as the first frame's condition,
    a tiny CLIP vision model gives the features the model attends to (the pipeline refuses
    ``image_embeds`` beside the image its latents need)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=16))
    return WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=clip.eval(),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}))


def qwenimage_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                             text_encoder=None, tokenizer=None, transformer=transformer)


def run_qwenimage(pipe, steps: int = 4, seed: int = 0, size: int = 64) -> torch.Tensor:
    """True CFG: a call per branch, the negative prompt of another length than the prompt."""
    g = torch.Generator().manual_seed(seed)
    dim = pipe.transformer.config.joint_attention_dim
    prompt, negative = torch.randn(1, 7, dim, generator=g), torch.randn(1, 4, dim, generator=g)
    return pipe(prompt_embeds=prompt, prompt_embeds_mask=torch.ones(1, 7),
                negative_prompt_embeds=negative, negative_prompt_embeds_mask=torch.ones(1, 4),
                true_cfg_scale=4.0, height=size, width=size, num_inference_steps=steps,
                output_type="latent", generator=g).images


def sd3_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        transformer=transformer)


def run_sd3(pipe, steps: int = 4, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Batched CFG: one call a step, the negative prompt's half first."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    text = [torch.randn(1, 5, cfg.joint_attention_dim, generator=g) for _ in range(2)]
    pooled = [torch.randn(1, cfg.pooled_projection_dim, generator=g) for _ in range(2)]
    return pipe(prompt_embeds=text[0], negative_prompt_embeds=text[1],
                pooled_prompt_embeds=pooled[0], negative_pooled_prompt_embeds=pooled[1],
                height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                output_type="latent", generator=g).images


def hidream_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
    none = {f"{kind}{n}": None for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3", "_4")}
    return HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                transformer=transformer, **none)


def run_hidream(pipe, steps: int = 4, seed: int = 0, size: int = 128) -> torch.Tensor:
    """Batched CFG, the Llama states ``(layers, batch, tokens, dim)`` batched in dim 1."""
    # HiDreamImagePipeline rescales every image to the area of its default size (1024 x 1024:
    # 4096 tokens, seconds an attention call on CPU); this makes ``size`` the size it runs.
    pipe.default_sample_size = size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    t5, llama = cfg.caption_channels
    embeds = {}
    for prefix in ("", "negative_"):
        embeds.update({f"{prefix}prompt_embeds_t5": torch.randn(1, 8, t5, generator=g),
                       f"{prefix}prompt_embeds_llama3": torch.randn(len(cfg.llama_layers), 1, 8,
                                                                    llama, generator=g),
                       f"{prefix}pooled_prompt_embeds": torch.randn(1, cfg.text_emb_dim, generator=g)})
    return pipe(height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                output_type="latent", generator=g, **embeds).images


def flux_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def run_flux(pipe, steps: int = 4, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    return pipe(prompt_embeds=torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                output_type="latent", generator=g).images


def flux_kontext_pipeline(transformer: torch.nn.Module):
    """FluxKontextPipeline: the image to edit, encoded by a two-level VAE, joins the latent's
    tokens in one sequence (the model returns both; the pipeline keeps the latent's)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=transformer.config.in_channels // 4,
                        norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0).eval()
    return FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                               text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)


def run_flux_kontext(pipe, steps: int = 4, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    return pipe(image=torch.rand(1, 3, size, size, generator=g),
                prompt_embeds=torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                height=size, width=size, max_area=size * size, _auto_resize=False,
                num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                generator=g).images


def flux_controlnet_pipeline(transformer: torch.nn.Module, nets: int = 1):
    """FluxControlNetPipeline with ``nets`` tiny ControlNets of the transformer's widths (more
    than one: diffusers' FluxMultiControlNetModel, which sums their residuals), their output
    projections made nonzero (diffusers initialises them to zero, so an untrained one adds
    nothing), and a two-level VAE that encodes the control images."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel,
                           FluxControlNetPipeline, FluxMultiControlNetModel)
    cfg = transformer.config
    controlnets = []
    for seed in range(nets):
        torch.manual_seed(seed)
        net = FluxControlNetModel(
            patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim, axes_dims_rope=cfg.axes_dims_rope).eval()
        with torch.no_grad():
            for m in (net.controlnet_blocks, net.controlnet_single_blocks, net.controlnet_x_embedder):
                for p in m.parameters():
                    p.normal_(0, 0.3)
        controlnets.append(net)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=cfg.in_channels // 4,
                        norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0).eval()
    return FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        controlnet=controlnets[0] if nets == 1 else FluxMultiControlNetModel(controlnets))


def run_flux_controlnet(pipe, steps: int = 8, seed: int = 0, size: int = 16, **kwargs
                        ) -> torch.Tensor:
    """``kwargs``: the pipeline's own (``control_guidance_start``, ``control_guidance_end``;
    lists, one per net, for a multi-ControlNet)."""
    from diffusers import FluxMultiControlNetModel
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    nets = (len(pipe.controlnet.nets) if isinstance(pipe.controlnet, FluxMultiControlNetModel)
            else 0)
    embeds = torch.randn(1, 6, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    images = [torch.rand(1, 3, size, size, generator=g) for _ in range(max(nets, 1))]
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                control_image=images if nets else images[0], height=size, width=size,
                num_inference_steps=steps, guidance_scale=3.5,
                controlnet_conditioning_scale=[1.0] * nets if nets else 1.0,
                output_type="latent", generator=g, **kwargs).images


def zimage_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                          tokenizer=None, transformer=transformer)


def run_zimage(pipe, steps: int = 4, seed: int = 0, size: int = 32, **kwargs) -> torch.Tensor:
    """CFG batched into one call: the two captions and the latent twice, as lists. The timestep
    the pipeline passes rises: 1 - sigma. ``kwargs`` go to the pipeline (``cfg_truncation``)."""
    g = torch.Generator().manual_seed(seed)
    dim = pipe.transformer.config.cap_feat_dim
    return pipe(prompt_embeds=[torch.randn(8, dim, generator=g)],
                negative_prompt_embeds=[torch.randn(8, dim, generator=g)], height=size, width=size,
                num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                generator=g, **kwargs).images


def lumina_next_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaPipeline
    return LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                          vae=None, text_encoder=None, tokenizer=None)


def run_lumina_next(pipe, steps: int = 6, seed: int = 0, size: int = 64) -> torch.Tensor:
    """CFG batched into one call as tensors, ``[positive, negative]`` (every other tensor-batched
    pipeline puts the negative first); the timestep rises: 1 - t / 1000."""
    g = torch.Generator().manual_seed(seed)
    dim = pipe.transformer.config.cross_attention_dim
    mask = torch.ones(1, 6, dtype=torch.long)
    return pipe(prompt_embeds=torch.randn(1, 6, dim, generator=g),
                negative_prompt_embeds=torch.randn(1, 6, dim, generator=g),
                prompt_attention_mask=mask, negative_prompt_attention_mask=mask, height=size,
                width=size, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                generator=g).images


def pixart_pag_pipeline(transformer: torch.nn.Module, layers: str = "blocks.0"):
    """PixArt-Sigma with perturbed-attention guidance: one call per step of batch 3k,
    ``[uncond, cond, perturbed]`` on the latent three times; the perturbed third's self-attention
    in ``layers`` is the identity (the pipeline swaps the processors for the generation)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPAGPipeline
    return PixArtSigmaPAGPipeline(tokenizer=None, text_encoder=None, vae=None,
                                  transformer=transformer, scheduler=DPMSolverMultistepScheduler(),
                                  pag_applied_layers=[layers])


def run_pixart_pag(pipe, steps: int = 12, seed: int = 0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dim = pipe.transformer.config.caption_channels
    embeds, negative = torch.randn(1, 6, dim, generator=g), torch.randn(1, 6, dim, generator=g)
    return pipe(prompt_embeds=embeds, prompt_attention_mask=torch.ones(1, 6), negative_prompt=None,
                negative_prompt_embeds=negative, negative_prompt_attention_mask=torch.ones(1, 6),
                height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                pag_scale=3.0, use_resolution_binning=False, output_type="latent",
                generator=g).images


def dit_transformer(layers: int = 3) -> torch.nn.Module:
    """The class-conditional DiT (ImageNet classes; class 1000 is DiTPipeline's null class)."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=8, num_layers=layers, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=1000).eval()


def omnigen_transformer() -> tuple[torch.nn.Module, dict]:
    """OmniGen and one call's arguments (its pipeline needs a tokenizer and a VAE): the rotary
    module breaks the trace (position ids read on the host); the prompt comes as token ids the
    model embeds."""
    from diffusers import OmniGenTransformer2DModel
    torch.manual_seed(0)
    m = OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=16, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=32, num_layers=3,
                                  pad_token_id=0, vocab_size=100, pos_embed_max_size=8,
                                  rope_scaling={"short_factor": [1.0] * 4,
                                                "long_factor": [2.0] * 4}).eval()
    tokens, seq = 5, 5 + 1 + 16         # text, the time token, the latent's 4 x 4 patches
    g = torch.Generator().manual_seed(0)
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                   timestep=torch.tensor([0.5]), input_ids=torch.randint(1, 100, (1, tokens), generator=g),
                   input_img_latents=[], input_image_sizes={},
                   attention_mask=torch.ones(1, seq, seq), position_ids=torch.arange(seq)[None],
                   return_dict=False)


def dit_pipeline(transformer: torch.nn.Module):
    """DiTPipeline decodes always: a one-level VAE, tiny."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                        latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def run_dit(pipe, steps: int = 6, seed: int = 0) -> torch.Tensor:
    """CFG batched into one call: [latents, latents] with [labels, null class]."""
    g = torch.Generator().manual_seed(seed)
    return torch.from_numpy(pipe(class_labels=[3], guidance_scale=4.0, num_inference_steps=steps,
                                 generator=g, output_type="np").images)


def hunyuanimage_pipeline(transformer: torch.nn.Module):
    """HunyuanImage 2.1: guidance through its guider (one call per branch), two text encoders."""
    from diffusers import (AdaptiveProjectedMixGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanImagePipeline)
    return HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5,
                                            adaptive_projected_guidance_start_step=3))


def run_hunyuanimage(pipe, steps: int = 6, seed: int = 0) -> torch.Tensor:
    """With the ByT5 text (prompt_embeds_2) it ships with: masks select its tokens."""
    g = torch.Generator().manual_seed(seed)
    mask2 = torch.zeros(1, 5)
    mask2[:, :3] = 1
    return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=g), prompt_embeds_mask=torch.ones(1, 6),
                negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                negative_prompt_embeds_mask=torch.ones(1, 6),
                prompt_embeds_2=torch.randn(1, 5, 8, generator=g), prompt_embeds_mask_2=mask2,
                negative_prompt_embeds_2=torch.randn(1, 5, 8, generator=g),
                negative_prompt_embeds_mask_2=mask2.clone(), height=128, width=128,
                num_inference_steps=steps, output_type="latent", generator=g).images


def hunyuan_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None,
                                tokenizer_2=None)


def run_hunyuan(pipe, steps: int = 4, seed: int = 0, size: int = 32) -> torch.Tensor:
    """True CFG (negative prompt, two transformer calls per step)."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    text = lambda: torch.randn(1, 6, cfg.text_embed_dim, generator=g)  # noqa: E731
    pooled = lambda: torch.randn(1, cfg.pooled_projection_dim, generator=g)  # noqa: E731
    return pipe(prompt_embeds=text(), pooled_prompt_embeds=pooled(),
                prompt_attention_mask=torch.ones(1, 6), negative_prompt_embeds=text(),
                negative_pooled_prompt_embeds=pooled(), negative_prompt_attention_mask=torch.ones(1, 6),
                true_cfg_scale=3.0, height=size, width=size, num_frames=5,
                num_inference_steps=steps, output_type="latent", generator=g).frames


def cogvideox_transformer(layers: int = 2) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                       out_channels=4, time_embed_dim=2, text_embed_dim=32,
                                       num_layers=layers, sample_width=8, sample_height=8,
                                       sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=16).eval()


def cogvideox_pipeline(transformer: torch.nn.Module):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def run_cogvideox(pipe, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """Batched CFG: both guidance branches in one transformer call."""
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt_embeds=torch.randn(1, 16, 32, generator=g),
                negative_prompt_embeds=torch.randn(1, 16, 32, generator=g), height=64, width=64,
                num_frames=9, num_inference_steps=steps, guidance_scale=6.0, output_type="latent",
                generator=g).frames


def mochi_pipeline(transformer: torch.nn.Module):
    """Mochi's scheduler as diffusers gives it (``invert_sigmas``): the transformer's timestep
    is 1000 (1 - sigma), rising from 0 through a generation."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None,
                         text_encoder=None, tokenizer=None, transformer=transformer)


def run_mochi(pipe, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """Batched CFG, the text masks given."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 6, dtype=torch.bool)
    return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                negative_prompt_attention_mask=mask, height=32, width=32, num_frames=7,
                num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
                generator=g).frames


def anyflow_transformer(layers: int = 3) -> torch.nn.Module:
    from diffusers import AnyFlowTransformer3DModel
    torch.manual_seed(0)
    return AnyFlowTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                     ffn_dim=32, num_layers=layers, rope_max_seq_len=32).eval()


def anyflow_pipeline(transformer: torch.nn.Module):
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler
    return AnyFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=FlowMapEulerDiscreteScheduler())


def run_anyflow(pipe, steps: int = 5, seed: int = 0, context: bool = True) -> torch.Tensor:
    """A flow map: each call takes the step's timestep and the one it jumps to (``r_timestep``),
    both per latent frame, CFG batched in one call. ``context``: the first latent frame is given
    (video continuation), its timestep held at zero."""
    g = torch.Generator().manual_seed(seed)
    embeds, negative = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    given = torch.randn(1, 1, 4, 8, 8, generator=g) if context else None
    return pipe(video_latents=given, prompt_embeds=embeds, negative_prompt_embeds=negative,
                height=64, width=64, num_frames=5, num_inference_steps=steps, guidance_scale=5.0,
                output_type="latent", generator=g).frames


def pixel_wan_kwargs(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                     seed: int, frames: int, size: int, channels: int = 3, steps: int = 20,
                     guidance: float = 4.0) -> dict:
    """WanPipeline's arguments for a pixel-space transformer (bench/train.py's reference models).

    WanPipeline sizes its own noise for a VAE latent (4x temporal, 8x spatial compression), which
    a pixel-space model does not have, so the noise ``[1, channels, frames, size, size]`` is drawn
    here from ``seed`` and handed in as ``latents=``: the pipeline then only runs its scheduler
    loop and CFG (conditional call, then unconditional, same timestep).

    The noise is drawn on the CPU whatever the transformer's device, so a GPU run starts from the
    same noise as a CPU run, and then moved to the transformer's device; it stays float32, the
    dtype WanPipeline keeps its latents in (it casts them to the transformer's dtype per call).
    """
    device = pipe.transformer.device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, channels, frames, size, size, generator=g).to(device)
    # num_frames only sizes the noise WanPipeline would draw itself; pass a value it accepts
    # (4k + 1) so it does not warn about one it never uses.
    return dict(prompt_embeds=prompt_embeds.to(device),
                negative_prompt_embeds=negative_prompt_embeds.to(device),
                latents=noise, height=size, width=size, num_frames=(frames - 1) // 4 * 4 + 1,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent")


def skyreels_df_pipeline(transformer: torch.nn.Module):
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler
    return SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=8.0))


def run_skyreels_df(pipe, steps: int = 6, seed: int = 0, **kwargs) -> torch.Tensor:
    """Diffusion forcing: one timestep per latent frame. ``kwargs`` go to the pipeline (a long
    video in chunks: ``num_frames``, ``base_num_frames``, ``overlap_history``; ``ar_step``)."""
    g = torch.Generator().manual_seed(seed)
    dim = pipe.transformer.config.text_dim
    kwargs = {"num_frames": 17, "base_num_frames": 17, **kwargs}
    return pipe(prompt=None, prompt_embeds=torch.randn(1, 5, dim, generator=g),
                negative_prompt_embeds=torch.randn(1, 5, dim, generator=g), height=32, width=32,
                num_inference_steps=steps, guidance_scale=5.0, output_type="latent", generator=g,
                **kwargs).frames
