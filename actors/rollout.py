"""Rollout: turn prompt groups into trajectories with images and log-probs (pure; a Ray actor wraps it).

Contract: every group is generated whole by the policy version current at the call, which travels
with its trajectory; each sample's noise is `trajectory_noise(sample_seed(run, step, group, sample))`,
so the same group gives the same images on any worker, batch shape or restart.
"""

from __future__ import annotations

import torch

from safediff.common.config import SamplerConfig
from safediff.common.messages import PromptGroup
from safediff.common.policy import Policy
from safediff.common.seeds import sample_seed, trajectory_noise
from safediff.common.types import Trajectory


class Rollout:
    def __init__(self, policy: Policy, sampler: SamplerConfig, group_size: int, run_seed: int):
        self.policy, self.cfg, self.group_size, self.run_seed = policy, sampler, group_size, run_seed
        factor = policy.bundle.vae_scale_factor
        if sampler.height % factor or sampler.width % factor:
            raise ValueError(f"sampler.height/width ({sampler.height}x{sampler.width}) must be multiples of the "
                             f"VAE scale factor {factor}")
        self.latent_shape = policy.bundle.latent_shape(sampler.height, sampler.width)
        self.negative_embeds = policy.bundle.encode_prompts([sampler.negative_prompt]).map(torch.Tensor.float)

    def seeds(self, group: PromptGroup) -> tuple[int, ...]:
        return tuple(sample_seed(self.run_seed, group.step, group.group_index, i) for i in range(self.group_size))

    @torch.no_grad()
    def generate(self, groups: list[PromptGroup]) -> list[Trajectory]:
        """Sample G images per group, in denoiser batches of `sampler.batch_size` images."""
        G, cfg, bundle, device = self.group_size, self.cfg, self.policy.bundle, self.policy.device
        prompt_embeds = bundle.encode_prompts([g.prompt for g in groups]).map(torch.Tensor.float)
        seeds = [self.seeds(g) for g in groups]
        noise = torch.stack([trajectory_noise(s, cfg.num_steps, self.latent_shape) for ss in seeds for s in ss])
        cond = prompt_embeds.map(lambda x: x.repeat_interleave(G, dim=0))
        uncond = self.negative_embeds.to(device)
        parts, images = [], []
        for start in range(0, noise.shape[0], cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            with self.policy.autocast():
                part = bundle.sample(cond[sl].to(device), uncond, noise[sl], cfg)
            parts.append(part)
            images.append(bundle.decode_images(part.latents[:, -1]))
        latents = torch.cat([p.latents for p in parts]).cpu()
        log_probs = torch.cat([p.log_probs for p in parts]).cpu()
        images = torch.cat(images)
        # each group gets its own copies: a pickled slice would carry the whole batch's storage with it
        rows = [slice(i * G, (i + 1) * G) for i in range(len(groups))]
        return [
            Trajectory(group=g, latents=latents[r].clone(), log_probs=log_probs[r].clone(),
                       timesteps=parts[0].timesteps, prompt_embeds=prompt_embeds[i:i + 1].map(_own_copy),
                       negative_embeds=self.negative_embeds.to("cpu"), images=images[r].clone(),
                       seeds=seeds[i], policy_version=self.policy.version)
            for i, (g, r) in enumerate(zip(groups, rows))
        ]


def _own_copy(x: torch.Tensor) -> torch.Tensor:
    return x.cpu().clone()
