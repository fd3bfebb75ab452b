"""The flow-matching model family: SD3-architecture bundles, loaded strictly, sampled with the flow SDE.

`load_sd3_bundle` reads a diffusers `StableDiffusion3Pipeline` directory with the same `from_pretrained` calls a
real SD3 / SD3.5 checkpoint goes through, and refuses any component whose keys do not match its architecture, as
`load_bundle` does for SD v1.x. Prompts are encoded by diffusers' own `StableDiffusion3Pipeline.encode_prompt`
(CLIP-L and CLIP-G penultimate states side by side, then T5's states, or zeros where the checkpoint has no T5),
so the conditioning is the stock pipeline's by construction. `SD3Bundle` keeps the model-family contract
(common/family.py) with the stochastic flow sampler of common/flow_sde.py. `build_tiny_sd3_bundle` writes a random
model of the very same classes for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from safediff.common.assets import resolve
from safediff.common.config import SamplerConfig
from safediff.common.flow_sde import flow_step_with_logprob, guided_velocity, sample_flow_with_logprob
from safediff.common.models import (
    ModelLoadError,
    check_loading_info,
    decode_images,
    move_modules,
    offline_clip_tokenizer,
)
from safediff.common.sampling import GaussianStep, SampledTrajectory
from safediff.common.types import TextEmbeds


@dataclass
class SD3Bundle:
    pipeline: StableDiffusion3Pipeline  # holds every component; used for its encode_prompt only
    max_sequence_length: int = 256      # T5 tokens per prompt (the stock pipeline's default); without T5, as many
                                        # zero states

    @property
    def transformer(self) -> SD3Transformer2DModel:
        return self.pipeline.transformer

    @property
    def denoiser(self) -> SD3Transformer2DModel:
        """The network the adapter goes on."""
        return self.pipeline.transformer

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.pipeline.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the transformer's latents for a height x width image."""
        factor = self.vae_scale_factor
        return self.transformer.config.in_channels, height // factor, width // factor

    def to(self, device: str | torch.device, dtype: torch.dtype) -> SD3Bundle:
        p = self.pipeline
        move_modules([m for m in (p.transformer, p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3)
                      if m is not None], device, dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEmbeds:
        """Joint text states [N, L, D] and pooled text embeddings [N, P], as SD3 conditions on them; the empty
        prompt gives the unconditional pair of SD3's classifier-free guidance."""
        states, _, pooled, _ = self.pipeline.encode_prompt(prompts, None, None, device=self.transformer.device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        return TextEmbeds(states, pooled)

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] -> uint8 images [N, 3, H, W]."""
        return decode_images(self.vae, latents)

    def sample(self, cond: TextEmbeds, uncond: TextEmbeds, noise: torch.Tensor,
               sampler: SamplerConfig) -> SampledTrajectory:
        """The flow SDE (or CPS) from `noise` [B, T+1, C, h, w] (common/flow_sde.py `sample_flow_with_logprob`)."""
        return sample_flow_with_logprob(self.transformer, self.scheduler, cond.states, cond.pooled, uncond.states,
                                        uncond.pooled, noise, sampler.num_steps, sampler.guidance_scale,
                                        sampler.noise_level, sampler.sde_kind)

    def step(self, x_t: torch.Tensor, k: torch.Tensor, cond: TextEmbeds, uncond: TextEmbeds, sampler: SamplerConfig,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GaussianStep:
        """The stochastic flow step of samples `x_t` [B, C, h, w], each at its own trajectory step `k` [B]:
        `prev_sample` scored, or drawn from `noise`."""
        self.scheduler.set_timesteps(sampler.num_steps)
        device, k = x_t.device, k.to(x_t.device)
        sigmas = self.scheduler.sigmas.to(device, torch.float32)
        v = guided_velocity(self.transformer, x_t, self.scheduler.timesteps.to(device)[k], cond.states, cond.pooled,
                            uncond.states, uncond.pooled, sampler.guidance_scale)
        return flow_step_with_logprob(v, x_t, sigmas[k], sigmas[k + 1], sampler.noise_level, sampler.sde_kind,
                                      sigma_max=sigmas[1], prev_sample=prev_sample, noise=noise)


def load_sd3_bundle(pretrained: str, revision: str | None = None, max_sequence_length: int = 256) -> SD3Bundle:
    """Load an SD3 pipeline directory: every weight of every component must match (ModelLoadError otherwise);
    text_encoder_3 (T5) may be absent, as diffusers allows."""
    pretrained = resolve(pretrained)
    if not Path(pretrained).is_dir():
        raise ModelLoadError(f"model.pretrained: {pretrained} is not a directory")
    kwargs = {"revision": revision} if revision else {}
    loaded = {}
    try:
        for name, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL),
                          ("text_encoder", CLIPTextModelWithProjection),
                          ("text_encoder_2", CLIPTextModelWithProjection), ("text_encoder_3", T5EncoderModel)):
            if name == "text_encoder_3" and not (Path(pretrained) / name).is_dir():
                loaded[name], loaded["tokenizer_3"] = None, None
                continue
            module, info = cls.from_pretrained(pretrained, subfolder=name, output_loading_info=True, **kwargs)
            check_loading_info(name, pretrained, info)
            loaded[name] = module.requires_grad_(False).eval()
        for name in ("tokenizer", "tokenizer_2"):
            loaded[name] = CLIPTokenizer.from_pretrained(pretrained, subfolder=name, **kwargs)
        if loaded["text_encoder_3"] is not None:
            loaded["tokenizer_3"] = T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_3", **kwargs)
        loaded["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler",
                                                                              **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.pretrained: cannot load {pretrained!r}: {err}") from err
    return SD3Bundle(StableDiffusion3Pipeline(**loaded), max_sequence_length)


def save_sd3_bundle(out_dir: str | Path, transformer: SD3Transformer2DModel, vae: AutoencoderKL,
                    clip_widths: tuple[int, int], clip_layers: int = 2, shift: float = 3.0) -> Path:
    """Save a transformer and VAE with two random CLIP text encoders (CLIP-L and CLIP-G's places, `clip_widths`
    wide; their states side by side are padded to the transformer's joint dim, their pooled embeddings concatenated
    must equal its pooled projection dim) and the offline CLIP tokenizer, in the diffusers layout `load_sd3_bundle`
    and a stock StableDiffusion3Pipeline read. No T5: its tokenizer cannot be built offline."""
    def clip(hidden: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=clip_layers,
            num_attention_heads=2, projection_dim=hidden, max_position_embeddings=77)).eval()

    if vae.config.shift_factor is None:  # SD3's pipeline decodes latents / scaling_factor + shift_factor
        vae.register_to_config(shift_factor=0.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=clip(clip_widths[0]), tokenizer=offline_clip_tokenizer(), text_encoder_2=clip(clip_widths[1]),
        tokenizer_2=offline_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    out = Path(out_dir)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sd3_bundle(out_dir: str | Path, seed: int = 0) -> Path:
    """A random SD3-architecture pipeline small enough for CPU tests."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=4,
        pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    # CLIP-L and CLIP-G side by side give 8 + 16 features, padded to the transformer's joint dim 32; pooled 8 + 16
    return save_sd3_bundle(out_dir, transformer, vae, clip_widths=(8, 16))
