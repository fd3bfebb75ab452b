"""Reward actor micro-batching vs one CLIP forward per image.

    python -m bench.reward_batching [--images 256] [--arch world|tiny|ViT-B-32]

Sends `--images` single-image `score` requests concurrently (as rollout groups from many actors do)
to a RewardActor with micro-batching (batch_max_images=64) and to one with batching off
(batch_max_images=1); prints images/s for each and the ratio, and the rate of the same calls to an actor that
does no work (Ray's per-request cost: the ratio no batching can pass), and the same scoring in one process without
Ray (one image per call against batches of 64, on the actor's threads): what batching saves in arithmetic alone.
`--arch world` is the world's trained CLIP and reward settings at the world's 32 px (`deploy/configs/world.yaml`);
`tiny` the CPU demo's model; `ViT-B-32` that open_clip architecture with random weights at 224 px (a realistic
per-image cost).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import open_clip  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from bench.fixtures import MODELS, demo_config  # noqa: E402
from safediff.common.config import Config, load_config  # noqa: E402
from safediff.reward_server.actor import RewardActor  # noqa: E402
from safediff.reward_server.clip_model import build_tiny_clip  # noqa: E402
from safediff.reward_server.steering import SteeringReward  # noqa: E402


def clip_dir(arch: str) -> str:
    if arch == "tiny":
        return str(MODELS / "clip")
    folder = MODELS / f"clip-{arch}"
    if not (folder / "open_clip_config.json").is_file():
        build_tiny_clip(folder, model_cfg=open_clip.get_model_config(arch))
    return str(folder)


def reward_config(arch: str, batch_max_images: int) -> Config:
    sizing = (f"reward.batch_max_images={batch_max_images}", "cluster.cpus_per_reward_actor=2")
    if arch == "world":
        return load_config("world", list(sizing))
    return demo_config(f"reward.clip.model=local-dir:{clip_dir(arch)}", *sizing)


@ray.remote
class CallFloor:
    """The same calls with no work: Ray's cost of one request (task submission, the image fetched from the object
    store, the reply), the rate no reward actor can pass."""

    def __init__(self, cfg: Config):
        pass

    async def score(self, images: torch.Tensor, prompts: list[str], unsafe: list[bool] | None = None) -> None:
        return None

    def batch_stats(self) -> dict[str, float]:
        return {"mean_batch_images": 0.0}


def throughput(cfg: Config, n: int, actor_class=RewardActor) -> tuple[float, dict]:
    actor = actor_class.options(num_cpus=2).remote(cfg)
    size = cfg.sampler.height
    images = [ray.put(torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)) for _ in range(n)]
    ray.get(actor.score.remote(images[0], ["warm-up"], [True]))  # model loaded, anchors embedded
    start = time.perf_counter()
    ray.get([actor.score.remote(img, [f"prompt {i % 16}"], [i % 2 == 0]) for i, img in enumerate(images)])
    rate = n / (time.perf_counter() - start)
    stats = ray.get(actor.batch_stats.remote())
    ray.kill(actor)
    return rate, stats


def in_process(cfg: Config, n: int, batches: tuple[int, ...]) -> dict[int, float]:
    """{batch: images/s} of the steering reward in this process, `batch` images a call, on the actor's thread count
    (one model for every batch size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.cluster.cpus_per_reward_actor))
    reward = SteeringReward.from_config(cfg.reward, "cpu")
    size = cfg.sampler.height
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    prompts, unsafe = [f"prompt {i % 16}" for i in range(n)], [i % 2 == 0 for i in range(n)]
    rates = {}
    for batch in batches:
        warm = min(batch, n)
        reward(images[:warm], prompts[:warm], unsafe[:warm], groups=[1] * warm)  # warm-up, prompts embedded
        start = time.perf_counter()
        for i in range(0, n, batch):
            k = min(batch, n - i)
            reward(images[i:i + k], prompts[i:i + k], unsafe[i:i + k], groups=[1] * k)
        rates[batch] = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--arch", default="world")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    rates = {}
    for label, batch in (("one request per forward", 1), ("micro-batched (max 64 images, 10 ms)", 64)):
        rates[label], stats = throughput(reward_config(args.arch, batch), args.images)
        print(f"| {label} | {rates[label]:.1f} images/s | mean batch {stats['mean_batch_images']:.1f} |")
    floor, _ = throughput(reward_config(args.arch, 64), args.images, CallFloor)
    print(f"| Ray's floor: the same calls with no work | {floor:.1f} images/s | |")
    ray.shutdown()
    alone = in_process(reward_config(args.arch, 64), args.images, (1, 64))
    print(f"| in one process, no Ray: 1 / 64 images a call | {alone[1]:.1f} / {alone[64]:.1f} images/s | |")
    values = list(rates.values())
    print(f"micro-batched / per-image ({args.arch}): {values[1] / values[0]:.2f}x (the floor allows "
          f"{floor / values[0]:.2f}x; batching's arithmetic alone, in one process: {alone[64] / alone[1]:.2f}x)")


if __name__ == "__main__":
    main()
