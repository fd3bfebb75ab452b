"""Reward actor micro-batching vs one CLIP forward per image.

    python -m bench.reward_batching [--images 256] [--arch tiny|ViT-B-32]

Sends `--images` single-image `score` requests concurrently (as rollout groups from many actors do)
to a RewardActor with micro-batching (batch_max_images=64) and to one with batching off
(batch_max_images=1); prints images/s for each and the ratio. `--arch ViT-B-32` uses that open_clip
architecture with random weights at 224 px (a realistic per-image cost); `tiny` is the CPU demo's model.
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
from safediff.reward_server.actor import RewardActor  # noqa: E402
from safediff.reward_server.clip_model import build_tiny_clip  # noqa: E402


def clip_dir(arch: str) -> str:
    if arch == "tiny":
        return str(MODELS / "clip")
    folder = MODELS / f"clip-{arch}"
    if not (folder / "open_clip_config.json").is_file():
        build_tiny_clip(folder, model_cfg=open_clip.get_model_config(arch))
    return str(folder)


def throughput(cfg, n: int) -> tuple[float, dict]:
    actor = RewardActor.options(num_cpus=2).remote(cfg)
    size = cfg.sampler.height
    images = [ray.put(torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)) for _ in range(n)]
    ray.get(actor.score.remote(images[0], ["warm-up"]))  # model loaded, anchors embedded
    start = time.perf_counter()
    ray.get([actor.score.remote(img, [f"prompt {i % 16}"]) for i, img in enumerate(images)])
    rate = n / (time.perf_counter() - start)
    stats = ray.get(actor.batch_stats.remote())
    ray.kill(actor)
    return rate, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--arch", default="tiny")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    folder = clip_dir(args.arch)
    rates = {}
    for label, batch in (("one request per forward", 1), ("micro-batched (max 64 images, 10 ms)", 64)):
        cfg = demo_config(f"reward.clip.model=local-dir:{folder}", f"reward.batch_max_images={batch}",
                          "cluster.cpus_per_reward_actor=2")
        rates[label], stats = throughput(cfg, args.images)
        print(f"| {label} | {rates[label]:.1f} images/s | mean batch {stats['mean_batch_images']:.1f} |")
    ray.shutdown()
    values = list(rates.values())
    print(f"micro-batched / per-image ({args.arch}): {values[1] / values[0]:.2f}x")


if __name__ == "__main__":
    main()
