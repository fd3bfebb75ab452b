"""Stochastic sampling of flow-matching models (SD3, FLUX) with log-probabilities (Flow-GRPO's formulation).

A rectified-flow model predicts the velocity v = eps - x0 of the path x_sigma = (1 - sigma) x0 + sigma eps,
and its sampler integrates the ODE dx = v dsigma from sigma = 1 to 0 (diffusers'
`FlowMatchEulerDiscreteScheduler.step`: x_next = x + (sigma_next - sigma) v). An ODE step has no density, so
GRPO cannot take its probability ratio. Two stochastic samplers with the same marginals as the ODE make every
step a Gaussian policy step x_next ~ N(mean, std^2 I), whose log-density the rollout records and the learner
recomputes from the stored trajectory, as for DDIM with eta > 0 (common/sampling.py):

- "sde" (Flow-GRPO, Liu et al. 2025): the reverse-time SDE
      dx = [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dsigma + s dw,   s = a sqrt(sigma / (1 - sigma)),
  taken as one Euler-Maruyama step with dt = sigma_next - sigma < 0:
      mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,   std = s sqrt(-dt).
  (x + (1 - sigma) v is the model's estimate of eps, so the drift adds the score -eps / sigma scaled by s^2 / 2.)
  At sigma = 1, s would be infinite; there the denominator uses the first step below 1 (`sigma_max`), as
  Flow-GRPO does.
- "cps" (coefficients-preserving sampling, Wang et al. 2025): from the model's estimates x0 = x - sigma v and
  eps = x + (1 - sigma) v,
      mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) eps,   std = sigma_next sin(a pi / 2),
  so the sample keeps exactly the noise level sigma_next of the path (the "sde" step adds slightly more noise than
  the path has, which shows as noisy images at large a). Its last step (sigma_next = 0) is deterministic and has
  no log-probability.

`a` is the noise level (`noise_level`); with a = 0 both are the Euler ODE step. The math runs in fp32 whatever the
model's dtype, and the log-density is averaged over latent dimensions like the DDIM path's, so the clip range
and KL coefficient mean the same for both families.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from safediff.common.sampling import GaussianStep, SampledTrajectory, gaussian_step, per_sample

SDEKind = Literal["sde", "cps"]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, C, h, w], timesteps [B]) -> v, fp32
# a transformer's prediction (x [B, C, h, w], timesteps [B], text states [B, L, D], pooled [B, P]) -> [B, C, h, w]
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sde_mean_std(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 noise_level: float, sigma_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's Euler-Maruyama step of the reverse SDE: (mean [B, C, h, w], std [B, 1, 1, 1]).
    `sigma`, `sigma_next`, `sigma_max` are [B, 1, 1, 1]."""
    dt = sigma_next - sigma
    s = noise_level * (sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))).sqrt()
    mean = sample * (1 + s**2 / (2 * sigma) * dt) + velocity * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * (-dt).sqrt()


def cps_mean_std(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients-preserving step: (mean [B, C, h, w], std [B, 1, 1, 1])."""
    x0 = sample - sigma * velocity
    eps = sample + (1 - sigma) * velocity
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - sigma_next) * x0 + (sigma_next**2 - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def flow_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    kind: SDEKind = "sde",
    sigma_max: torch.Tensor | float | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> GaussianStep:
    """One stochastic flow-matching step sigma -> sigma_next with the Gaussian log-density of its result.

    `sigma` and `sigma_next` are [B] (samples may sit at different steps, as in training); `sigma_max` is the
    schedule's first sigma below 1 ("sde" only; needed when a sample sits at sigma 1). When `prev_sample` is given
    (the learner re-scoring a stored trajectory) it is scored, not drawn; otherwise x_next = mean + std * noise.
    With noise_level 0 (the ODE step, which has no density) log_prob is NaN."""
    velocity, sample = velocity.float(), sample.float()
    sigma = per_sample(sigma.to(sample.device, torch.float32), sample)
    sigma_next = per_sample(sigma_next.to(sample.device, torch.float32), sample)
    if kind == "sde":
        if sigma_max is None and bool((sigma == 1).any()):
            raise ValueError("the SDE step from sigma 1 needs sigma_max, the schedule's first sigma below 1")
        top = torch.as_tensor(sigma_max if sigma_max is not None else 0.0, dtype=torch.float32, device=sample.device)
        mean, std = sde_mean_std(sample, velocity, sigma, sigma_next, noise_level, top.expand_as(sigma))
    elif kind == "cps":
        mean, std = cps_mean_std(sample, velocity, sigma, sigma_next, noise_level)
    else:
        raise ValueError(f"unknown SDE kind {kind!r} (sde or cps)")
    if noise_level > 0 and bool((std == 0).any()):
        raise ValueError("a step with std 0 has no log-probability (CPS's last step, to sigma 0): train on the steps "
                         "before it")
    step = gaussian_step(mean, std, prev_sample, noise)
    if noise_level == 0:  # the ODE step: N(mean, 0) has no density
        step.log_prob = torch.full_like(step.log_prob, float("nan"))
    return step


def guided_velocity(predict: Predict, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                    pooled: torch.Tensor, uncond: torch.Tensor, uncond_pooled: torch.Tensor,
                    guidance_scale: float) -> torch.Tensor:
    """True classifier-free guidance (SD3's, and FLUX's without a guidance input): uncond + g * (cond - uncond), one
    `predict` call on [uncond; cond].

    `timestep` is [B] in the scheduler's units (sigma * 1000); `cond` [B, L, D] and `pooled` [B, P] are the text
    states and pooled text embedding; `uncond`, `uncond_pooled` are [1, ...] or [B, ...]."""
    batch = latents.shape[0]
    out = predict(torch.cat([latents, latents]), torch.cat([timestep, timestep]),
                  torch.cat([uncond.expand(batch, -1, -1), cond]), torch.cat([uncond_pooled.expand(batch, -1), pooled]))
    out_uncond, out_cond = out.float().chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def logit_normal_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n] noise levels sigma = sigmoid(u), u ~ N(0, 1): SD3's training distribution, which puts most samples at
    mid noise, where the velocity is hardest to predict."""
    return torch.sigmoid(torch.randn(n, generator=gen))


def flow_matching_loss(velocity: Velocity, latents: torch.Tensor, gen: torch.Generator,
                       sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """The rectified-flow training loss of `latents` [B, C, h, w] (x0), in fp32:

        E | v(x_sigma, 1000 sigma) - (eps - x0) |^2,   x_sigma = (1 - sigma) x0 + sigma eps,

    eps ~ N(0, I) from `gen`, sigma [B] given or else logit-normal (`logit_normal_sigmas`) from `gen` after eps;
    `velocity` is the model's conditional prediction (no guidance mixing)."""
    x0 = latents.float()
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    sigma = (logit_normal_sigmas(len(x0), gen) if sigmas is None else sigmas).to(x0.device)
    s = sigma[:, None, None, None]
    return F.mse_loss(velocity((1 - s) * x0 + s * noise, sigma * 1000).float(), noise - x0)


@torch.no_grad()
def sample_flow_with_logprob(velocity: Velocity, timesteps: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor,
                             noise_level: float, kind: SDEKind = "sde",
                             device: str | torch.device = "cpu") -> SampledTrajectory:
    """Integrate from `noise[:, 0]` (the initial latents, sigma 1) along the schedule `timesteps` [T] (the model's
    units) and `sigmas` [T+1] (a family's `schedule`), drawing step k's noise from `noise[:, k + 1]`; noise is
    [B, T+1, C, h, w] and fully determines the result. `velocity(x, t)` is the family's guided prediction for
    latents x [B, C, h, w] at timesteps t [B]. CPS's last step, to sigma 0, is taken without noise and recorded with
    log-prob NaN: it has no density and is not a trainable step."""
    sigmas = sigmas.to(torch.float32)
    x = noise[:, 0].to(device, torch.float32)
    latents, log_probs = [x], []
    for k, t in enumerate(timesteps):
        v = velocity(x, t.expand(x.shape[0]).to(device))
        level = 0.0 if kind == "cps" and sigmas[k + 1] == 0 else noise_level
        step = flow_step_with_logprob(v, x, sigmas[k].expand(x.shape[0]), sigmas[k + 1].expand(x.shape[0]), level,
                                      kind, sigma_max=sigmas[1], noise=noise[:, k + 1].to(device))
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
    return SampledTrajectory(torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), timesteps.cpu())
