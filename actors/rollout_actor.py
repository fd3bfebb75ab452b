"""RolloutActor: a Ray actor per inference device holding the policy (bundle + adapter).

Calls on one actor run in the order they were sent, so an adapter update sent before a `generate`
call is in place when that call starts, and every group is generated whole by one policy version.
"""

from __future__ import annotations

import dataclasses
import time

import ray

from safediff.actors.render import pipeline, render_chunk
from safediff.actors.rollout import Rollout
from safediff.common.config import Config, SuiteConfig
from safediff.common.messages import ActorBehind, PromptGroup
from safediff.common.policy import Policy
from safediff.common.process import configure_process, peak_memory
from safediff.common.types import EvalRow
from safediff.common.weight_sync import PolicyHolder


@ray.remote
class RolloutActor(PolicyHolder):
    def __init__(self, cfg: Config):
        cfg = configure_process(cfg, cfg.cluster.cpus_per_rollout_actor, cfg.cluster.gpus_per_rollout_actor)
        self.cfg, self.pipe = cfg, None
        self.policy = Policy.from_config(cfg)
        self.rollout = Rollout(self.policy, cfg.sampler, cfg.grpo.group_size, cfg.run.seed)

    def generate(self, groups: list[PromptGroup], min_version: int = 0) -> tuple:
        """Three objects per group, in order, for the caller to split (call with `num_returns=3 * len(groups)`):
        the trajectory without images (for the learner), the images uint8 [G, 3, H, W] (for the reward actor, by
        reference) and a small info dict (for the controller; `generate_s` is the group's share of the call). The
        groups share UNet batches of `sampler.batch_size` images. Refuses (ActorBehind) when holding a policy
        older than `min_version`, the version the controller last sent."""
        if self.policy.version < min_version:
            raise ActorBehind(f"actor holds version {self.policy.version}, the groups need >= {min_version}")
        start = time.perf_counter()
        trajectories = self.rollout.generate(groups)
        share = (time.perf_counter() - start) / len(groups)
        out = []
        for trajectory in trajectories:
            info = {"policy_version": trajectory.policy_version, "generate_s": share, **peak_memory(self.policy.device)}
            out += [dataclasses.replace(trajectory, images=None), trajectory.images, info]
        return tuple(out)

    def render(self, rows: list[EvalRow], min_version: int = 0, suite: SuiteConfig | None = None,
               images_per_prompt: int | None = None) -> list[tuple[str, bytes]]:
        """Evaluation images of a chunk of rows (actors/render.py) with the policy held now, through a
        stock diffusers pipeline over the same modules; refuses (ActorBehind) below `min_version`. `suite` and
        `images_per_prompt` replace evaluation.suite's (the scheduler stays the evaluation suite's)."""
        if self.policy.version < min_version:
            raise ActorBehind(f"actor holds version {self.policy.version}, the evaluation needs {min_version}")
        if self.pipe is None:
            self.pipe = pipeline(self.policy, self.cfg.evaluation.suite.scheduler)
        suite = suite or self.cfg.evaluation.suite
        return render_chunk(self.pipe, rows, images_per_prompt or suite.images_per_prompt, self.cfg.sampler, suite)
