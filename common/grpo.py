"""GRPO pieces as pure functions: group advantages, the PPO-clip loss, the KL penalty, the KL-controlled learning
rate, diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

# log-ratios are clamped before exp (as verl does): a far off-policy term gives a large finite ratio, never inf
LOG_RATIO_CLAMP = 20.0


def group_advantages(rewards: torch.Tensor, eps: float = 1e-8, clip: float = 2.5,
                     scale: Literal["group", "pooled"] = "group", sources: torch.Tensor | None = None) -> torch.Tensor:
    """A = clamp((r - mean_g) / (s_g + eps), -clip, clip) per group row of `rewards` [P, G], where

        s_g = std_g                                        scale="group" (the reference)
        s_g = sqrt(mean of std_h^2 over the step's groups h
                   from g's prompt source, `sources` [P])   scale="pooled" (sources=None: one pool)

    std is the unbiased (n - 1) standard deviation, as the reference; a group whose rewards are all
    equal gets A = 0 (it carries no signal). "group" blows a group's reward differences up to unit size
    however small they are, so a group whose images all show the same thing and differ only in what the
    reward barely sees pushes the policy as hard as one with a real difference. "pooled" keeps their size
    relative to the other groups of the same source, while each source keeps the share of the push its
    mixture weight gives it. Computed in float64 so tiny reward gaps survive.
    """
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=True, keepdim=True)
    if scale == "pooled":
        pool = torch.zeros(len(r), dtype=torch.long) if sources is None else sources.long()
        variance = std.squeeze(1).pow(2)
        pooled = torch.zeros_like(variance).index_add_(0, pool, variance)
        counts = torch.zeros_like(variance).index_add_(0, pool, torch.ones_like(variance))
        std = (pooled / counts.clamp(min=1)).sqrt()[pool].unsqueeze(1)
    return ((r - mean) / (std + eps)).clamp(-clip, clip).float()


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Share of groups whose rewards are all equal (they contribute no gradient)."""
    return float((rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean())


@dataclass
class PPOTerms:
    loss: torch.Tensor      # scalar: mean over the batch
    ratio: torch.Tensor     # [B] detached
    clipped: torch.Tensor   # [B] bool: |ratio - 1| > clip_range
    approx_kl: torch.Tensor  # scalar detached: 0.5 * mean((logp_new - logp_old)^2)


def ppo_clip_loss(advantages: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                  clip_range: float, weights: torch.Tensor | None = None) -> PPOTerms:
    """loss = mean( w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ) over the batch [B], with
    ratio = exp(clamp(logp - logp_old, -20, 20)) and w = 1 (`weights` None) or the decoupled objective's behaviour
    weights [B] (`behaviour_weights`; logp_old is then the proximal policy's)."""
    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
    diff = (log_prob - old_log_prob).detach()
    return PPOTerms(loss=loss, ratio=ratio.detach(), clipped=(ratio.detach() - 1).abs() > clip_range,
                    approx_kl=0.5 * (diff**2).mean())


def behaviour_weights(prox_log_prob: torch.Tensor, behav_log_prob: torch.Tensor, cap: float,
                      max_log_ratio: float | None = None) -> torch.Tensor:
    """The decoupled objective's truncated importance weights [B] (AReaL's decoupled PPO):

        w = min(pi_prox / pi_behav, cap) = exp(min(logp_prox - logp_behav, log cap)),
        w = 0 where |logp_prox - logp_behav| > max_log_ratio (when given)

    pi_behav generated the step (its log-probs were recorded at rollout), pi_prox is the learner's policy at the
    start of the step; PPO then clips pi_theta / pi_prox, so a stale group is trusted as far as the policy it was
    drawn from is close to the one being improved, and the clip bounds each update's move from the latter.
    Truncated at `cap` (AReaL instead drops the terms above its cap). `max_log_ratio` drops the terms whose
    behaviour policy lies outside that distance of pi_prox, on either side: for a Gaussian step the score of a
    stale sample, (x - mean_theta) / std^2, carries besides its noise (mean_behav - mean_theta) / std^2, a term the
    size of the policy's last moves over the step's variance, which neither w nor the clip bounds.
    No gradient flows through w."""
    log_ratio = prox_log_prob - behav_log_prob
    weights = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, math.log(cap)))
    if max_log_ratio is not None:
        weights = torch.where(log_ratio.abs() > max_log_ratio, torch.zeros_like(weights), weights)
    return weights.detach()


# the KL-controlled learning rate: how fast the rate may recover per step, and how far below its ceiling it may go
LR_GROWTH_MAX = 1.5
LR_FLOOR_FRACTION = 0.01


def kl_controlled_lr(lr: float, approx_kl: float, target_kl: float, max_lr: float) -> float:
    """The next step's learning rate from this step's approx_kl (a KL-controlled step size, after rl_games'
    adaptive schedule, but proportional rather than by a fixed factor):

        lr' = clamp(lr * min(sqrt(target_kl / approx_kl), 1.5), max_lr / 100, max_lr)    (approx_kl = 0: lr * 1.5)

    For small moves KL ~ 1/2 dtheta^T F dtheta grows with lr^2, so lr * sqrt(target / kl) is the rate that would
    have met the target on this step. Why: a step's first update is never clipped (pi_theta = pi_old there), so
    only the rate bounds how far it moves the policy. The rate shrinks at once after a step that overshoots,
    recovers by at most 1.5x per step, and never exceeds the configured rate (`max_lr`). It reacts one step late:
    on the world it halved the step after a runaway began but could not stop the step that began it
    (docs/world.md, "Five seeds at staleness 1")."""
    factor = LR_GROWTH_MAX if approx_kl <= 0 else min(math.sqrt(target_kl / approx_kl), LR_GROWTH_MAX)
    return min(max(lr * factor, max_lr * LR_FLOOR_FRACTION), max_lr)


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, s^2) || N(ref_mean, s^2)) = |mean - ref_mean|^2 / (2 s^2), averaged over latent
    dimensions like the log-probs; returns [B]."""
    per_dim = (mean - ref_mean) ** 2 / (2 * std**2)
    return per_dim.mean(dim=tuple(range(1, mean.ndim)))
