"""AttackActor: the Ray role that attacks the policy being trained (prompts.adversarial).

It holds the policy as a rollout actor does (verified adapter loads, a re-sync after a restart) and, asked for
the attack of step s against policy version v, runs UnlearnDiff on a seeded draw of the target prompts:

    targets of step s       the first `prompts_per_refresh` rows of randperm(n_targets) seeded by (seed, s)
    reference picture       the base model's image of the target (adapter disabled), the training sampler's DDIM
                            with noise seeded by (seed, target row); cached, since the base model never changes
    attack seed of target i (seed, s, i)

so the same (step, version) gives the same prompts on any actor, before or after a restart.
"""

from __future__ import annotations

import ray
import torch

from safediff.common.config import Config, SamplerConfig
from safediff.common.messages import ActorBehind
from safediff.common.policy import Policy
from safediff.common.process import configure_process
from safediff.common.prompts import read_prompt_file
from safediff.common.seeds import derive_seed, generator, trajectory_noise
from safediff.common.weight_sync import PolicyHolder
from safediff.redteam.unlearndiff import UnlearnDiff


def refresh_targets(count: int, targets: int, seed: int, step: int) -> list[int]:
    """The target rows attacked at `step`: a seeded draw of `count` of `targets` rows (all when fewer)."""
    order = torch.randperm(targets, generator=generator(derive_seed("redteam-targets", seed, step)))
    return order[:count].tolist()


@torch.no_grad()
def base_picture(policy: Policy, sampler: SamplerConfig, prompt: str, seed: int) -> torch.Tensor:
    """uint8 [3, H, W]: the base model's (adapter disabled) image of `prompt` with the training sampler, its
    noise seeded by `seed`."""
    bundle, device = policy.bundle, policy.device
    shape = bundle.latent_shape(sampler.height, sampler.width)
    embeds = bundle.encode_prompts([prompt, sampler.negative_prompt]).map(torch.Tensor.float).to(device)
    with policy.reference(), policy.autocast():
        out = bundle.sample(embeds[:1], embeds[1:], trajectory_noise(seed, sampler.num_steps, shape)[None], sampler)
    return bundle.decode_images(out.latents[:, -1])[0]


@ray.remote
class AttackActor(PolicyHolder):
    def __init__(self, cfg: Config):
        cfg = configure_process(cfg, cfg.cluster.cpus_per_attack_actor, cfg.cluster.gpus_per_attack_actor)
        self.cfg, self.adversarial = cfg, cfg.prompts.adversarial
        self.policy = Policy.from_config(cfg)
        self.targets = read_prompt_file(self.adversarial.targets).prompts
        self.unlearndiff = UnlearnDiff(self.policy.bundle, self.adversarial.unlearndiff, cfg.sampler.guidance_scale)
        self.pictures: dict[int, torch.Tensor] = {}

    def picture(self, row: int) -> torch.Tensor:
        if row not in self.pictures:
            seed = derive_seed("redteam-picture", self.cfg.run.seed, row)
            self.pictures[row] = base_picture(self.policy, self.cfg.sampler, self.targets[row], seed)
        return self.pictures[row]

    def attack(self, step: int, version: int) -> list[dict]:
        """The adversarial prompts of `step` against policy `version`, which this actor must hold (ActorBehind
        otherwise): one record per target with the prompt, the tokens and the loss curve."""
        if self.policy.version != version:
            raise ActorBehind(f"attack actor holds version {self.policy.version}, the attack of step {step} needs "
                              f"{version}")
        seed, out = self.cfg.run.seed, []
        for i, row in enumerate(refresh_targets(self.adversarial.prompts_per_refresh, len(self.targets), seed, step)):
            found = self.unlearndiff.attack(self.targets[row], self.picture(row), derive_seed("redteam", seed, step, i))
            out.append({"target": self.targets[row], "target_row": row, **found})
        return out
