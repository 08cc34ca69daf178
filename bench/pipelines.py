"""diffusers' own pipelines around tiny random transformers, fed ``prompt_embeds`` (no text encoder,
no VAE: ``output_type="latent"``), for the demo, the tests and the benchmarks."""
from __future__ import annotations

import torch


def wan_pipeline(transformer: torch.nn.Module):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def run_wan(pipe, steps: int = 8, seed: int = 0, size: int = 64, frames: int = 5,
            text_dim: int = 16, guidance: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 8, text_dim, generator=g)
    negative = torch.randn(1, 8, text_dim, generator=g)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=size, width=size,
                num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", generator=g).frames
