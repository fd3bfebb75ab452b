"""The model bundle of the UNet family: the SD v1.x/2.x components a rollout and a learner need, loaded strictly.

`load_bundle` reads a diffusers directory (or a hub id from the local cache) with the same
`from_pretrained` calls a user's real Stable Diffusion checkpoint goes through, and refuses any
checkpoint whose keys do not match the architecture (the reference's `strict=False` loads hid
such mismatches). `build_tiny_bundle` writes a random model of the very same classes, so tests
exercise that loading path without downloading weights. `ModelBundle` keeps the model-family contract
(common/family.py) with DDIM as its sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from safediff.common.assets import resolve
from safediff.common.config import SamplerConfig
from safediff.common.errors import UserInputError
from safediff.common.sampling import (
    GaussianStep,
    SampledTrajectory,
    ddim_step_with_logprob,
    guided_noise_prediction,
    sample_with_logprob,
)
from safediff.common.types import TextEmbeds

# Their per-load progress bars ("Loading weights: 100%|...") repeat in every actor's log for models that load in
# a blink; the project reports its own progress.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


class ModelLoadError(UserInputError, RuntimeError):
    """A model that cannot be loaded as asked; the message names the config field and the path."""


@dataclass
class ModelBundle:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @property
    def denoiser(self) -> UNet2DConditionModel:
        """The network the adapter goes on."""
        return self.unet

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the UNet's latents for a height x width image."""
        factor = self.vae_scale_factor
        return self.unet.config.in_channels, height // factor, width // factor

    def to(self, device: str | torch.device, dtype: torch.dtype) -> ModelBundle:
        move_modules((self.unet, self.vae, self.text_encoder), device, dtype)
        return self

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> TextEmbeds:
        """CLIP text encoder last hidden states [N, L, D], as Stable Diffusion conditions on them. grad: keep the
        graph to the text encoder's weights that require it (the inversion attack's new token)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.set_grad_enabled(grad):
            return TextEmbeds(self.text_encoder(ids.to(self.text_encoder.device))[0])

    def denoising_loss(self, latents: torch.Tensor, cond: TextEmbeds, gen: torch.Generator,
                       guidance_scale: float = 1.0, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion training loss of `latents` [B, C, h, w] under `cond` (B rows), in fp32:
        E | eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t) |^2 at `timesteps` [B] (training timesteps), or
        else t uniform over them, eps from `gen` (a v-prediction model regresses the velocity instead). No guidance:
        guidance_scale unused."""
        t = (timesteps if timesteps is not None
             else torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=gen))
        noise = torch.randn(latents.shape, generator=gen, dtype=latents.dtype).to(latents.device)
        t = t.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = (noise if self.scheduler.config.prediction_type == "epsilon"
                  else self.scheduler.get_velocity(latents, noise, t))
        pred = self.unet(noisy, t, encoder_hidden_states=cond.states).sample
        return F.mse_loss(pred.float(), target.float())

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] -> uint8 images [N, 3, H, W]."""
        return decode_images(self.vae, latents)

    def sample(self, cond: TextEmbeds, uncond: TextEmbeds, noise: torch.Tensor,
               sampler: SamplerConfig) -> SampledTrajectory:
        """DDIM with eta > 0 from `noise` [B, T+1, C, h, w] (common/sampling.py `sample_with_logprob`)."""
        return sample_with_logprob(self.unet, self.scheduler, cond.states, uncond.states, noise, sampler.num_steps,
                                   sampler.guidance_scale, sampler.eta)

    def step(self, x_t: torch.Tensor, k: torch.Tensor, cond: TextEmbeds, uncond: TextEmbeds, sampler: SamplerConfig,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GaussianStep:
        """The DDIM step of samples `x_t` [B, C, h, w], each at its own trajectory step `k` [B]: `prev_sample`
        scored, or drawn from `noise`."""
        self.scheduler.set_timesteps(sampler.num_steps)
        t = self.scheduler.timesteps.to(x_t.device)[k.to(x_t.device)]
        eps = guided_noise_prediction(self.unet, x_t, t, cond.states, uncond.states, sampler.guidance_scale)
        return ddim_step_with_logprob(self.scheduler, eps, t, x_t, sampler.num_steps, sampler.eta,
                                      prev_sample=prev_sample, noise=noise)


def move_modules(modules, device: str | torch.device, dtype: torch.dtype) -> None:
    for module in modules:
        module.to(device=device)
        if module.dtype != dtype:  # a no-op cast would still make diffusers warn
            module.to(dtype=dtype)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> latents [N, C, h, w]: the posterior mean (no sampling noise), scaled (and shifted)
    as the pipelines scale them; `decode_images` inverts it up to the autoencoder's error."""
    shift = vae.config.shift_factor or 0.0
    x = images.to(vae.device, vae.dtype) / 127.5 - 1
    return (vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_images(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, h, w] -> uint8 images [N, 3, H, W], undoing the latent scaling (and SD3's shift)."""
    shift = vae.config.shift_factor or 0.0
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    images = vae.decode(latents).sample.float()
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def check_loading_info(component: str, where: str, info: dict) -> None:
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {list(v)[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise ModelLoadError(f"model.pretrained: {component} in {where} does not match its architecture ({detail})")


def load_clip_text_encoder(pretrained: str, revision: str | None = None,
                           with_projection: bool = False) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The `tokenizer` and CLIP `text_encoder` of a diffusers layout (SD 1.x/2.x, SD3 and FLUX.1 all have them), the
    encoder loaded strictly and frozen; alone, for a text-encoder attack (Ring-A-Bell), or with the rest by
    `load_bundle`. `with_projection`: the encoder has a projection head (SD3's CLIPTextModelWithProjection, whose
    hidden states are those of a CLIPTextModel)."""
    pretrained = resolve(pretrained)
    kwargs = {"revision": revision} if revision else {}
    architecture = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    try:
        text_encoder, info = architecture.from_pretrained(pretrained, subfolder="text_encoder",
                                                          output_loading_info=True, **kwargs)
        check_loading_info("text_encoder", pretrained, info)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.pretrained: cannot load the text encoder of {pretrained!r}: {err}") from err
    return tokenizer, text_encoder.requires_grad_(False).eval()


def load_bundle(pretrained: str, revision: str | None = None) -> ModelBundle:
    """Load unet, vae, text_encoder, tokenizer and a DDIM scheduler from a diffusers layout.

    Every weight must match: missing, unexpected or mis-shaped keys raise ModelLoadError.
    """
    pretrained = resolve(pretrained)
    looks_local = os.path.isabs(pretrained) or pretrained.startswith(".") or Path(pretrained).exists()
    if looks_local and not Path(pretrained).is_dir():
        raise ModelLoadError(f"model.pretrained: {pretrained} is not a directory")
    kwargs = {"revision": revision} if revision else {}
    try:
        unet, info = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", output_loading_info=True,
                                                          **kwargs)
        check_loading_info("unet", pretrained, info)
        vae, info = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", output_loading_info=True, **kwargs)
        check_loading_info("vae", pretrained, info)
        tokenizer, text_encoder = load_clip_text_encoder(pretrained, revision)
        scheduler = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.pretrained: cannot load {pretrained!r}: {err}") from err
    if scheduler.config.thresholding:
        raise ModelLoadError("model.pretrained: DDIM dynamic thresholding is not supported by the log-prob sampler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return ModelBundle(unet, vae, text_encoder, tokenizer, scheduler)


# ---------------------------------------------------------------------------------------------
# Offline CLIP tokenizer and a tiny random bundle for tests and the CPU demo


def offline_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (same ids as openai/clip-vit-large-patch14), built from the
    vocabulary file that open_clip ships, so no download is needed."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): idx for token, idx in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def sd_ddim_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion v1.x's noise schedule."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


def save_bundle(out_dir: str | Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text_dim: int,
                text_layers: int, text_heads: int, text_mlp: int) -> Path:
    """Save random components (plus the offline CLIP tokenizer and SD's DDIM schedule) in diffusers layout."""
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=text_dim, intermediate_size=text_mlp,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
        projection_dim=text_dim, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_bundle(out_dir: str | Path, seed: int = 0, width: int = 32, attention_everywhere: bool = False) -> Path:
    """Write a random SD-architecture model (~2.5M parameters) in diffusers layout to `out_dir`.

    Same classes and file layout as SD v1.x (loadable by `load_bundle` and by a stock
    `StableDiffusionPipeline.from_pretrained`); VAE downsamples by 2, so 32 px images have 16 px latents.
    `attention_everywhere` puts cross-attention in every UNet block, not only the outer ones.
    """
    torch.manual_seed(seed)
    inner_down, inner_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_everywhere else \
        ("DownBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=min(32, width),
        down_block_types=("CrossAttnDownBlock2D", inner_down),
        up_block_types=(inner_up, "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=16, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    return save_bundle(out_dir, unet, vae, text_dim=32, text_layers=2, text_heads=4, text_mlp=64)


def build_sd_shaped_bundle(out_dir: str | Path, seed: int = 0) -> Path:
    """Random weights with Stable Diffusion v1.x's exact architecture (860M-parameter UNet, 768-d CLIP text
    encoder, 8x VAE): for GPU throughput checks where the real weights are not at hand."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    return save_bundle(out_dir, unet, vae, text_dim=768, text_layers=12, text_heads=12, text_mlp=3072)
