"""Chaos: random kills of rollout actors, the reward actor and worker nodes during a run, against the same run
left alone.

    python -m bench.chaos [--config world] [--steps N] [--kill-every S] [--rollout-actors 2] [--spare-nodes 2]

Both runs are on-policy (`cluster.max_staleness=0`), so a group generated again is the same group and the adapter
must come out bit for bit the same. They run on a one-machine multi-node cluster (bench/fixtures.py): the learner
rank and the reward actor on the head, one rollout actor per worker node, plus spare worker nodes that a lost
node's actor restarts on. Every `--kill-every` seconds (uniform in [S/2, 3S/2], seeded), one fault is picked at
random: kill a rollout actor, kill the reward actor, or remove the worker node of a rollout actor (only while a
spare node is left; meanwhile the run goes on with the actors that answer). A group lost again on its retry is
retried again, up to `cluster.group_retries` times. Reported: groups lost and groups counted twice (both must be 0:
every step trains exactly the samples of its groups), groups retried, the faults injected, the extra wall time, and
whether the adapter checksum equals the undisturbed run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ray  # noqa: E402

from bench.fixtures import PLACED, REPO, node_of, one_machine_cluster  # noqa: E402
from safediff.common.config import load_config  # noqa: E402
from safediff.common.errors import first_line  # noqa: E402
from safediff.runtime.controller import run  # noqa: E402
from safediff.runtime.groups import Actors, start_actors  # noqa: E402
from safediff.runtime.redis_server import EmbeddedRedis  # noqa: E402
from safediff.runtime.run_store import RunStore  # noqa: E402


class Chaos:
    """The fault injector: a thread that strikes every ~`every_s` seconds until stopped."""

    def __init__(self, cluster, actors: Actors, every_s: float, seed: int):
        self.cluster, self.actors, self.every_s = cluster, actors, every_s
        self.rng = random.Random(seed)
        self.spares = len(cluster.worker_nodes) - len(actors.rollouts)
        self.faults: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.rng.uniform(self.every_s / 2, 3 * self.every_s / 2)):
            kinds = ["rollout actor", "reward actor"] + (["worker node"] if self.spares > 0 else [])
            kind, slot = self.rng.choice(kinds), self.rng.randrange(len(self.actors.rollouts))
            try:
                if kind == "rollout actor":
                    ray.kill(self.actors.rollouts[slot], no_restart=False)
                elif kind == "reward actor":
                    ray.kill(self.actors.rewards[0], no_restart=False)
                else:
                    where = node_of(self.actors.rollouts[slot])
                    node = next(n for n in self.cluster.worker_nodes if n.node_id == where)
                    self.cluster.remove_node(node)
                    self.spares -= 1
            except Exception as err:  # an actor still restarting from the last fault: strike again later
                print(f"chaos: {kind} {slot} not struck ({type(err).__name__})", flush=True)
                continue
            self.faults.append(kind)
            print(f"chaos: {kind} {slot} struck at {time.strftime('%H:%M:%S')}", flush=True)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="world", help="a built-in config name or a YAML path")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=60.0, help="mean seconds between faults")
    parser.add_argument("--rollout-actors", type=int, default=2)
    parser.add_argument("--spare-nodes", type=int, default=2, help="worker nodes beyond one per rollout actor")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--out", default=str(REPO / "runs" / "chaos"))
    parser.add_argument("overrides", nargs="*", help="config overrides (dotted.key=value)")
    args = parser.parse_args()

    # one group per UNet batch and per CLIP forward: otherwise how groups happen to meet in a batch (an actor taking
    # a lost actor's groups renders them with its own; reward requests are batched as they arrive) changes the last
    # float bits, and the two runs could differ without any fault
    group_size = load_config(args.config, args.overrides).grpo.group_size

    def config(name: str):
        return load_config(args.config, [f"run.output_dir={args.out}", f"run.name={name}", f"run.steps={args.steps}",
                                          "cluster.max_staleness=0", f"cluster.rollout_actors={args.rollout_actors}",
                                          "cluster.cpus_per_rollout_actor=1", "cluster.cpus_per_reward_actor=0.5",
                                          "cluster.cpus_per_learner_worker=1", "evaluation.every=0",
                                          f"sampler.batch_size={group_size}", f"reward.batch_max_images={group_size}",
                                          *PLACED, *args.overrides])

    with one_machine_cluster(workers=args.rollout_actors + args.spare_nodes) as nodes:
        start = time.perf_counter()
        calm = run(config("calm"), progress=True, resume=False)
        calm_s = time.perf_counter() - start
        cfg = config("chaos")
        actors = start_actors(cfg)
        chaos = Chaos(nodes, actors, args.kill_every, args.seed)
        start, stormy, outcome = time.perf_counter(), None, "finished"
        try:
            stormy = run(cfg, progress=True, actors=actors, resume=False)
        except Exception as err:  # the job stopped (a group lost more often than retried): reported, with what it did
            outcome = f"stopped: {first_line(err)}"
        finally:
            chaos.stop()
        stormy_s = time.perf_counter() - start
    run_dir = Path(args.out) / "chaos"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    expected = [(P - m["dropped_groups"]) * G for m in metrics]  # groups with NaN rewards are dropped whole
    lost = sum(max(0, e - m["samples_trained"]) for e, m in zip(expected, metrics)) // G
    twice = sum(max(0, m["samples_trained"] - e) for e, m in zip(expected, metrics)) // G
    with EmbeddedRedis(run_dir / "redis") as srv:
        events = RunStore(srv.url, "chaos").events()
    started = max(i for i, e in enumerate(events) if e["kind"] == "started")  # the stream keeps earlier runs' events
    retried = sum(e["kind"] == "group_retried" for e in events[started:])
    same = "n/a" if stormy is None else stormy.checksum == calm.checksum
    print(f"\n| faults injected | steps done | groups lost | groups counted twice | groups retried | wall: calm / "
          f"chaos | adapter equals the calm run's | outcome |\n|---|---:|---:|---:|---:|---|---|---|\n"
          f"| {len(chaos.faults)} ({', '.join(sorted(set(chaos.faults)))}) | {len(metrics)} / {args.steps} | {lost} | "
          f"{twice} | {retried} | {calm_s:.0f} s / {stormy_s:.0f} s ({stormy_s - calm_s:+.0f} s) | {same} | "
          f"{outcome} |")


if __name__ == "__main__":
    main()
