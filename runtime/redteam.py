"""Red-teaming in the loop (prompts.adversarial): the adversarial prompt source, refreshed by the attack actor
against the current policy on a fixed schedule, so a run stays reproducible and resumable.

    step s, s % every == 0   the source becomes the attack requested at s - every (the learner waits only if that
                             attack is not done yet: time_wait_attack), then an attack on the policy sent last is
                             requested, which the attack actor works on while training goes on
    steps [0, every)         no pool yet: the adversarial source has weight 0

A refresh happens when step s's groups are drawn (`RolloutPipeline._launch`), just after step s's prompt cursor is
taken, so a run resumed at s refreshes at s again. The pending request (its step and the policy version it
attacks) is part of that cursor and its policy's weights are kept in the checkpoint with the replay policies, so
the resumed run asks the actor for the same attack and gets the same prompts. Every installed prompt goes to
<run dir>/adversarial.jsonl with the step it was requested at, the step it was installed at and the policy
version it attacked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safediff.common.config import AdversarialConfig
from safediff.common.messages import AdapterUpdate
from safediff.common.metrics import MetricsLog
from safediff.common.prompts import AdversarialPool, PromptStream
from safediff.runtime.groups import AttackGroup
from safediff.runtime.run_store import RunStore

log = logging.getLogger(__name__)


@dataclass
class Request:
    """An attack asked of the actor: references to its result and to the actor's report of loading the policy."""

    step: int
    update: AdapterUpdate | None  # the policy attacked; None: the initial adapter (version 0)
    result: Any                   # ObjectRef[list[dict]]
    report: Any = None            # ObjectRef[SyncReport] when this request loaded `update`

    @property
    def version(self) -> int:
        return self.update.version if self.update is not None else 0


class RedTeam:
    def __init__(self, cfg: AdversarialConfig, group: AttackGroup, prompts: PromptStream, store: RunStore,
                 run_dir: Path, start: int):
        self.cfg, self.group, self.prompts, self.store = cfg, group, prompts, store
        self.log = MetricsLog(run_dir / "adversarial.jsonl")
        self.log.truncate(start)      # a resumed run installs the later pools again
        self.pending: Request | None = None
        self.loaded = 0               # the policy version the actor was last sent
        self.wait_s = 0.0             # waited for attacks since the last step record

    def before_launch(self, step: int, update: AdapterUpdate | None) -> None:
        """At a refresh step: install the pending attack's prompts, then attack `update` (the policy sent last)."""
        if step % self.cfg.every:
            return
        if self.pending is not None:
            began = time.perf_counter()
            found = self._collect()
            waited = time.perf_counter() - began
            self.wait_s += waited
            self._install(step, found, waited)
        self.pending = self._request(step, update)

    def state_dict(self) -> dict | None:
        """The pending request, for the prompt cursor of a checkpoint."""
        return None if self.pending is None else {"step": self.pending.step, "version": self.pending.version}

    def pending_update(self) -> AdapterUpdate | None:
        """The policy the pending request attacks (its weights go into a checkpoint)."""
        return None if self.pending is None else self.pending.update

    def resume(self, step: int, update: AdapterUpdate | None) -> None:
        """Ask again for the attack of `step` a checkpoint's cursor had pending, on `update` (its policy)."""
        self.pending = self._request(step, update)

    def record(self, groups: list) -> dict:
        """The step record's fields: how many of the step's groups (PromptGroup) are adversarial prompts, and the
        seconds waited for an attack at the refreshes since the last record."""
        waited, self.wait_s = self.wait_s, 0.0
        return {"adversarial_groups": sum(g.source == self.prompts.adversarial_source for g in groups),
                "time_wait_attack": waited}

    def _request(self, step: int, update: AdapterUpdate | None) -> Request:
        version, report = update.version if update is not None else 0, None
        if version > self.loaded:
            report, self.loaded = self.group.load_adapter(update), version
        return Request(step, update, self.group.attack(step, version), report)

    def _collect(self) -> list[dict]:
        """The pending attack's prompts (asked again, once, of a restarted attack actor: `SideGroup.answer`)."""
        r = self.pending
        found = self.group.answer(r.step, r.update, r.report, r.result, lambda: self.group.attack(r.step, r.version),
                                  self.store)
        self.loaded = max(self.loaded, r.version)
        return found

    def _install(self, step: int, found: list[dict], waited: float) -> None:
        request = self.pending
        self.prompts.set_pool(AdversarialPool(tuple(f["prompt"] for f in found), request.step, request.version))
        for record in found:
            self.log.write({"step": step, "requested_at": request.step, "policy_version": request.version, **record})
        self.store.event("adversarial_refresh", step=step, requested_at=request.step, policy_version=request.version,
                         prompts=len(found), wait_s=round(waited, 3))
        log.info("step %d: %d adversarial prompts from the attack on policy %d (waited %.1f s)", step, len(found),
                 request.version, waited)
