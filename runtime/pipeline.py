"""The rollout pipeline: the groups in flight between the prompt stream and the learner.

It launches every step the staleness gate allows (k = `cluster.max_staleness`; k = 0 is synchronous and
on-policy), sends each new policy to the rollout actors before any generation that must use it (an actor
runs calls in order, so no extra barrier is needed), checks that every actor bound exactly what was
published, and hands the learner a step's scored groups, generating a lost group again exactly once. A group
that does not come back in time is lost too: the actor holding it is declared hung and killed (`HangWatch`). The
driver moves object references and small numbers, never image or latent tensors.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import ray
import torch

from safediff.common.checkpoint import Checkpoint
from safediff.common.config import Config
from safediff.common.messages import AdapterUpdate, PromptGroup, SyncReport, check_report
from safediff.common.prompts import PromptStream
from safediff.common.weight_sync import fetch_state, publish
from safediff.reward_server.steering import RewardOutput
from safediff.runtime.groups import LOST, Actors
from safediff.runtime.redteam import RedTeam
from safediff.runtime.run_store import RunStore
from safediff.runtime.staleness import StalenessGate

log = logging.getLogger(__name__)


@dataclass
class StepRollout:
    """One step's groups in flight: references only."""

    cursor: dict  # the prompt cursor before this step's groups were drawn (where a resume restarts)
    groups: list[PromptGroup]
    trajectories: list  # ObjectRef[Trajectory] per group
    rewards: list       # ObjectRef[RewardOutput] per group
    infos: list         # ObjectRef[dict] per group: policy version used, generate seconds
    slots: list         # per group: (rollout actor, reward actor) it was sent to
    launched: float = field(default_factory=time.monotonic)


@dataclass
class CollectedStep:
    """A step's groups with their rewards back; trajectories stay in the object store for the learner."""

    groups: list[PromptGroup]
    trajectories: list          # ObjectRef[Trajectory] per group
    scored: list[RewardOutput]  # per group
    infos: list[dict]           # per group
    staleness: list[int]        # per group: step - policy version that generated it
    groups_in_flight: int       # when the step was taken out of the pipeline
    rollout_actors_up: int      # rollout actors taking groups then (not set aside)

    @property
    def rewards(self) -> torch.Tensor:
        return torch.stack([s.rewards for s in self.scored]).float()  # [P, G]

    def diagnostic(self, name: str) -> torch.Tensor | None:
        """A reward diagnostic (`reward_server.steering.DIAGNOSTICS`) over all images, None when the reward gives
        none."""
        parts = [getattr(s, name) for s in self.scored]
        return None if any(p is None for p in parts) else torch.cat(parts)

    def record(self) -> dict:
        return {"staleness_max": max(self.staleness), "staleness_mean": sum(self.staleness) / len(self.staleness),
                "groups_in_flight": self.groups_in_flight, "rollout_actors_up": self.rollout_actors_up,
                "time_generate_mean": sum(i["generate_s"] for i in self.infos) / len(self.infos),
                "time_reward_batch_mean": sum(s.seconds or 0.0 for s in self.scored) / len(self.scored),
                **({"rollout_memory_max_mib": max(i["memory_max_mib"] for i in self.infos)}
                   if all("memory_max_mib" in i for i in self.infos) else {})}


@dataclass
class SyncTracker:
    """Sync reports still on their way back, checked against what the learner published, one per (update, rollout
    actor)."""

    pending: list[tuple[AdapterUpdate, int, ray.ObjectRef]] = field(default_factory=list)
    last_load_ms: float = 0.0

    def sent(self, update: AdapterUpdate, report_refs: list) -> None:
        self.pending += [(update, slot, ref) for slot, ref in enumerate(report_refs)]

    def check(self, block: bool, aside: set[int] = frozenset()) -> None:
        """Check the reports back by now (`block`: all of them, except those of actors set aside, which are
        dropped: an actor that comes back is re-synced)."""
        self.pending = [entry for entry in self.pending if entry[1] not in aside] if block else self.pending
        refs = [ref for _, _, ref in self.pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0) if refs else ([], [])
        ready, still = set(ready), []
        for update, slot, ref in self.pending:
            if ref not in ready:
                still.append((update, slot, ref))
                continue
            try:
                report: SyncReport = ray.get(ref)
            except LOST:  # the actor died: it is re-synced before it generates again (see collect)
                continue
            check_report(report, update, f"rollout actor {slot}")
            self.last_load_ms = report.load_ms
        self.pending = still


@dataclass
class HangWatch:
    """How long a group may take before the actor holding it is declared hung: `first_s` until a step has been
    measured, then `factor` times the slowest of the last 8 steps, and never less than `min_s`. A step is measured
    from its launch to its last group scored, so asynchronous steps queued behind each other are measured as they
    run, and a slow actor (every step slow) raises its own limit."""

    first_s: float
    factor: float
    min_s: float
    recent: deque = field(default_factory=lambda: deque(maxlen=8))

    @classmethod
    def from_config(cls, cfg: Config) -> HangWatch:
        c = cfg.cluster
        return cls(c.hang_first_s, c.hang_factor, c.hang_min_s)

    def limit(self) -> float:
        return self.first_s if not self.recent else max(self.min_s, self.factor * max(self.recent))

    def measured(self, seconds: float) -> None:
        self.recent.append(seconds)


class RolloutPipeline:
    def __init__(self, cfg: Config, actors: Actors, prompts: PromptStream, store: RunStore, start: int,
                 redteam: RedTeam | None = None):
        self.actors, self.prompts, self.store, self.redteam = actors, prompts, store, redteam
        self.P, self.G, self.steps = cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.run.steps
        K = cfg.cluster.max_staleness
        self.gate, self.syncs, self.hangs = StalenessGate(K, self.P), SyncTracker(), HangWatch.from_config(cfg)
        self.retries = cfg.cluster.group_retries
        self.recent: deque[AdapterUpdate] = deque(maxlen=K + 1)  # policies that may still be generating
        self.inflight: dict[int, StepRollout] = {}
        self.next_step = start  # the next step to launch
        self.update: AdapterUpdate | None = None  # the policy last sent (None: the seed-initialised one)

    @property
    def version(self) -> int:
        """The policy version last sent (0: the seed-initialised adapter every actor starts with)."""
        return self.update.version if self.update is not None else 0

    def send(self, update: AdapterUpdate) -> None:
        """Make `update` the policy of every generation launched from now on."""
        self.syncs.sent(update, self.actors.rollouts.load_adapter(update))
        self.update = update
        self.recent.append(update)

    def fill(self) -> None:
        """Launch every step the staleness gate allows with the policy last sent."""
        while self.next_step < self.steps and self.gate.may_start(self.next_step, self.version):
            self.inflight[self.next_step] = self._launch(self.next_step)
            self.next_step += 1

    def collect(self, step: int) -> CollectedStep:
        """Step `step`'s scored groups (the learner waits here). A group whose rollout or reward actor died or hung,
        or whose trajectory was lost with its node after its reward came back, is generated again on the next rollout
        actor that answers (re-synced first), up to `cluster.group_retries` times: its noise is a function of (seed,
        step, group, sample), so the retry is the same group, and it is counted and trained once. The rollout actor
        that lost it is set aside until it answers again."""
        self.fill()
        in_flight = sum(len(r.groups) for r in self.inflight.values())
        current = self.inflight.pop(step)
        answers, since, retries = [], current.launched, 0  # a retry restarts the clock of the groups after it
        for i in range(len(current.groups)):
            since, answer, tries = self._answer(step, i, current, since)
            answers.append(answer)
            retries += tries
        for i in self._lost_trajectories(current):  # lost with their node after their rewards came back
            since, answers[i], tries = self._answer(step, i, current, time.monotonic(), lost="TrajectoryLost")
            retries += tries
        if not retries:
            self.hangs.measured(time.monotonic() - current.launched)
        self.syncs.check(block=False)  # a failed adapter load surfaces here, before its stale groups do
        scored, infos = [reward for reward, _ in answers], [info for _, info in answers]
        staleness = [self.gate.record(step, info["policy_version"]) for info in infos]
        up = len(self.actors.rollouts) - len(self.actors.rollouts.aside)
        return CollectedStep(current.groups, current.trajectories, scored, infos, staleness, in_flight, up)

    def _answer(self, step: int, i: int, current: StepRollout, since: float,
                lost: str | None = None) -> tuple[float, tuple, int]:
        """Wait for group `i` of `current` (sent at `since`; `lost`: already lost, for that reason), sending it again
        while it is lost, up to `cluster.group_retries` times. Returns (when it was last sent, (reward, info),
        retries)."""
        error = lost
        for tries in range(self.retries + 1):
            try:
                if error is not None:
                    self._resend(step, i, current, error)
                    since = time.monotonic()
                self._kill_if_overdue(step, i, current, since)
                return since, tuple(ray.get([current.rewards[i], current.infos[i]])), tries
            except LOST as err:
                error = type(err).__name__
        raise RuntimeError(f"step {step} group {i} was lost {self.retries + 1} times (cluster.group_retries="
                           f"{self.retries}); the job stops here. Resubmit the same command to continue from the "
                           f"newest checkpoint")

    def _lost_trajectories(self, current: StepRollout) -> list[int]:
        """Groups of `current` whose trajectory is held only by nodes that are gone: made on a node lost after their
        rewards came back, before the learner fetched them. (An object small enough to live with its owner lists
        no node and is never lost this way.)"""
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        where = ray.experimental.get_object_locations(current.trajectories)
        return [i for i, ref in enumerate(current.trajectories)
                if where[ref]["node_ids"] and not alive.intersection(where[ref]["node_ids"])]

    def _resend(self, step: int, i: int, current: StepRollout, error: str) -> None:
        """Send group `i` of `current`, lost (`error`: why), to the rollout and reward actors of the next rollout
        actor that answers. The rollout actor that lost it is set aside (not when only its reward actor was lost)."""
        slot = current.slots[i][0]
        if _failed(current.infos[i]):
            self._set_aside(step, slot)
        up = self._live_slots(step)
        nxt = ([s for s in up if s > slot] or up)[0]
        log.warning("step %d group %d lost (%s); retrying on rollout actor %d", step, i, error, nxt)
        self.store.event("group_retried", step=step, group=i, error=error, slot=nxt)
        current.slots[i] = (nxt, nxt)
        try:
            self.actors.wait_until_ready(self.update, [nxt])
        except LOST:
            self._set_aside(step, nxt)
            raise
        current.trajectories[i], current.rewards[i], current.infos[i] = self._submit(current.groups[i], nxt)

    def _set_aside(self, step: int, slot: int) -> None:
        if slot not in self.actors.rollouts.aside:
            self.actors.rollouts.set_aside(slot)
            self.store.event("rollout_actor_set_aside", step=step, slot=slot)

    def _live_slots(self, step: int) -> list[int]:
        """The rollout actors taking new groups (one that has come back is sent the current adapter first); when
        none answers, wait up to `cluster.hang_first_s` for one to come back."""
        rollouts, deadline = self.actors.rollouts, time.monotonic() + self.hangs.first_s
        while True:
            up, back = rollouts.up()
            for slot in back:
                log.warning("rollout actor %d answers again and takes groups from now on", slot)
                self.store.event("rollout_actor_back", step=step, slot=slot)
                if self.update is not None:
                    rollouts[slot].resync.remote(self.update)
            if up:
                return up
            if time.monotonic() > deadline:
                raise RuntimeError(f"step {step}: no rollout actor answered for {self.hangs.first_s:.0f} s "
                                   f"(cluster.hang_first_s); the job stops here. Resubmit the same command to "
                                   f"continue from the newest checkpoint")
            log.warning("step %d: no rollout actor answers; waiting for one to come back", step)
            rollouts.wait_back(min(30.0, max(0.0, deadline - time.monotonic())))

    def cursor(self) -> dict:
        """Where the prompt stream stands now: its cursors and pool, and the red team's pending attack."""
        state = self.prompts.state_dict()
        if self.redteam is not None:
            state["redteam"] = self.redteam.state_dict()
        return state

    def cursor_before(self, step: int) -> dict:
        """The prompt cursor where `step` starts (a checkpoint's resume point)."""
        return self.inflight[step].cursor if step in self.inflight else self.cursor()

    def replay_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """The older policies a resume needs again, for a checkpoint: those still generating in-flight groups,
        and the one the red team's pending attack is made against."""
        older = list(self.recent) + ([self.redteam.pending_update()] if self.redteam is not None else [])
        return {u.version: fetch_state(u) for u in older if u is not None and 0 < u.version < self.update.version}

    def resume(self, checkpoint: Checkpoint, update: AdapterUpdate) -> None:
        """Replay the launches the interrupted job made after step `checkpoint.step` - 1, each with the policy
        it used then (the k previous ones, kept in the checkpoint), so the resumed run is the same run."""
        start = checkpoint.step
        older = {v: publish(state, v, update.module_count) for v, state in checkpoint.replay.items()}
        older[update.version] = update
        if self.redteam is not None and checkpoint.cursor.get("redteam") is not None:
            pending = checkpoint.cursor["redteam"]
            self.redteam.resume(pending["step"], older.get(pending["version"]))  # version 0: None, the initial one
        for v in range(max(0, start - self.gate.max_staleness), start + 1):
            if v > 0:  # version 0 is the seed-initialised adapter every actor starts with
                self.send(older[v] if v < start else update)
            self.fill()

    def finish(self) -> list[tuple[int, str] | None]:
        """Wait for the last syncs; an actor that restarted after it is brought up to date, and one set aside gets
        `cluster.hang_min_s` to come back. Returns each rollout actor's (version, checksum), None for one that did
        not come back."""
        rollouts = self.actors.rollouts
        rollouts.wait_back(self.hangs.min_s, every=True)
        up = self._live_slots(self.steps)
        self.syncs.check(block=True, aside=set(rollouts.aside))
        self.actors.wait_until_ready(self.update, up)
        for slot in rollouts.aside:
            log.warning("rollout actor %d did not come back before the end of the run", slot)
        return rollouts.status()

    def _kill_if_overdue(self, step: int, i: int, current: StepRollout, since: float) -> None:
        """Wait for group `i` of `current` (sent to its actors at `since`, monotonic) for the hang limit. Past it,
        kill the actor still holding the group (the rollout actor if the group's images are not made, else the
        reward actor): Ray restarts the actor, and a get of the group raises as for any lost actor."""
        refs = [current.infos[i], current.rewards[i]]
        ready, _ = ray.wait(refs, num_returns=2, timeout=max(0.0, since + self.hangs.limit() - time.monotonic()))
        if len(ready) == 2:
            return
        rollout_slot, reward_slot = current.slots[i]
        role, group, slot = ("rollout", self.actors.rollouts, rollout_slot) if len(ready) == 0 else \
            ("reward", self.actors.rewards, reward_slot)
        waited = time.monotonic() - since
        log.warning("step %d group %d not back after %.0f s: %s actor %d is declared hung and restarted", step, i,
                    waited, role, slot % len(group))
        self.store.event("actor_hung", step=step, group=i, role=role, slot=slot % len(group), waited_s=round(waited, 1))
        ray.kill(group.at(slot), no_restart=False)

    def _submit(self, group: PromptGroup, slot: int) -> tuple:
        """Generate one group on rollout actor `slot` and score it on reward actor `slot`: three references."""
        [(trajectory, images, info)] = self.actors.rollouts.generate([group], slot, self.version)
        return trajectory, self.actors.rewards.score(images, group, self.G, slot), info

    def _launch(self, step: int) -> StepRollout:
        """Draw step `step`'s groups and send them out: group i to the (i mod n)-th of the n rollout actors taking
        groups (each renders its groups in one call, in shared UNet batches) and then to reward actor i mod m."""
        cursor = self.cursor()  # before the red team's refresh at this step: a resume at `step` refreshes again
        if self.redteam is not None:
            self.redteam.before_launch(step, self.update)
        groups = self.prompts.next_groups(step, self.P)
        n = len(groups)
        out = StepRollout(cursor, groups, [None] * n, [None] * n, [None] * n, [None] * n)
        up = self._live_slots(step)
        for k, slot in enumerate(up[:n]):
            mine = list(range(k, n, len(up)))
            rendered = self.actors.rollouts.generate([groups[i] for i in mine], slot, self.version)
            for i, (trajectory, images, info) in zip(mine, rendered):
                out.trajectories[i], out.infos[i], out.slots[i] = trajectory, info, (slot, i)
                out.rewards[i] = self.actors.rewards.score(images, groups[i], self.G, i)
        return out


def _failed(ref: ray.ObjectRef) -> bool:
    """Whether the object `ref` (its task done or failed) cannot be had: its actor died."""
    try:
        ray.get(ref, timeout=0)
        return False
    except LOST:
        return True
    except ray.exceptions.GetTimeoutError:  # still running: the actor was declared hung and is being killed
        return True
