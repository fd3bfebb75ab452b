"""The run's actors as groups, each called like one object with typed methods (verl's worker groups):
`RolloutGroup` (one actor per inference device), `RewardGroup` (CLIP reward actors), `LearnerGroup` (the
DeepSpeed ZeRO ranks in a placement group), with prompts.adversarial `AttackGroup` (the attack actor) and, with
evaluation.every, `EvalGroup` (the evaluation actor). Rollout, reward, attack and evaluation actors restart after
a crash (the pipeline re-syncs them and retries their work); a dead learner rank stops the run with
`LearnerFailed`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from safediff.actors.eval_actor import EvalActor
from safediff.actors.rollout_actor import RolloutActor
from safediff.common.checkpoint import Checkpoint, TrainerState
from safediff.common.config import Config
from safediff.common.errors import LearnerFailed
from safediff.common.messages import ActorBehind, AdapterUpdate, PromptGroup, check_report
from safediff.common.trainable import state_checksum
from safediff.learner.engine import LearnerWorker
from safediff.redteam.actor import AttackActor
from safediff.reward_server.actor import RewardActor

log = logging.getLogger(__name__)

# What a dead or restarted actor looks like from here: the task's actor died, an object its death lost,
# or (ActorBehind) a restarted actor that has not received the adapter its call needs yet.
LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError,
        ActorBehind)


class ActorGroup:
    """Actor handles; `group[i]`, `len(group)` and iteration reach the handles themselves."""

    def __init__(self, handles: list):
        self.handles = list(handles)

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, i: int):
        return self.handles[i]

    def __iter__(self):
        return iter(self.handles)

    def at(self, slot: int):
        """The actor that serves `slot` (slots wrap around the group)."""
        return self.handles[slot % len(self.handles)]

    def kill(self) -> None:
        for actor in self.handles:
            ray.kill(actor)


def answer_when_up(call, deadline: float):
    """ray.get(call()), calling again while Ray refuses calls to a restarting actor, until `deadline`
    (time.monotonic())."""
    while True:
        try:
            return ray.get(call())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _resync(actor, update: AdapterUpdate | None):
    """A reference to a (re)started policy-holding actor's answer once it holds `update` (None: the initial
    adapter, nothing to load)."""
    return actor.resync.remote(update) if update is not None else actor.status.remote()


def _restartable(actor_class, cfg: Config, count: int, cpus: float, gpus: float, *args,
                 resources: dict[str, float] | None = None) -> list:
    """`count` actors of `actor_class(cfg, *args)`, each reserving `cpus`, `gpus` and custom `resources`, restarted
    by Ray if they die (on any node that has the resources)."""
    return [actor_class.options(num_cpus=cpus, num_gpus=gpus, resources=resources or {}, max_restarts=-1)
            .remote(cfg, *args) for _ in range(count)]


class RolloutGroup(ActorGroup):
    """The rollout actors. One that lost a group is set aside: it gets no new groups until it answers again (Ray
    restarts it where its resources are free, which after a lost node may be only when a node joins), so the run
    goes on with the others meanwhile."""

    def __init__(self, handles: list):
        super().__init__(handles)
        self.aside: dict[int, ray.ObjectRef] = {}  # slot -> its pending probe (a status call)

    def set_aside(self, slot: int) -> None:
        self.aside.setdefault(slot, self.handles[slot].status.remote())

    def _answered(self, slot: int) -> bool:
        """Whether the actor set aside at `slot` has answered its probe; a probe answered by an error (the actor
        is still restarting) is sent again."""
        probe = self.aside[slot]
        if not ray.wait([probe], timeout=0)[0]:
            return False
        try:
            ray.get(probe)
            return True
        except LOST:
            self.aside[slot] = self.handles[slot].status.remote()
            return False

    def up(self) -> tuple[list[int], list[int]]:
        """(slots taking new groups, those of them that have just come back); an actor that has come back still
        needs the current adapter (its calls run in order: a resync sent before its next generation is enough)."""
        back = [slot for slot in list(self.aside) if self._answered(slot)]
        for slot in back:
            del self.aside[slot]
        return self._taking(), back

    def _taking(self) -> list[int]:
        """The slots not set aside."""
        return [s for s in range(len(self.handles)) if s not in self.aside]

    def first_up(self):
        """The first actor not set aside (actor 0 if all are)."""
        return self.handles[next(iter(self._taking()), 0)]

    def wait_back(self, timeout_s: float, every: bool = False) -> None:
        """Wait up to `timeout_s` for one actor set aside (`every`: all of them) to answer; `up` then reports it."""
        deadline = time.monotonic() + timeout_s
        while self.aside and time.monotonic() < deadline:
            answered = [slot for slot in list(self.aside) if self._answered(slot)]
            if answered and (not every or len(answered) == len(self.aside)):
                return
            time.sleep(0.5)

    @classmethod
    def create(cls, cfg: Config) -> RolloutGroup:
        c = cfg.cluster
        return cls(_restartable(RolloutActor, cfg, c.rollout_actors, c.cpus_per_rollout_actor,
                                c.gpus_per_rollout_actor, resources=c.resources_per_rollout_actor))

    def generate(self, groups: list[PromptGroup], slot: int, min_version: int) -> list[tuple]:
        """References to (trajectory without images, images, info) of each of `groups`, rendered together on actor
        `slot`."""
        refs = self.at(slot).generate.options(num_returns=3 * len(groups)).remote(groups, min_version)
        return [tuple(refs[3 * i:3 * i + 3]) for i in range(len(groups))]

    def load_adapter(self, update: AdapterUpdate) -> list:
        """Send `update` to every actor; references to their SyncReports."""
        return [actor.load_adapter.remote(update) for actor in self.handles]

    def status(self) -> list[tuple[int, str] | None]:
        """(policy version, checksum) held by each actor; None for one set aside."""
        answers = {s: self.handles[s].status.remote() for s in self._taking()}
        return [ray.get(answers[s]) if s in answers else None for s in range(len(self.handles))]


class RewardGroup(ActorGroup):
    @classmethod
    def create(cls, cfg: Config) -> RewardGroup:
        c = cfg.cluster
        return cls(_restartable(RewardActor, cfg, c.reward_actors, c.cpus_per_reward_actor, c.gpus_per_reward_actor,
                                resources=c.resources_per_reward_actor))

    def score(self, images, group: PromptGroup, group_size: int, slot: int):
        """A reference to the RewardOutput of a group's images (a reference to [G, 3, H, W] uint8) on actor
        `slot`; the images go from the rollout actor to the reward actor without passing through here."""
        return self.at(slot).score.remote(images, [group.prompt] * group_size, [group.unsafe] * group_size)


class LearnerGroup(ActorGroup):
    """The ranks of one DeepSpeed ZeRO engine; every call goes to all ranks and waits for all of them."""

    def __init__(self, handles: list, placement=None):
        super().__init__(handles)
        self.placement = placement

    @classmethod
    def create(cls, cfg: Config) -> LearnerGroup:
        """Reserve the ranks' placement group, start them, and form the process group."""
        c = cfg.cluster
        gpu = {"GPU": c.gpus_per_learner_worker} if c.gpus_per_learner_worker else {}
        bundle = {"CPU": c.cpus_per_learner_worker, **gpu, **c.resources_per_learner_worker}
        group = cls([], placement_group([bundle] * c.learner_workers, strategy="PACK"))
        try:
            ray.get(group.placement.ready(), timeout=600)
            env = {} if gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}
            group.handles = [
                LearnerWorker.options(num_cpus=c.cpus_per_learner_worker, num_gpus=c.gpus_per_learner_worker,
                                      runtime_env=env,
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(group.placement, i))
                .remote(cfg, i, c.learner_workers) for i in range(c.learner_workers)]
            master = ray.get(group.handles[0].address.remote())
            ray.get([w.setup.remote(*master) for w in group.handles])
        except BaseException:
            group.shutdown()
            raise
        return group

    def _all(self, what: str, refs: list) -> list:
        """Wait for every rank's answer; a dead rank becomes LearnerFailed."""
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            raise LearnerFailed(f"a learner rank died in '{what}' ({type(err).__name__}); the job stops here. "
                                f"Resubmit the same command to continue from the newest checkpoint") from err
        except ray.exceptions.ObjectLostError as err:  # a node lost between a step's collection and its update
            raise LearnerFailed(f"the learner's '{what}' lost its input ({type(err).__name__}); the job stops here. "
                                f"Resubmit the same command to continue from the newest checkpoint") from err

    def update(self, trajectories: list, advantages: torch.Tensor, step: int) -> dict[str, float]:
        """One GRPO step on every rank's shard (`trajectories`: references, fetched by the ranks themselves;
        `advantages` [P, G]); the ranks' diagnostics merged."""
        return merge_ranks(self._all("update", [w.update.remote(trajectories, advantages, step)
                                                for w in self.handles]))

    def skip(self) -> None:
        """A step whose groups were all dropped: no update, but the version still counts the step."""
        self._all("skip", [w.skip.remote() for w in self.handles])

    def publish(self) -> AdapterUpdate:
        """The current policy, put in the object store once by rank 0 (ZeRO-3 gathers on every rank)."""
        return self._all("publish", [w.publish.remote() for w in self.handles])[0]

    def trainer_states(self) -> list[TrainerState]:
        """Every rank's optimiser partition and RNG, for a checkpoint."""
        return self._all("trainer_state", [w.trainer_state.remote() for w in self.handles])

    def restore(self, checkpoint: Checkpoint) -> None:
        """Every rank back to the checkpoint (weights, its optimiser partition, RNG), checked by checksum."""
        weights = ray.put(checkpoint.weights)
        checksums = self._all("restore", [w.restore.remote(weights, checkpoint.version, trainer)
                                          for w, trainer in zip(self.handles, checkpoint.trainers)])
        expected = state_checksum(checkpoint.weights)
        if any(c != expected for c in checksums):
            raise RuntimeError(f"learner ranks restored {checksums} from {checkpoint.path}, expected {expected}")

    def shutdown(self) -> None:
        """Shut the ranks down cleanly if they answer, then kill them; never raises, so an error that ended
        the run is the one reported."""
        try:
            ray.get([w.shutdown.remote() for w in self.handles], timeout=120)
        except Exception as err:  # dead or hung ranks: they are killed below anyway
            log.warning("learner shutdown failed: %s", err)
        self.kill()
        if self.placement is not None:
            remove_placement_group(self.placement)


def merge_ranks(rank_metrics: list[dict]) -> dict[str, float]:
    """Average the ranks' diagnostics; the step-0 log-ratio and times take the max over ranks."""
    out = {}
    for key in rank_metrics[0]:
        values = [m[key] for m in rank_metrics if m.get(key) is not None]
        if not values:
            continue
        worst = "max_" in key or key.endswith("_s")
        out[key] = max(values) if worst else sum(values) / len(values)
    return out


class SideGroup(ActorGroup):
    """One policy-holding actor beside the training loop, sent every n-th adapter (the attack actor, the
    evaluation actor): its calls on one actor run in order, so a load sent before a call is in place for it."""

    name: str     # in messages
    retried: str  # the run store event of a lost call asked again

    def load_adapter(self, update: AdapterUpdate):
        """A reference to the actor's SyncReport for `update`."""
        return self[0].load_adapter.remote(update)

    def resync(self, update: AdapterUpdate | None, timeout_s: float = 600.0) -> None:
        """Wait for a restarting actor to answer and bring it to `update` (None: the initial adapter)."""
        answer_when_up(lambda: _resync(self[0], update), time.monotonic() + timeout_s)

    def answer(self, step: int, update: AdapterUpdate | None, report, result, ask_again, store):
        """The answer of a call for `step` (`result`), made on policy `update` (None: the initial adapter) after the
        load `report` (None: nothing loaded for it). If the actor died, it is re-synced to `update` and asked again,
        once, with `ask_again()`: the call is a function of the step and the policy, so the answer is the same."""
        for attempt in (0, 1):
            try:
                if report is not None:
                    check_report(ray.get(report), update, self.name)
                return ray.get(result)
            except LOST as err:
                if attempt:
                    raise
                log.warning("%s: the call of step %d was lost (%s); re-syncing it", self.name, step,
                            type(err).__name__)
                store.event(self.retried, step=step, error=type(err).__name__)
                self.resync(update)
                report, result = None, ask_again()
        raise AssertionError("unreachable")


class AttackGroup(SideGroup):
    """The attack actor of red-teaming in the loop (one)."""

    name, retried = "attack actor", "attack_retried"

    @classmethod
    def create(cls, cfg: Config) -> AttackGroup:
        c = cfg.cluster
        return cls(_restartable(AttackActor, cfg, 1, c.cpus_per_attack_actor, c.gpus_per_attack_actor))

    def attack(self, step: int, version: int):
        """A reference to the adversarial prompts of `step` against policy `version` (redteam/actor.py)."""
        return self[0].attack.remote(step, version)


class EvalGroup(SideGroup):
    """The evaluation actor of evaluation while training (one)."""

    name, retried = "evaluation actor", "evaluation_retried"

    @classmethod
    def create(cls, cfg: Config, make_probe) -> EvalGroup:
        c = cfg.cluster
        return cls(_restartable(EvalActor, cfg, 1, c.cpus_per_eval_actor, c.gpus_per_eval_actor, make_probe))

    def evaluate(self, step: int, version: int):
        """A reference to the evaluation of policy `version`, trained for `step` steps (actors/eval_actor.py)."""
        return self[0].evaluate.remote(step, version)


@dataclass
class Actors:
    rollouts: RolloutGroup
    rewards: RewardGroup
    learners: LearnerGroup
    attack: AttackGroup | None = None     # with prompts.adversarial
    evaluator: EvalGroup | None = None    # with evaluation.every

    def kill(self) -> None:
        """Shut the learner ranks down, then kill every actor; never raises."""
        self.learners.shutdown()
        self.rollouts.kill()
        self.rewards.kill()
        for group in (self.attack, self.evaluator):
            if group is not None:
                group.kill()

    def wait_until_ready(self, update: AdapterUpdate | None, rollout_slots: list[int],
                         timeout_s: float = 600.0) -> None:
        """Wait for the rollout actors `rollout_slots` and every reward actor to answer (a restarting one answers
        once restarted); those rollout actors get adapter `update` first."""
        deadline = time.monotonic() + timeout_s
        calls = [lambda a=self.rollouts[s]: _resync(a, update) for s in rollout_slots] + \
            [lambda r=r: r.batch_stats.remote() for r in self.rewards]
        for call in calls:
            answer_when_up(call, deadline)


def start_actors(cfg: Config, make_probe=None) -> Actors:
    """Create every actor and form the learner group; if any step fails, what was created is removed.
    `make_probe` builds the evaluation actor's probe (actors/eval_actor.py), needed with evaluation.every."""
    actors = Actors(RolloutGroup([]), RewardGroup([]), LearnerGroup([]))
    try:
        actors.rollouts = RolloutGroup.create(cfg)
        actors.rewards = RewardGroup.create(cfg)
        actors.learners = LearnerGroup.create(cfg)
        if cfg.prompts.adversarial is not None:
            actors.attack = AttackGroup.create(cfg)
        if cfg.evaluation.every:
            actors.evaluator = EvalGroup.create(cfg, make_probe)
    except BaseException:
        actors.kill()
        raise
    return actors
