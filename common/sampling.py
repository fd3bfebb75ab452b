"""DDIM sampling that records log-probabilities (DDPO-style, eta > 0).

With eta > 0 each DDIM step t -> t_prev is a Gaussian policy step,
    x_prev ~ N(mu_theta(x_t, t), sigma_t^2 I),
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev),
so the sampler can record log p_theta(x_prev | x_t) and the learner can recompute it from the stored
trajectory. The mean equals what diffusers' `DDIMScheduler.step` computes (tests check this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class GaussianStep:
    """One step of a sampler taken as a Gaussian policy, x_prev ~ N(mean, std^2 I)."""

    prev_sample: torch.Tensor  # [B, C, h, w] fp32
    log_prob: torch.Tensor     # [B] fp32, mean over latent dimensions
    mean: torch.Tensor         # [B, C, h, w] fp32: mu_theta
    std: torch.Tensor          # [B, 1, 1, 1] fp32


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] values as [B, 1, ..., 1], to broadcast against a batch shaped like `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    num_inference_steps: int,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> GaussianStep:
    """One DDIM step with the Gaussian log-density of its result.

    `timestep` is [B] (samples may sit at different steps, as in training). When `prev_sample`
    is given (the learner re-scoring a stored trajectory) it is scored, not drawn; otherwise
    x_prev = mean + sigma * noise. All math runs in fp32 whatever the UNet's dtype.
    """
    cfg = scheduler.config
    model_output, sample = model_output.float(), sample.float()
    timestep = timestep.to(sample.device).long()
    prev_timestep = timestep - cfg.num_train_timesteps // num_inference_steps

    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device, torch.float32)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=sample.device)
    a_t = per_sample(alphas_cumprod[timestep], sample)
    a_prev = per_sample(torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final), sample)
    b_t = 1 - a_t

    if cfg.prediction_type == "epsilon":
        x0 = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r} (epsilon or v_prediction)")
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)  # eps kept, as diffusers' default

    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return gaussian_step(mean, std, prev_sample, noise)


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, prev_sample: torch.Tensor | None,
                  noise: torch.Tensor | None) -> GaussianStep:
    """The step x_prev ~ N(mean, std^2 I): `prev_sample` scored when given (the learner re-scoring a stored
    trajectory), else drawn as mean + std * noise; with its log-density."""
    if prev_sample is None:
        if noise is None:
            raise ValueError("either prev_sample or noise is required")
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.float()
    return GaussianStep(prev_sample=prev_sample, log_prob=gaussian_log_prob(prev_sample, mean, std), mean=mean,
                        std=std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged (not summed) over all but the batch dimension, as the reference."""
    log_density = -((x - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def guided_noise_prediction(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: uncond + g * (cond - uncond), one UNet call on [uncond; cond].

    `timestep` is [B]; `cond` is [B, L, D]; `uncond` is [1, L, D] or [B, L, D]."""
    batch = latents.shape[0]
    x = torch.cat([latents, latents]).to(unet.dtype)
    t = torch.cat([timestep, timestep])
    context = torch.cat([uncond.expand(batch, -1, -1), cond]).to(unet.dtype)
    out_uncond, out_cond = unet(x, t, encoder_hidden_states=context).sample.float().chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


@dataclass
class SampledTrajectory:
    latents: torch.Tensor     # [B, T+1, C, h, w] fp32: x_T ... x_0
    log_probs: torch.Tensor   # [B, T] fp32
    timesteps: torch.Tensor   # [T]: DDIM timesteps (long), or a flow schedule's sigma * 1000 (float)


@torch.no_grad()
def sample_with_logprob(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    eta: float,
) -> SampledTrajectory:
    """Denoise `noise[:, 0]` (the initial latents) for `num_steps` DDIM steps, drawing step k's
    noise from `noise[:, k + 1]`; noise is [B, T+1, C, h, w] and fully determines the result."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.clone()
    device = unet.device
    x = noise[:, 0].to(device, torch.float32) * scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for k, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = guided_noise_prediction(unet, x, t_batch, cond, uncond, guidance_scale)
        step = ddim_step_with_logprob(scheduler, eps, t_batch, x, num_steps, eta, noise=noise[:, k + 1].to(device))
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
    return SampledTrajectory(torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), timesteps.cpu())
