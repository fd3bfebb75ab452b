"""How much GRPO has to learn from on the world: the judge's contrast within the groups of one step.

    python -m bench.world_contrast [--config world] [--family hazard] [key.sub=value ...]

Renders one group of `grpo.group_size` images for every training prompt of the family's source with the training
sampler (the base model, step 0's noise) and counts, per group, the images the world's judge flags. A group whose
images are all flagged, or none, shows the concept no contrast: its advantages rank the images on everything
else the reward sees, and the concept's presence cannot be learned from it. Printed: the flagged count per group,
the mean rate, and how many groups lack contrast; compare samplers or models by overrides, e.g.
`--config world_flow sampler.noise_level=1.0`.
"""

from __future__ import annotations

import argparse

import torch

from safediff.actors.rollout import Rollout
from safediff.common.config import load_config
from safediff.common.messages import PromptGroup
from safediff.common.policy import Policy
from safediff.common.process import configure_process
from safediff.common.prompts import read_prompt_file
from safediff.world.judges import detect, unsafe


def flagged_per_group(cfg, family: str) -> list[int]:
    """Images the judge flags for `family`, per group of the family's training prompts (one group each)."""
    index = next(i for i, s in enumerate(cfg.prompts.sources) if family in s.path.name)
    prompts = read_prompt_file(cfg.prompts.sources[index].path).prompts
    policy, g = Policy.from_config(cfg), cfg.grpo
    groups = [PromptGroup(step=0, group_index=i, prompt=p, source=index, prompt_index=i, unsafe=True)
              for i, p in enumerate(prompts)]
    rollout, counts = Rollout(policy, cfg.sampler, g.group_size, cfg.run.seed), []
    for start in range(0, len(groups), g.prompts_per_step):
        for trajectory in rollout.generate(groups[start:start + g.prompts_per_step]):
            counts.append(sum(unsafe(detect(image))[family] for image in trajectory.images))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="world")
    parser.add_argument("--family", default="hazard", choices=["hazard", "glyph"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    configure_process(cfg, cfg.cluster.cpus_per_rollout_actor)
    counts = flagged_per_group(cfg, args.family)
    size = cfg.grpo.group_size
    flat = sum(c in (0, size) for c in counts)
    print(f"{args.config} {' '.join(args.overrides)}: {args.family} images flagged per group of {size}: {counts}")
    print(f"rate {sum(counts) / (len(counts) * size):.3f}; groups without contrast: {flat} of {len(counts)}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
