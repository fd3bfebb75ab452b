"""Asynchronous pipeline (max_staleness=1) vs synchronous (0), same actors, on the CPU demo.

    python -m bench.async_vs_sync [--steps 8]

Topology: 1 rollout actor, 1 reward actor, 1 learner rank (this machine has 2 cores), with the
per-step work balanced so generation and training take similar time (3 of 10 timesteps trained), as
the GPU configs balance it with several rollout GPUs per learner GPU. With a balanced pipeline the
asynchronous mode can approach 2x; with one side dominating it can only hide the smaller side.

Prints images/s for both, their ratio, and the learner's and actors' idle fractions (from the run's
own metrics: learner idle = time waiting for rollouts or publishing; actor idle = 1 - generate time /
(actors x wall time)).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from bench.fixtures import demo_config  # noqa: E402
from safediff.runtime.controller import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key.sub=value")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    rows = {}
    for k in (0, 1):
        cfg = demo_config(f"run.steps={args.steps}", f"cluster.max_staleness={k}", f"run.name=bench-async-{k}",
                          "cluster.rollout_actors=1", "grpo.train_timesteps=3", *args.overrides)
        last = run(cfg, progress=False).metrics[-1]
        rows[k] = {key: last[key] for key in ("images_per_s", "learner_idle_frac", "actor_idle_frac")}
    ray.shutdown()
    print(json.dumps(rows, indent=1))
    print("| mode | images/s | learner idle | actors idle |\n|---|---|---|---|")
    for k, name in ((0, "sync (max_staleness=0)"), (1, "async (max_staleness=1)")):
        r = rows[k]
        print(f"| {name} | {r['images_per_s']:.2f} | {r['learner_idle_frac']:.0%} | {r['actor_idle_frac']:.0%} |")
    print(f"async / sync images/s: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
