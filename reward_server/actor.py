"""RewardActor: the steering reward as a Ray actor whose requests share CLIP forwards."""

from __future__ import annotations

import time

import ray
import torch

from safediff.common.config import Config, resolve_device_dtype
from safediff.common.process import configure_process
from safediff.reward_server.batching import MicroBatcher
from safediff.reward_server.steering import DIAGNOSTICS, RewardOutput, SteeringReward

Request = tuple[torch.Tensor, list[str], list[bool | None] | None]


@ray.remote
class RewardActor:
    """Async actor: `score` calls from every rollout group are micro-batched (`reward.batch_max_images`,
    `reward.batch_max_wait_ms`) into one CLIP forward; results come back per request."""

    def __init__(self, cfg: Config):
        cfg = configure_process(cfg, cfg.cluster.cpus_per_reward_actor, cfg.cluster.gpus_per_reward_actor)
        self.reward = SteeringReward.from_config(cfg.reward, resolve_device_dtype(cfg.run)[0])
        self.batcher: MicroBatcher[Request, RewardOutput] = MicroBatcher(
            self._score_many, cfg.reward.batch_max_images, cfg.reward.batch_max_wait_ms / 1000)

    def _score_many(self, requests: list[Request]) -> list[RewardOutput]:
        start = time.perf_counter()
        images = torch.cat([r[0] for r in requests])
        prompts = [p for r in requests for p in r[1]]
        labels = None
        if all(r[2] is not None for r in requests):
            labels = [u for r in requests for u in r[2]]
        sizes = [r[0].shape[0] for r in requests]  # each request is one group
        out = self.reward(images, prompts, labels, groups=sizes)
        names = ("rewards", *DIAGNOSTICS)
        parts = [torch.split(t, sizes) if t is not None else [None] * len(sizes)
                 for t in (getattr(out, name) for name in names)]
        seconds = time.perf_counter() - start
        return [RewardOutput(**dict(zip(names, fields)), seconds=seconds) for fields in zip(*parts)]

    async def score(self, images: torch.Tensor, prompts: list[str],
                    unsafe: list[bool | None] | None = None) -> RewardOutput:
        """images uint8 [n, 3, H, W] (an ObjectRef argument is resolved by Ray in this process)."""
        return await self.batcher.submit((images, prompts, unsafe), size=images.shape[0])

    def batch_stats(self) -> dict[str, float]:
        s = self.batcher.stats
        return {"batches": s.batches, "requests": s.requests, "images": s.items,
                "mean_batch_images": s.mean_batch_items}
