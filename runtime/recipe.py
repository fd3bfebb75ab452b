"""One step recipe for both loops: what a training step does with its scored groups.

`safediff train` (runtime/local.py) and `safediff run` (runtime/controller.py) differ only in how they
generate, score and update; both hand their step's rewards to a `StepRecipe`:

    rewards [P, G] -> finite-group mask -> group advantages [P_kept, G] -> (the loop trains the kept groups)
    -> step record -> metrics.jsonl + run store -> checkpoint every `run.save_every` steps, at the last step
    and on a stop request -> `Interrupted` when a signal asked the run to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from safediff.common.config import Config
from safediff.common.grpo import group_advantages, zero_std_fraction
from safediff.common.messages import PromptGroup
from safediff.common.metrics import read_metrics
from safediff.runtime.run_store import Interrupted
from safediff.runtime.session import RunContext

log = logging.getLogger(__name__)


@dataclass
class ScoredStep:
    """A step's rewards turned into what the update needs, and the start of the step's record."""

    record: dict
    finite: list[bool]               # [P]: the group's rewards are all finite (others are dropped)
    advantages: torch.Tensor | None  # [P_kept, G]; None when every group was dropped (no update)

    def kept(self, per_group: list) -> list:
        """The entries of a per-group list (trajectories, or references to them) for the kept groups."""
        return [item for item, ok in zip(per_group, self.finite) if ok]


def _mean(values: torch.Tensor | None) -> float | None:
    return None if values is None else float(values.float().mean())


# An on-policy step's first minibatch recomputes log-probs of exactly what the rollout recorded: its |log ratio|
# should be float noise (about 1e-6 in fp32 when batch shapes differ). Above this it signals rollout and training
# computing different functions (dropout, a stale adapter, a dtype or kernel mismatch).
LOG_RATIO_ALARM = 1e-3
# grpo.behaviour_max_log_ratio drops the stale terms whose behaviour policy is far from the learner's: a step that
# drops more than this share of its terms learns from little of its data.
DROPPED_ALARM = 0.5
# What a policy hacking the reward loses first: alignment with the prompt, and variety within a group.
HACKING_SIGNALS = ("cos_prompt_mean", "diversity_mean")


class StepRecipe:
    def __init__(self, cfg: Config, run: RunContext, stop: list[int]):
        self.cfg, self.run, self.stop = cfg, run, stop
        logged = read_metrics(run.metrics.path) if run.metrics.path.is_file() else []
        self.first: dict | None = logged[0] if logged else None  # the reference of the hacking alarms
        self.alarmed: set[str] = set()

    def score(self, step: int, version: int, groups: list[PromptGroup], rewards: torch.Tensor,
              diagnostics: dict[str, torch.Tensor | None]) -> ScoredStep:
        """`rewards` [P, G] of the step's groups, generated at policy `version`; `diagnostics` the reward's
        per-image diagnostics over all P * G images by name (`reward_server.steering.DIAGNOSTICS`; None when the
        reward gives none), logged as <name>_mean. A group with a NaN/inf reward is dropped whole: its
        advantages would poison every other sample's."""
        G, g = rewards.shape[1], self.cfg.grpo
        finite = torch.isfinite(rewards).all(dim=1)
        if not finite.all():
            log.warning("step %d: dropped %d groups with NaN/inf rewards", step, int((~finite).sum()))
        record = {"step": step, "policy_version": version, "dropped_groups": int((~finite).sum()),
                  "reward_mean": _mean(rewards[finite]) if finite.any() else None,
                  "reward_std": float(rewards[finite].std()) if finite.sum() * G > 1 else 0.0,
                  **{f"{name}_mean": _mean(values) for name, values in diagnostics.items()}}
        advantages = None
        if finite.any():
            sources = torch.tensor([group.source for group in groups])[finite]
            advantages = group_advantages(rewards[finite], g.adv_eps, g.adv_clip, g.adv_scale, sources)
            record["zero_std_frac"] = zero_std_fraction(rewards[finite])
        return ScoredStep(record, finite.tolist(), advantages)

    def close(self, step: int, record: dict, version: int, cursor: dict, save: Callable[[int], object],
              last: bool = False) -> None:
        """Log the finished step (policy `version` after it, prompt `cursor` where step + 1 starts), write a
        checkpoint when one is due (`save(steps_done)`; also when `last`, an early end), and stop here if a signal
        asked for it."""
        steps = self.cfg.run.steps
        first = record.get("first_update_max_abs_log_ratio")
        if first is not None and first > LOG_RATIO_ALARM and not record.get("staleness_max"):
            log.warning("step %d: the first update's max |log ratio| is %.3g on on-policy data (> %g): rollout and "
                        "learner log-probs disagree", step, first, LOG_RATIO_ALARM)
            self.run.store.event("log_ratio_alarm", step=step, value=first)
        dropped = record.get("behaviour_dropped_frac")
        if dropped is not None and dropped > DROPPED_ALARM:
            log.warning("step %d: the decoupled objective dropped %.0f%% of the step's terms (their behaviour policy "
                        "is further than grpo.behaviour_max_log_ratio from the learner's): raise it, or lower optim.lr",
                        step, 100 * dropped)
            self.run.store.event("behaviour_dropped_alarm", step=step, value=dropped)
        self._hacking_alarms(step, record)
        self.run.metrics.write(record)
        self.run.store.record_step(step, version, cursor, record)
        if self.run.tracker is not None:
            self.run.tracker.step(step, record)
        if (step + 1) % self.cfg.run.save_every == 0 or step + 1 == steps or last or self.stop:
            save(step + 1)
        if self.stop and step + 1 < steps:
            raise Interrupted(f"stopped by signal {self.stop[0]} after step {step}; checkpoint written: "
                              f"resubmit the same command to continue")

    def _hacking_alarms(self, step: int, record: dict) -> None:
        """Warn (and record a `reward_hacking_alarm` event) when a signal of HACKING_SIGNALS first falls below
        (1 - run.alarm_drop) times its first step's value; again only after it has recovered."""
        if self.first is None:
            self.first = record
            return
        floor = 1 - self.cfg.run.alarm_drop
        for key in HACKING_SIGNALS:
            start, now = self.first.get(key), record.get(key)
            if not start or start <= 0 or now is None:
                continue
            if now < floor * start and key not in self.alarmed:
                self.alarmed.add(key)
                log.warning("step %d: %s fell to %.4g from %.4g at the first step (below %.0f%%): the policy may be "
                            "hacking the reward", step, key, now, start, 100 * floor)
                self.run.store.event("reward_hacking_alarm", step=step, signal=key, value=now, first=start)
            elif now >= floor * start:
                self.alarmed.discard(key)
