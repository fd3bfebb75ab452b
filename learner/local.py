"""The single-process training loop: rollout -> reward -> GRPO update, on one machine.

It is the reference the distributed runtime is checked against, and the quickest way to try a config:
    safediff train --config deploy/configs/cpu_demo.yaml
Outputs in <output_dir>/<name>/: config.yaml, metrics.jsonl (one line per step), checkpoints/step_N/
and adapter/ (diffusers LoRA format), reward_curve.png.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from actors.rollout import Rollout
from common.config import Config, dump_config
from common.metrics import MetricsLog, plot_reward_curve, read_metrics
from common.policy import Policy
from common.prompts import PromptStream
from common.run_store import Interrupted, RunStore, open_run_store
from learner.checkpoint import TrainerState, export_weights, resume_point, write_checkpoint
from learner.grpo import group_advantages, zero_std_fraction
from learner.update import GRPOUpdate, TorchOptimizer, TrainBatch
from reward_server.steering import RewardOutput, SteeringReward

log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str],
                 unsafe: list[bool | None] | None = None) -> RewardOutput: ...


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    checksum: str                  # sha256 of the final trainable state
    final_version: int = 0
    actor_status: list[tuple[int, str]] = field(default_factory=list)  # (version, checksum) per rollout actor
    max_staleness_seen: int = 0


def _mean(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.float().mean())


@dataclass
class RunContext:
    metrics: MetricsLog
    store: RunStore
    resume: bool  # continue from the newest complete checkpoint


@contextlib.contextmanager
def tracked_run(cfg: Config, resume: bool | None = None) -> Iterator[RunContext]:
    """The run directory and its run store, with the run's lease held (a second job on the same run id is
    refused before it touches any file); writes the resolved config; the store's status ends 'finished',
    'interrupted' or 'failed'. `resume`: True continues from the newest checkpoint, False starts over
    (a fresh metrics.jsonl), None decides from the store: a job resubmitted on a run id whose previous job
    did not finish continues it."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.store
    with open_run_store(s.url, cfg.run.name, run_dir, s.lease_ttl_s, s.metrics_maxlen) as store:
        if resume is None:
            previous = store.status()
            resume = previous in ("running", "interrupted", "failed")
            if resume:
                log.warning("run '%s': the previous job ended '%s'; continuing it (--fresh to start over)",
                            cfg.run.name, previous)
        config_yaml = dump_config(cfg)
        (run_dir / "config.yaml").write_text(config_yaml)
        if not resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        store.begin(config_yaml)
        try:
            yield RunContext(MetricsLog(run_dir / "metrics.jsonl"), store, resume)
        except Interrupted:
            store.finish("interrupted")
            raise
        except BaseException as err:
            store.finish("failed")
            store.event("error", message=f"{type(err).__name__}: {err}"[:2000])
            raise
        store.finish("finished")


def close_run(cfg: Config, metrics: MetricsLog) -> list[dict]:
    """Read the run's metrics back and draw its reward curve next to them."""
    records = read_metrics(metrics.path)
    plot_reward_curve(records, metrics.path.parent / "reward_curve.png", title=f"{cfg.run.name}: reward")
    return records


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGTERM/SIGINT into a request (the list gets the signal number) that the loop honours after
    the current step, with a checkpoint; a second signal interrupts at once."""
    requested: list[int] = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("signal %d: stopping after this step with a checkpoint (again to stop now)", signum)

    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(cfg: Config, reward_fn: RewardFn | None = None, progress: bool = True,
          resume: bool | None = None) -> TrainResult:
    """`resume`: see `tracked_run` (None: continue an unfinished previous job on this run id)."""
    with tracked_run(cfg, resume) as run, stop_requests() as stop:
        return _train(cfg, run, reward_fn, progress, stop)


def _train(cfg: Config, run: RunContext, reward_fn: RewardFn | None, progress: bool, stop: list[int]) -> TrainResult:
    metrics, store = run.metrics, run.store
    run_dir = metrics.path.parent

    policy = Policy.from_config(cfg)
    rollout = Rollout(policy, cfg.sampler, cfg.grpo.group_size, cfg.run.seed)
    reward_fn = reward_fn or SteeringReward.from_config(cfg.reward, policy.device)
    optimizer = TorchOptimizer(policy.trainable_parameters(), cfg.optim)
    updater = GRPOUpdate(policy, cfg.grpo, cfg.sampler, cfg.run.seed, optimizer)
    prompts = PromptStream(cfg.prompts.sources, cfg.run.seed)
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    checkpoint = resume_point(run_dir, cfg, "torch", store) if run.resume else None
    start = checkpoint.step if checkpoint else 0
    if checkpoint is not None:
        policy.load_state(checkpoint.weights, checkpoint.version)
        optimizer.load_state_dict(checkpoint.trainers[0].restore(optimizer.state_dict()))
        prompts.load_state_dict(checkpoint.cursor)
    metrics.truncate(start)

    def save(step: int) -> None:
        write_checkpoint(run_dir, cfg, step, policy.version, policy.state(),
                         [TrainerState.capture(optimizer.state_dict())], "torch", prompts.state_dict(),
                         policy.unet.config, store)

    bar = tqdm(range(start, cfg.run.steps), desc="train", unit="step", disable=not progress,
               initial=start, total=cfg.run.steps)
    for step in bar:
        t0 = time.perf_counter()
        groups = prompts.next_groups(step, P)
        trajectories = rollout.generate(groups)
        t1 = time.perf_counter()
        images = torch.cat([t.images for t in trajectories])
        scored = reward_fn(images, [g.prompt for g in groups for _ in range(G)],
                           [g.unsafe for g in groups for _ in range(G)])
        rewards = scored.rewards.reshape(P, G).float()
        t2 = time.perf_counter()

        finite = torch.isfinite(rewards).all(dim=1)
        if not finite.all():
            log.warning("step %d: dropped %d groups with NaN/inf rewards", step, int((~finite).sum()))
        record = {"step": step, "policy_version": policy.version, "dropped_groups": int((~finite).sum()),
                  "reward_mean": _mean(rewards[finite]), "reward_std": float(rewards[finite].std())
                  if finite.sum() * G > 1 else 0.0, "cos_prompt_mean": _mean(scored.cos_prompt),
                  "cos_safe_mean": _mean(scored.cos_safe)}
        if finite.any():
            kept = [t for t, ok in zip(trajectories, finite.tolist()) if ok]
            sources = torch.tensor([g.source for g in groups])[finite]
            adv = group_advantages(rewards[finite], cfg.grpo.adv_eps, cfg.grpo.adv_clip, cfg.grpo.adv_scale, sources)
            record["zero_std_frac"] = zero_std_fraction(rewards[finite])
            record.update(updater.update(TrainBatch.from_trajectories(kept, adv), step))
        policy.version += 1  # versions count finished steps, trained or (all groups dropped) not
        t3 = time.perf_counter()
        record.update(time_generate=t1 - t0, time_reward=t2 - t1, time_train=t3 - t2,
                      images_per_s=P * G / max(t3 - t0, 1e-9))
        metrics.write(record)
        store.record_step(step, policy.version, prompts.state_dict(), record)
        bar.set_postfix(reward=f"{record['reward_mean']:.4f}" if record["reward_mean"] is not None else "nan",
                        kl=f"{record.get('approx_kl', 0):.2e}")
        if (step + 1) % cfg.run.save_every == 0 or step + 1 == cfg.run.steps or stop:
            save(step + 1)
        if stop and step + 1 < cfg.run.steps:
            raise Interrupted(f"stopped by signal {stop[0]} after step {step}; checkpoint written: "
                              f"resubmit the same command to continue")

    checksum = export_weights(policy.state(), cfg, run_dir / "adapter", cfg.run.steps, policy.version,
                              policy.unet.config)
    return TrainResult(run_dir=run_dir, metrics=close_run(cfg, metrics), checksum=checksum,
                       final_version=policy.version)
