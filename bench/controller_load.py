"""Controller load: the real controller driving many no-op stand-ins for many steps, watching memory.

    python -m bench.controller_load [--actors 64] [--steps 1000]

The stand-ins of `bench.controller_overhead` (rollout, reward and learner actors that return at once) let the
controller run a thousand steps in minutes, so what grows with the step count shows: the driver's resident memory
and the object store's usage are sampled while the run goes, and their slopes are fitted over the second half of
the run (the first half holds the warm-up). The run store's streams are read back at the end against their caps.
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray._private.internal_api import memory_summary  # noqa: E402

from bench.controller_overhead import noop_actors  # noqa: E402
from bench.fixtures import demo_config  # noqa: E402
from safediff.runtime.controller import run  # noqa: E402
from safediff.runtime.redis_server import EmbeddedRedis  # noqa: E402
from safediff.runtime.run_store import RunStore  # noqa: E402

MIB = 2 ** 20


def plasma_mib() -> float:
    """The object store's usage on every node, in MiB (Ray's `ray memory --stats-only` line)."""
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return float(found.group(1)) if found else 0.0


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, value) over the second half of the steps, per 1000 steps."""
    last = max(step for step, _ in points)
    half = [(s, v) for s, v in points if s >= last / 2]
    n, mean_s, mean_v = len(half), sum(s for s, _ in half) / len(half), sum(v for _, v in half) / len(half)
    var = sum((s - mean_s) ** 2 for s, _ in half)
    return 1000 * sum((s - mean_s) * (v - mean_v) for s, v in half) / var if n > 1 and var > 0 else 0.0


class Sampler:
    """Every `every_s` seconds, on a thread: (steps recorded, driver RSS MiB, object store MiB)."""

    def __init__(self, metrics: Path, every_s: float = 1.0):
        self.metrics, self.every_s = metrics, every_s
        self.rss: list[tuple[int, float]] = []
        self.plasma: list[tuple[int, float]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        me = psutil.Process()
        while not self.done.wait(self.every_s):
            steps = len(self.metrics.read_text().splitlines()) if self.metrics.is_file() else 0
            self.rss.append((steps, me.memory_info().rss / MIB))
            self.plasma.append((steps, plasma_mib()))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--reward-actors", type=int, default=2, help="reward stand-ins (each a torch process)")
    parser.add_argument("--metrics-cap", type=int, default=100, help="store.metrics_maxlen for the run")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    cfg = demo_config(f"run.steps={args.steps}", "run.save_every=100", "run.name=bench-load",
                      "grpo.prompts_per_step=64", "grpo.updates_per_step=1", "grpo.micro_batch_size=8",
                      f"cluster.rollout_actors={args.actors}", "cluster.max_staleness=1",
                      "cluster.cpus_per_rollout_actor=0.01", f"store.metrics_maxlen={args.metrics_cap}",
                      "tracking.every=1000000")
    actors = noop_actors(args.actors, args.reward_actors)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    sampler, start = Sampler(run_dir / "metrics.jsonl"), time.perf_counter()
    result = run(cfg, progress=True, actors=actors, resume=False)
    sampler.stop()
    wall = time.perf_counter() - start
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        store = RunStore(srv.url, cfg.run.name)
        streams = {"metrics": len(store.metrics()), "events": len(store.events())}
    ray.shutdown()
    rss, plasma = sampler.rss, sampler.plasma
    print(f"{args.steps} steps x {cfg.grpo.prompts_per_step} no-op groups, {args.actors} rollout stand-ins: "
          f"{wall:.0f} s ({1000 * wall / args.steps:.0f} ms per step)")
    print("| quantity | first sample | last sample | max | slope over the second half (per 1000 steps) |")
    print("|---|---:|---:|---:|---:|")
    for name, points in (("driver RSS (MiB)", rss), ("object store (MiB)", plasma)):
        values = [v for _, v in points]
        print(f"| {name} | {values[0]:.1f} | {values[-1]:.1f} | {max(values):.1f} | {slope(points):+.2f} |")
    print(f"run store streams: metrics {streams['metrics']} entries (cap {args.metrics_cap}, trimmed approximately "
          f"by Redis), events {streams['events']} (cap {cfg.store.events_maxlen})")


if __name__ == "__main__":
    main()
