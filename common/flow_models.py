"""The flow-matching model families: SD3- and FLUX.1-architecture bundles, loaded strictly, sampled with the flow SDE.

`load_sd3_bundle` and `load_flux_bundle` read a diffusers `StableDiffusion3Pipeline` / `FluxPipeline` directory with
the same `from_pretrained` calls a real SD3 / SD3.5 / FLUX.1 checkpoint goes through, and refuse any component whose
keys do not match its architecture, as `load_bundle` does for SD v1.x. Prompts are encoded by the stock pipeline's
own `encode_prompt` (SD3: CLIP-L and CLIP-G penultimate states side by side, then T5's states, or zeros where the
checkpoint has no T5; FLUX: T5's states and CLIP-L's pooled embedding), so the conditioning is the stock pipeline's
by construction. `SD3Bundle` and `FluxBundle` keep the model-family contract (common/family.py) with the stochastic
flow sampler of common/flow_sde.py. `build_tiny_sd3_bundle` and `build_tiny_flux_bundle` write random models of the
very same classes for tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from safediff.common.assets import resolve
from safediff.common.config import SamplerConfig
from safediff.common.flow_sde import (
    Predict,
    Velocity,
    flow_matching_loss,
    flow_step_with_logprob,
    guided_velocity,
    sample_flow_with_logprob,
)
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
class FlowBundle(ABC):
    """What the flow families share: a stock diffusers pipeline that holds every component (and encodes prompts as
    the stock pipeline does), its scheduler's schedule, and the stochastic flow sampler of common/flow_sde.py. A
    family adds `latent_shape`, its prompt encoding (`_encode`) and its transformer call (`predictor`), and may
    change `schedule`."""

    pipeline: DiffusionPipeline
    max_sequence_length: int = 256  # T5 tokens per prompt

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
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

    def to(self, device: str | torch.device, dtype: torch.dtype) -> FlowBundle:
        move_modules([m for m in self.pipeline.components.values() if isinstance(m, torch.nn.Module)], device, dtype)
        return self

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] -> uint8 images [N, 3, H, W]."""
        return decode_images(self.vae, latents)

    def schedule(self, num_steps: int, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [T] in the model's units, sigma * 1000; sigmas [T+1], ending at 0) of a T-step sampling of
        latents latent_hw in size: the scheduler's own."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps, self.scheduler.sigmas

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a height x width image."""

    @abstractmethod
    def _encode(self, prompts: list[str]) -> TextEmbeds:
        """Text states [N, L, D] and pooled embeddings [N, P] of `prompts`, as the stock pipeline encodes them."""

    @abstractmethod
    def predictor(self, guidance_scale: float) -> Predict:
        """The transformer's unguided velocity `(x, t, states, pooled) -> v` for latents x [B, C, h, w] at timesteps
        t [B] (sigma * 1000); a transformer with a guidance input (FLUX.1-dev) gets `guidance_scale` there."""

    @property
    def guidance_embedded(self) -> bool:
        """Whether guidance is an input of the transformer (one forward) rather than true classifier-free guidance."""
        return False

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> TextEmbeds:
        """Text states [N, L, D] and pooled embeddings [N, P] of `prompts`, as the stock pipeline encodes them.
        grad: keep the graph to the text encoders' weights that require it (the inversion attack's new token)."""
        with torch.set_grad_enabled(grad):
            return self._encode(prompts)

    def velocity(self, cond: TextEmbeds, uncond: TextEmbeds, guidance_scale: float) -> Velocity:
        """The guided velocity prediction `(x, t) -> v` for the prompts `cond` (uncond: the unconditional row)."""
        predict = self.predictor(guidance_scale)
        if self.guidance_embedded:
            return lambda x, t: predict(x, t, cond.states, cond.pooled)
        return lambda x, t: guided_velocity(predict, x, t, cond.states, cond.pooled, uncond.states, uncond.pooled,
                                            guidance_scale)

    def denoising_loss(self, latents: torch.Tensor, cond: TextEmbeds, gen: torch.Generator,
                       guidance_scale: float = 1.0, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The model's training loss on `latents` [B, C, h, w] under `cond` (B rows): rectified flow
        (common/flow_sde.py `flow_matching_loss`) on the conditional prediction, in fp32, at `timesteps` [B]
        (sigma * 1000) or else at drawn noise levels."""
        predict = self.predictor(guidance_scale)
        sigmas = None if timesteps is None else timesteps.float() / 1000
        return flow_matching_loss(lambda x, t: predict(x, t, cond.states, cond.pooled), latents, gen, sigmas)

    def sample(self, cond: TextEmbeds, uncond: TextEmbeds, noise: torch.Tensor,
               sampler: SamplerConfig) -> SampledTrajectory:
        """The flow SDE (or CPS) from `noise` [B, T+1, C, h, w] (common/flow_sde.py `sample_flow_with_logprob`)."""
        timesteps, sigmas = self.schedule(sampler.num_steps, tuple(noise.shape[-2:]))
        return sample_flow_with_logprob(self.velocity(cond, uncond, sampler.guidance_scale), timesteps, sigmas, noise,
                                        sampler.noise_level, sampler.sde_kind, self.transformer.device)

    def step(self, x_t: torch.Tensor, k: torch.Tensor, cond: TextEmbeds, uncond: TextEmbeds, sampler: SamplerConfig,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GaussianStep:
        """The stochastic flow step of samples `x_t` [B, C, h, w], each at its own trajectory step `k` [B]:
        `prev_sample` scored, or drawn from `noise`."""
        timesteps, sigmas = self.schedule(sampler.num_steps, tuple(x_t.shape[-2:]))
        device, k = x_t.device, k.to(x_t.device)
        sigmas = sigmas.to(device, torch.float32)
        v = self.velocity(cond, uncond, sampler.guidance_scale)(x_t, timesteps.to(device)[k])
        return flow_step_with_logprob(v, x_t, sigmas[k], sigmas[k + 1], sampler.noise_level, sampler.sde_kind,
                                      sigma_max=sigmas[1], prev_sample=prev_sample, noise=noise)


class SD3Bundle(FlowBundle):
    """SD3 / SD3.5: true classifier-free guidance, CLIP-L, CLIP-G and (optionally) T5 text states."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the transformer's latents for a height x width image."""
        factor = self.vae_scale_factor
        return self.transformer.config.in_channels, height // factor, width // factor

    def _encode(self, prompts: list[str]) -> TextEmbeds:
        """Joint text states [N, L, D] and pooled text embeddings [N, P], as SD3 conditions on them; the empty
        prompt gives the unconditional pair of SD3's classifier-free guidance."""
        states, _, pooled, _ = self.pipeline.encode_prompt(prompts, None, None, device=self.transformer.device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        return TextEmbeds(states, pooled)

    def predictor(self, guidance_scale: float) -> Predict:
        transformer = self.transformer

        def predict(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
            dtype = transformer.dtype
            return transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=states.to(dtype),
                               pooled_projections=pooled.to(dtype), return_dict=False)[0]

        return predict


class FluxBundle(FlowBundle):
    """FLUX.1: latents packed in 2 x 2 patches with rotary position ids, CLIP's pooled embedding and T5's states,
    a resolution-dependent schedule shift; FLUX.1-dev's guidance is an input of the transformer (one forward, no
    unconditional branch), a transformer without that embedding gets true classifier-free guidance."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latents for a height x width image (h, w even: 2 x 2 patches)."""
        factor = self.vae_scale_factor * 2
        return self.transformer.config.in_channels // 4, 2 * (height // factor), 2 * (width // factor)

    def _encode(self, prompts: list[str]) -> TextEmbeds:
        """T5 states [N, L, D] and CLIP's pooled embedding [N, P], as the stock FluxPipeline encodes them."""
        states, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.transformer.device,
                                                        max_sequence_length=self.max_sequence_length)
        return TextEmbeds(states, pooled)

    def schedule(self, num_steps: int, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock FluxPipeline's: sigmas linspace(1, 1/T, T), shifted by mu, which grows with the number of
        packed image tokens (calculate_shift) when the scheduler shifts dynamically."""
        config = self.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift((latent_hw[0] // 2) * (latent_hw[1] // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if sigmas is None:
            self.scheduler.set_timesteps(num_steps, mu=mu)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return self.scheduler.timesteps, self.scheduler.sigmas

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def predictor(self, guidance_scale: float) -> Predict:
        transformer, factor = self.transformer, self.vae_scale_factor

        def predict(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
            """The transformer's velocity [B, C, h, w] for latents x [B, C, h, w] at timesteps t [B], packed and
            unpacked by the stock pipeline's own functions."""
            B, C, h, w = x.shape
            dtype = transformer.dtype
            guidance = (torch.full([B], guidance_scale, device=x.device, dtype=torch.float32)
                        if transformer.config.guidance_embeds else None)
            out = transformer(hidden_states=FluxPipeline._pack_latents(x, B, C, h, w).to(dtype),
                              timestep=(t / 1000).to(dtype), guidance=guidance,
                              pooled_projections=pooled.expand(B, -1).to(dtype),
                              encoder_hidden_states=states.expand(B, -1, -1).to(dtype),
                              txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=dtype),
                              img_ids=FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x.device, dtype),
                              return_dict=False)[0]
            return FluxPipeline._unpack_latents(out.float(), h * factor, w * factor, factor)

        return predict


def _load_pipeline(pipeline_class: type, pretrained: str, revision: str | None, modules: dict[str, type],
                   tokenizers: dict[str, type], optional: tuple[str, ...] = ()) -> DiffusionPipeline:
    """A pipeline directory's components, loaded strictly: every weight of every module must match its architecture
    (ModelLoadError otherwise). A module (and its tokenizer) in `optional` may be absent, as diffusers allows."""
    pretrained = resolve(pretrained)
    if not Path(pretrained).is_dir():
        raise ModelLoadError(f"model.pretrained: {pretrained} is not a directory")
    kwargs = {"revision": revision} if revision else {}
    loaded = {}
    try:
        for name, cls in modules.items():
            if name in optional and not (Path(pretrained) / name).is_dir():
                loaded[name], loaded[name.replace("text_encoder", "tokenizer")] = None, None
                continue
            module, info = cls.from_pretrained(pretrained, subfolder=name, output_loading_info=True, **kwargs)
            check_loading_info(name, pretrained, info)
            loaded[name] = module.requires_grad_(False).eval()
        for name, cls in tokenizers.items():
            if name not in loaded:
                loaded[name] = cls.from_pretrained(pretrained, subfolder=name, **kwargs)
        loaded["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler",
                                                                              **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.pretrained: cannot load {pretrained!r}: {err}") from err
    return pipeline_class(**loaded)


def load_sd3_bundle(pretrained: str, revision: str | None = None, max_sequence_length: int = 256) -> SD3Bundle:
    """Load an SD3 pipeline directory strictly; text_encoder_3 (T5) may be absent, as diffusers allows."""
    pipeline = _load_pipeline(
        StableDiffusion3Pipeline, pretrained, revision,
        {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection,
         "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel},
        {"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "tokenizer_3": T5TokenizerFast},
        optional=("text_encoder_3",))
    return SD3Bundle(pipeline, max_sequence_length)


def load_flux_bundle(pretrained: str, revision: str | None = None, max_sequence_length: int = 512) -> FluxBundle:
    """Load a FLUX.1 pipeline directory strictly (CLIP-L and T5 both required, as FluxPipeline needs them)."""
    pipeline = _load_pipeline(
        FluxPipeline, pretrained, revision,
        {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
         "text_encoder_2": T5EncoderModel},
        {"tokenizer": CLIPTokenizer, "tokenizer_2": T5TokenizerFast})
    return FluxBundle(pipeline, max_sequence_length)


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


def offline_t5_tokenizer(words: list[str]) -> T5TokenizerFast:
    """A T5-style SentencePiece-unigram tokenizer over `words` and the single letters (for tiny test models: the real
    T5 vocabulary cannot be had offline). Ids 0, 1, 2 are pad, end of sequence and unknown, as in T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(words))] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)


def build_tiny_flux_bundle(out_dir: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A random FLUX.1-architecture pipeline small enough for CPU tests (`guidance_embeds`: FLUX.1-dev's guidance
    input; False: a transformer sampled with true classifier-free guidance), in the diffusers layout."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, shift_factor=0.1, scaling_factor=0.5)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77)).eval()
    t5_tokenizer = offline_t5_tokenizer("a an the red green blue yellow magenta square circle triangle cross "
                                        "crosses squares circles triangles two three and".split())
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    pipeline = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip,
                            tokenizer=offline_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    out = Path(out_dir)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out
