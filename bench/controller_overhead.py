"""Controller overhead: the real controller driving no-op rollout/reward/learner stand-ins.

    python -m bench.controller_overhead [--actors 1 4 16 32] [--steps 10]

With stand-ins that return at once, a step's wall time is the controller's own cost (launching
32 groups x 2 calls, fetching rewards, advantages, publish, sync to every actor, metrics). It is
reported against the wall time of a real step of the CPU demo measured in the same run
(`--real-steps` steps of `deploy/configs/cpu_demo.yaml`), the smallest real step this project runs.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from ray.util.placement_group import placement_group  # noqa: E402

from bench.fixtures import demo_config  # noqa: E402
from bench.standins import NoopRollout  # noqa: E402
from safediff.common.checkpoint import TrainerState  # noqa: E402
from safediff.common.weight_sync import publish  # noqa: E402
from safediff.reward_server.steering import RewardOutput  # noqa: E402
from safediff.runtime.controller import run  # noqa: E402
from safediff.runtime.groups import Actors, LearnerGroup, RewardGroup, RolloutGroup  # noqa: E402


@ray.remote(num_cpus=0)
class NoopReward:
    async def score(self, images, prompts, unsafe=None):
        return RewardOutput(rewards=torch.rand(len(prompts)))

    def batch_stats(self):
        return {}


@ray.remote(num_cpus=0)
class NoopLearner:
    def __init__(self):
        self.version = 0
        self.state = {"unet.x.lora_A.weight": torch.zeros(4, 4)}

    def update(self, refs, advantages, step):
        self.version += 1
        return {"loss": 0.0}

    def publish(self):
        return publish(self.state, self.version, 1)

    def trainer_state(self):
        return TrainerState.capture({})  # the checkpoint the last step writes

    def shutdown(self):
        return None


def noop_actors(rollouts: int, rewards: int | None = None) -> Actors:
    """`rollouts` rollout stand-ins (bench/standins.py), `rewards` reward stand-ins (default one per 8 rollout
    stand-ins), and one learner stand-in."""
    rewards = max(1, rollouts // 8) if rewards is None else rewards
    return Actors(RolloutGroup([NoopRollout.remote() for _ in range(rollouts)]),
                  RewardGroup([NoopReward.remote() for _ in range(rewards)]),
                  LearnerGroup([NoopLearner.remote()], placement_group([{"CPU": 0.01}])))


def step_ms(records: list[dict], images_per_step: int) -> float:
    """Median wall time of a step (from the cumulative images/s the controller logs)."""
    times, previous = [], 0.0
    for r in records:
        elapsed = (r["step"] + 1) * images_per_step / r["images_per_s"]
        times.append(elapsed - previous)
        previous = elapsed
    return statistics.median(times[1:]) * 1000  # the first step includes warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--real-steps", type=int, default=4)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")

    real = demo_config(f"run.steps={args.real_steps}", "run.name=bench-real")
    real_ms = step_ms(run(real, progress=False).metrics, real.grpo.prompts_per_step * real.grpo.group_size)

    print(f"real CPU-demo step: {real_ms:.0f} ms\n")
    print("| rollout actors | groups/step | no-op step (ms) | share of a real CPU-demo step |\n|---|---|---|---|")
    for n in args.actors:
        cfg = demo_config(f"run.steps={args.steps}", "run.save_every=1000", "run.name=bench-noop",
                          "grpo.prompts_per_step=32", "grpo.updates_per_step=1", "grpo.micro_batch_size=8",
                          f"cluster.rollout_actors={n}", "cluster.max_staleness=1",
                          "cluster.cpus_per_rollout_actor=0.01")  # stand-ins reserve no CPU
        records = run(cfg, progress=False, actors=noop_actors(n)).metrics
        ms = step_ms(records, cfg.grpo.prompts_per_step * cfg.grpo.group_size)
        print(f"| {n} | 32 | {ms:.1f} | {ms / real_ms:.1%} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
