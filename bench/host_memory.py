"""What run.keep_freed_memory buys on CPU, measured in one run:

    python -m bench.host_memory [--turns 2] [key.sub=value ...]

Each measurement is a fresh child process (malloc's settings hold for a whole process), the two settings taking
turns (off, on, off, on, ...). A child sets itself up as an actor does (`configure_process`: the learner's threads,
and the setting), loads the world's models, renders one step's groups twice (a warm-up call, then the timed one) and
runs the step's GRPO update three times from the same start. Reported per setting, as the mean (least-most) over its
children: the rollout, the second and third updates (the first pays for allocations a process makes once, with either
setting), the first update apart, the child's system CPU time and its minor page faults (pages the kernel mapped and
zeroed), with the ratio of the means.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.fixtures import cpu_name, timed
from safediff.actors.rollout import Rollout
from safediff.common.config import load_config
from safediff.common.policy import Policy
from safediff.common.process import configure_process
from safediff.common.prompts import PromptStream
from safediff.learner.update import GRPOUpdate, TorchOptimizer, TrainBatch

SETTINGS = (False, True)  # run.keep_freed_memory, in the order each turn runs them


def child(overrides: list[str]) -> dict:
    """One measurement, in this process: seconds of the timed rollout, of the first update and of the next two,
    system CPU seconds and minor page faults of the whole process."""
    cfg = load_config("world", overrides)
    configure_process(cfg, cfg.cluster.cpus_per_learner_worker)
    policy = Policy.from_config(cfg)
    groups = PromptStream.from_config(cfg.prompts, cfg.run.seed).next_groups(0, cfg.grpo.prompts_per_step)
    rollout = Rollout(policy, cfg.sampler, cfg.grpo.group_size, cfg.run.seed)
    trajectories = rollout.generate(groups)  # the warm-up call; the timed one renders the same samples
    rollout_s = timed(lambda: rollout.generate(groups))
    advantages = torch.randn(len(groups), cfg.grpo.group_size, generator=torch.Generator().manual_seed(0))
    batch, start = TrainBatch.from_trajectories(trajectories, advantages), policy.state()

    def update():
        policy.load_state(start, 0)
        optimizer = TorchOptimizer(policy.trainable_parameters(), cfg.optim)
        GRPOUpdate(policy, cfg.grpo, cfg.sampler, cfg.run.seed, optimizer).update(batch, step=0)

    first_update_s, *update_s = [timed(update) for _ in range(3)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"rollout_s": rollout_s, "first_update_s": first_update_s, "update_s": update_s, "system_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt}


def summary(runs: list[dict], key: str) -> tuple[float, float, float]:
    """Mean, least and most of `key` over a setting's children (over each one's values, for a list): the mean, not
    the best, because what the setting removes is slow spells as much as a slower typical call."""
    values = [v for r in runs for v in (r[key] if isinstance(r[key], list) else [r[key]])]
    return sum(values) / len(values), min(values), max(values)


def measure(keep: bool, overrides: list[str]) -> dict:
    """`child` in a fresh process with run.keep_freed_memory = `keep`."""
    command = [sys.executable, "-m", "bench.host_memory", "--child", *overrides,
               f"run.keep_freed_memory={str(keep).lower()}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2, help="measurements per setting, taken in turns")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.overrides)))
        return 0
    print(f"CPU: {cpu_name()}; {args.turns} turns, each a fresh process per setting")
    runs: dict[bool, list[dict]] = {keep: [] for keep in SETTINGS}
    for turn in range(args.turns):
        for keep in SETTINGS:
            runs[keep].append(measure(keep, args.overrides))
            r = runs[keep][-1]
            updates = ", ".join(f"{s:.2f}" for s in [r["first_update_s"], *r["update_s"]])
            print(f"  turn {turn + 1}, keep_freed_memory={keep}: rollout {r['rollout_s']:.2f} s, updates {updates} s, "
                  f"system {r['system_s']:.1f} s, {r['minor_faults'] / 1e6:.2f} M minor faults", flush=True)
    for name, key in (("rollout (one step's groups)", "rollout_s"), ("GRPO update (2nd and 3rd)", "update_s"),
                      ("first GRPO update", "first_update_s"), ("system CPU per child", "system_s")):
        off, on = (summary(runs[keep], key) for keep in SETTINGS)
        print(f"{name}: off {off[0]:.2f} s ({off[1]:.2f}-{off[2]:.2f}), on {on[0]:.2f} s ({on[1]:.2f}-{on[2]:.2f}): "
              f"{off[0] / on[0]:.2f}x")
    faults = [sum(r["minor_faults"] for r in runs[keep]) / len(runs[keep]) / 1e6 for keep in SETTINGS]
    print(f"minor page faults per child: off {faults[0]:.2f} M, on {faults[1]:.2f} M")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
