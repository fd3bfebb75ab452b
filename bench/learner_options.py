"""The learner's execution options, each against the default on one GRPO update, in one process and one run:

    python -m bench.learner_options [--config world] [--repeats 2] [key.sub=value ...]

default                 the config as it is
gradient_checkpointing  grpo.gradient_checkpointing: the denoiser's blocks recompute their activations in backward
compile                 grpo.compile: the denoiser under torch.compile (inductor)

Each option gets a policy of its own (the same seeded initial adapter) and trains one step's samples (a rollout of
the config's first prompts, seeded random advantages) from the same start. Reported per option: the first update
(for `compile`, the compilation is in it: inductor's caches go to a new folder, so it is compiled cold, as on a
fresh machine), the best of `--repeats` later updates, timed in turns so that a slower
spell of the machine falls on all alike, with the learner's time per phase; the activation memory of one pass
(micro_batch_size x timesteps_per_pass pairs with the adapter trainable: the bytes autograd keeps for backward, so
measured alike on CPU and GPU); and how far the update's loss and the adapter after it are from the default's
(the options change how the update is computed, not what).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench.fixtures import best_in_turns, cpu_name, learner_phases, saved_activation_bytes
from safediff.actors.rollout import Rollout
from safediff.common.config import Config, GRPOConfig, load_config
from safediff.common.policy import Policy
from safediff.common.process import configure_process
from safediff.common.prompts import PromptStream
from safediff.learner.update import GRPOUpdate, TorchOptimizer, TrainBatch, prepare_denoiser

OPTIONS = {"default": {}, "gradient_checkpointing": {"gradient_checkpointing": True}, "compile": {"compile": True}}


class Learner:
    """A policy with one option applied, and its update of `batch` from the shared start."""

    def __init__(self, cfg: Config, grpo: GRPOConfig, batch: TrainBatch):
        self.cfg, self.grpo, self.batch = cfg, grpo, batch
        self.policy = Policy.from_config(cfg)
        prepare_denoiser(self.policy, grpo)
        self.start, self.metrics = self.policy.state(), {}
        self.updater: GRPOUpdate | None = None

    def update(self) -> None:
        self.policy.load_state(self.start, 0)
        optimizer = TorchOptimizer(self.policy.trainable_parameters(), self.cfg.optim)
        self.updater = GRPOUpdate(self.policy, self.grpo, self.cfg.sampler, self.cfg.run.seed, optimizer)
        self.metrics = self.updater.update(self.batch, step=0)

    def pass_activation_bytes(self) -> int:
        """Activation memory of one pass of the last update: micro_batch_size samples at timesteps_per_pass steps."""
        rows = torch.arange(self.grpo.micro_batch_size).repeat(self.grpo.timesteps_per_pass)
        steps = torch.arange(self.grpo.timesteps_per_pass).repeat_interleave(self.grpo.micro_batch_size)
        batch = self.batch.to(self.policy.device)
        self.policy.denoiser.train()
        kept = saved_activation_bytes(self.policy.denoiser, lambda: self.updater.policy_step(batch, rows, steps))
        self.policy.denoiser.eval()
        return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="world")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compilation, whatever ran on this machine before
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    configure_process(cfg, cfg.cluster.cpus_per_learner_worker)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}")
    g = cfg.grpo
    policy = Policy.from_config(cfg)
    groups = PromptStream.from_config(cfg.prompts, cfg.run.seed).next_groups(0, g.prompts_per_step)
    advantages = torch.randn(len(groups), g.group_size, generator=torch.Generator().manual_seed(0))
    batch = TrainBatch.from_trajectories(Rollout(policy, cfg.sampler, g.group_size, cfg.run.seed).generate(groups),
                                         advantages)
    learners = {name: Learner(cfg, g.model_copy(update=option), batch) for name, option in OPTIONS.items()}
    first = {}
    for name, learner in learners.items():
        start = time.perf_counter()
        learner.update()
        first[name] = time.perf_counter() - start
    best = dict(zip(learners, best_in_turns(args.repeats, *(lr.update for lr in learners.values()), warm_up=False)))
    reference = learners["default"]
    print(f"one update of {len(batch)} samples x {g.trained_per_sample} timesteps (micro-batch {g.micro_batch_size} "
          f"x {g.timesteps_per_pass} timesteps per pass), best of {args.repeats} in turns:")
    for name, learner in learners.items():
        state, ref_state = learner.policy.state(), reference.policy.state()
        drift = max(float((state[k] - ref_state[k]).abs().max()) for k in state)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in learner_phases(learner.metrics).items())
        print(f"  {name}: first {first[name]:.1f} s, then {best[name]:.1f} s ({best['default'] / best[name]:.2f}x "
              f"the default; the last update: {phases}); one pass keeps "
              f"{learner.pass_activation_bytes() / 2**20:.1f} MiB for backward; loss {learner.metrics['loss']:.6g} "
              f"(default {reference.metrics['loss']:.6g}), adapter after the update within {drift:.1e} of the "
              "default's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
