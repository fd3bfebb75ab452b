"""The model-family contract: what a rollout and a learner ask of a text-to-image model, whatever its architecture.

Three families keep it:
    unet  `ModelBundle` (common/models.py): SD 1.x/2.x, a UNet denoiser sampled by DDIM with eta > 0
    sd3   `SD3Bundle` (common/flow_models.py): SD3/SD3.5, a transformer velocity model sampled by the flow SDE
    flux  `FluxBundle` (common/flow_models.py): FLUX.1, a transformer on packed latents, the same flow SDE
A sampler step of either is a Gaussian policy step x_next ~ N(mean, std^2 I) (common/sampling.py `GaussianStep`),
so GRPO, the reward, weight sync, staleness and checkpoints never ask which family they serve. `sample` is what a
rollout records; `step` is what the learner recomputes from the record, for samples at different trajectory
steps at once; on the policy that sampled, the two agree (tests check the log-probs to 1e-5).
"""

from __future__ import annotations

from typing import Protocol

import torch

from safediff.common.config import ModelConfig, SamplerConfig
from safediff.common.sampling import GaussianStep, SampledTrajectory
from safediff.common.types import TextEmbeds


class ModelFamily(Protocol):
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the adapter goes on (the UNet, the transformer)."""

    @property
    def vae_scale_factor(self) -> int: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a height x width image."""

    def to(self, device: str | torch.device, dtype: torch.dtype) -> ModelFamily: ...

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> TextEmbeds: ...

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] -> uint8 images [N, 3, H, W]."""

    def sample(self, cond: TextEmbeds, uncond: TextEmbeds, noise: torch.Tensor,
               sampler: SamplerConfig) -> SampledTrajectory:
        """Denoise noise[:, 0] with classifier-free guidance, step k drawing its noise from noise[:, k + 1]
        ([B, T+1, C, h, w]: the noise fully determines the result), recording every step's log-prob."""

    def denoising_loss(self, latents: torch.Tensor, cond: TextEmbeds, gen: torch.Generator,
                       guidance_scale: float = 1.0, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The family's training loss (epsilon / velocity / rectified-flow regression) of latents [B, C, h, w]
        under cond (B rows) at `timesteps` [B] in the model's units (drawn when None), noise from gen: what
        textual inversion and UnlearnDiff minimise."""

    def step(self, x_t: torch.Tensor, k: torch.Tensor, cond: TextEmbeds, uncond: TextEmbeds, sampler: SamplerConfig,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GaussianStep:
        """Step k [B] of samples x_t [B, C, h, w]: `prev_sample` scored (the learner), or drawn from `noise`."""


def load_model(model: ModelConfig) -> ModelFamily:
    """The bundle of `model.family`, loaded strictly from `model.pretrained`."""
    if model.family == "sd3":
        from safediff.common.flow_models import load_sd3_bundle

        return load_sd3_bundle(model.pretrained, model.revision, model.max_sequence_length)
    if model.family == "flux":
        from safediff.common.flow_models import load_flux_bundle

        return load_flux_bundle(model.pretrained, model.revision, model.max_sequence_length)
    from safediff.common.models import load_bundle

    return load_bundle(model.pretrained, model.revision)
