"""Where a world step's time goes, and what the two batching knobs buy, measured in one process and one run:

    python -m bench.world_step_parts [--repeats 2] [--profile] [--deepspeed] [key.sub=value ...]

    rollout   the step's prompts_per_step groups rendered one group per call (as before) and all in one call
              (as a rollout actor now does), on the world's models and sampler
    learner   one GRPO update of a step's samples with grpo.timesteps_per_pass 1 (the reference's loop) and the
              config's value, from the same trajectories and advantages; the single-process optimiser, no Ray;
              with its time per phase (forward, backward, optimizer, to_device)

    deepspeed (with `--deepspeed`) the same update at the config's timesteps_per_pass through the learner's own ZeRO
              engine (learner/engine.py: a single rank over gloo, as `safediff run`'s learner builds it, without
              Ray) and through the single-process optimiser, timed in turns: what DeepSpeed costs a world update

Each is timed `--repeats` times after one warm-up and the best time is reported, with the ratio. Threads: the
learner's and rollout actor's count from the config (cluster.cpus_per_*). With `--profile`, one more update at the
config's timesteps_per_pass runs under torch.profiler, and the operators taking most of its time are listed with their
share (on the world's UNet, 8 heads of dimension 4 over 256 tokens, most of it is attention).
"""

from __future__ import annotations

import argparse

import torch

from bench.fixtures import best_in_turns, best_of, cpu_name, learner_phases
from safediff.actors.rollout import Rollout
from safediff.common.config import load_config
from safediff.common.policy import Policy
from safediff.common.process import configure_process, free_port
from safediff.common.prompts import PromptStream
from safediff.learner.engine import init_process_group, zero_updater
from safediff.learner.update import GRPOUpdate, TorchOptimizer, TrainBatch


def zero_update(cfg, batch: TrainBatch):
    """A call running one update of `batch` through the learner's ZeRO engine on a policy of its own (1 rank, gloo)."""
    deepspeed = init_process_group(False, "127.0.0.1", free_port(), rank=0, world_size=1)
    updater, _ = zero_updater(deepspeed, cfg, Policy.from_config(cfg))
    return lambda: updater.update(batch, step=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="list the operators an update spends its time in")
    parser.add_argument("--deepspeed", action="store_true", help="also time the update through the learner's ZeRO "
                        "engine")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config("world", args.overrides)
    configure_process(cfg, cfg.cluster.cpus_per_learner_worker)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}")
    policy = Policy.from_config(cfg)
    groups = PromptStream.from_config(cfg.prompts, cfg.run.seed).next_groups(0, cfg.grpo.prompts_per_step)
    rollout = Rollout(policy, cfg.sampler, cfg.grpo.group_size, cfg.run.seed)
    one_by_one = best_of(args.repeats, lambda: [rollout.generate([g]) for g in groups])
    together = best_of(args.repeats, lambda: rollout.generate(groups))
    print(f"rollout, {len(groups)} groups x {cfg.grpo.group_size} images: one group per call {one_by_one:.1f} s, "
          f"one call {together:.1f} s ({one_by_one / together:.2f}x)")

    advantages = torch.randn(len(groups), cfg.grpo.group_size, generator=torch.Generator().manual_seed(0))
    batch = TrainBatch.from_trajectories(rollout.generate(groups), advantages)
    start_state = policy.state()
    seconds, metrics, updates = {}, {}, {}
    for per_pass in sorted({1, cfg.grpo.timesteps_per_pass}):
        grpo = cfg.grpo.model_copy(update={"timesteps_per_pass": per_pass})

        def update(grpo=grpo, per_pass=per_pass):
            policy.load_state(start_state, 0)
            optimizer = TorchOptimizer(policy.trainable_parameters(), cfg.optim)
            metrics[per_pass] = GRPOUpdate(policy, grpo, cfg.sampler, cfg.run.seed, optimizer).update(batch, step=0)

        updates[per_pass] = update
        seconds[per_pass] = best_of(args.repeats, update)
        phases = ", ".join(f"{phase} {value:.1f} s" for phase, value in learner_phases(metrics[per_pass]).items())
        print(f"learner, {len(batch)} samples x {cfg.grpo.trained_per_sample} timesteps, timesteps_per_pass "
              f"{per_pass}: {seconds[per_pass]:.1f} s (last run: {phases})")
    if len(seconds) == 2:
        print(f"learner ratio: {seconds[1] / seconds[cfg.grpo.timesteps_per_pass]:.2f}x")
    if args.deepspeed:  # timed in turns with the single-process optimiser, so a slower spell falls on both
        plain, zero = best_in_turns(args.repeats, updates[cfg.grpo.timesteps_per_pass], zero_update(cfg, batch))
        print(f"learner, timesteps_per_pass {cfg.grpo.timesteps_per_pass}, in turns: single-process optimiser "
              f"{plain:.1f} s, the ZeRO-{cfg.cluster.zero_stage} engine (1 rank, gloo) {zero:.1f} s "
              f"({zero / plain:.2f}x)")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            update()
        ops = sorted(prof.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)
        total = sum(op.self_cpu_time_total for op in ops)
        print("learner update by operator (self CPU time):")
        for op in ops[:8]:
            print(f"  {op.self_cpu_time_total / total:6.1%}  {op.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
