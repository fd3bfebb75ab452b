"""The single-process training loop: rollout -> reward -> GRPO update, on one machine.

It is the reference the distributed runtime is checked against, and the quickest way to try a config:
    safediff train --config deploy/configs/cpu_demo.yaml
Outputs in <output_dir>/<name>/: config.yaml, metrics.jsonl (one line per step), checkpoints/step_N/
and adapter/ (diffusers LoRA format), reward_curve.png.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from safediff.actors.render import pipeline, render_chunk
from safediff.actors.rollout import Rollout
from safediff.common.checkpoint import Layout, TrainerState, export_weights, resume_point, write_checkpoint
from safediff.common.config import Config
from safediff.common.errors import UserInputError
from safediff.common.metrics import PhaseTimer
from safediff.common.policy import Policy
from safediff.common.prompts import PromptStream
from safediff.learner.update import GRPOUpdate, TorchOptimizer, TrainBatch, prepare_denoiser
from safediff.reward_server.steering import DIAGNOSTICS, RewardOutput, SteeringReward
from safediff.runtime.progress import StepProgress
from safediff.runtime.recipe import StepRecipe
from safediff.runtime.session import RunContext, TrainResult, close_run, stop_requests, tracked_run

log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], unsafe: list[bool | None] | None = None,
                 groups: list[int] | None = None) -> RewardOutput: ...


def train(cfg: Config, reward_fn: RewardFn | None = None, progress: bool = True,
          resume: bool | None = None) -> TrainResult:
    """`resume`: see `tracked_run` (None: continue an unfinished previous job on this run id)."""
    if cfg.prompts.adversarial is not None:
        raise UserInputError("prompts.adversarial: red-teaming in the loop runs an attack actor beside the rollout "
                             "actors; use `safediff run` (the Ray runtime), not `safediff train`")
    if cfg.evaluation.every:
        log.warning("evaluation.every: evaluation while training runs on its own actor under `safediff run`; the "
                    "single-process loop skips it")
    with tracked_run(cfg, resume) as run, stop_requests() as stop:
        return _train(cfg, run, reward_fn, progress, stop)


def _train(cfg: Config, run: RunContext, reward_fn: RewardFn | None, progress: bool, stop: list[int]) -> TrainResult:
    policy = Policy.from_config(cfg)
    prepare_denoiser(policy, cfg.grpo)  # the rollout shares the denoiser (and its compiled form)
    rollout = Rollout(policy, cfg.sampler, cfg.grpo.group_size, cfg.run.seed)
    reward_fn = reward_fn or SteeringReward.from_config(cfg.reward, policy.device)
    optimizer = TorchOptimizer(policy.trainable_parameters(), cfg.optim)
    updater = GRPOUpdate(policy, cfg.grpo, cfg.sampler, cfg.run.seed, optimizer)
    prompts = PromptStream(cfg.prompts.sources, cfg.run.seed)
    recipe = StepRecipe(cfg, run, stop)
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    checkpoint = resume_point(run.run_dir, cfg, Layout.TORCH, run.store) if run.resume else None
    start = checkpoint.step if checkpoint else 0
    if checkpoint is not None:
        policy.load_state(checkpoint.weights, checkpoint.version)
        optimizer.load_state_dict(checkpoint.trainers[0].restore(optimizer.state_dict()))
        prompts.load_state_dict(checkpoint.cursor)
    run.metrics.truncate(start)
    tracker, pipe = run.track(start), None

    def save(step: int) -> None:
        write_checkpoint(run.run_dir, cfg, step, policy.version, policy.state(),
                         [TrainerState.capture(optimizer.state_dict())], Layout.TORCH, prompts.state_dict(),
                         run.store)

    def samples(done: int) -> None:  # the sample grid of the policy trained for `done` steps, when one is due
        nonlocal pipe
        if tracker.wants_samples(done):
            pipe = pipe or pipeline(policy, tracker.sample_suite.scheduler)
            tracker.samples(done, render_chunk(pipe, tracker.sample_rows, cfg.tracking.images_per_prompt,
                                               cfg.sampler, tracker.sample_suite))

    samples(start)

    shown = StepProgress(start, cfg.run.steps, progress)
    for step in range(start, cfg.run.steps):
        timer = PhaseTimer()
        with timer("generate"):
            groups = prompts.next_groups(step, P)
            trajectories = rollout.generate(groups)
        with timer("reward"):
            out = reward_fn(torch.cat([t.images for t in trajectories]), [g.prompt for g in groups for _ in range(G)],
                            [g.unsafe for g in groups for _ in range(G)], groups=[G] * P)
        scored = recipe.score(step, policy.version, groups, out.rewards.reshape(P, G).float(),
                              {name: getattr(out, name) for name in DIAGNOSTICS})
        record = scored.record
        with timer("train"):
            if scored.advantages is not None:
                batch = TrainBatch.from_trajectories(scored.kept(trajectories), scored.advantages)
                record.update(updater.update(batch, step))
            policy.version += 1  # versions count finished steps, trained or (all groups dropped) not
        seconds = timer.seconds
        record.update(time_generate=seconds["generate"], time_reward=seconds["reward"], time_train=seconds["train"],
                      images_per_s=P * G / max(sum(seconds.values()), 1e-9))
        recipe.close(step, record, policy.version, prompts.state_dict(), save)
        samples(step + 1)
        shown.step(record)
    shown.close()

    checksum = export_weights(policy.state(), cfg, run.run_dir / "adapter", cfg.run.steps, policy.version)
    return TrainResult(run_dir=run.run_dir, metrics=close_run(cfg, run.metrics), checksum=checksum,
                       final_version=policy.version)
