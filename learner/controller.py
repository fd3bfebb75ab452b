"""The distributed training recipe: the entrypoint of `safediff run` and of `ray job submit`.

A step's prompt groups travel: prompt stream -> rollout actor (trajectory, images) -> reward actor
(images by reference) -> here (rewards only: G floats per group) -> advantages -> learner ranks
(trajectories by reference) -> new adapter, published once -> every rollout actor, verified. The
driver moves object references and small numbers, never image or latent tensors.

Generation runs ahead of training within the staleness bound of `learner.staleness` (k =
`cluster.max_staleness`; k = 0 is synchronous and on-policy). An adapter update is sent to an actor
before any generation that must use it; an actor runs calls in order, so no extra barrier is needed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from actors.rollout_actor import ActorBehind, RolloutActor
from common.config import Config, ConfigError
from common.errors import LearnerFailed
from common.lora import state_checksum
from common.prompts import PromptStream
from common.run_store import Interrupted, RunStore
from common.telemetry import RayRunMetrics
from common.types import PromptGroup
from learner.checkpoint import Checkpoint, export_weights, resume_point, write_checkpoint
from learner.engine import LearnerWorker
from learner.grpo import group_advantages, zero_std_fraction
from learner.local import RunContext, TrainResult, close_run, stop_requests, tracked_run
from learner.staleness import StalenessGate
from learner.weight_sync import AdapterSyncError, AdapterUpdate, SyncReport, fetch_state, publish
from reward_server.actor import RewardActor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Cluster: resources, start-up, actors


def required_resources(cfg: Config) -> dict[str, float]:
    c = cfg.cluster
    return {
        "CPU": c.rollout_actors * c.cpus_per_rollout_actor + c.reward_actors * c.cpus_per_reward_actor
        + c.learner_workers * c.cpus_per_learner_worker,
        "GPU": c.rollout_actors * c.gpus_per_rollout_actor + c.reward_actors * c.gpus_per_reward_actor
        + c.learner_workers * c.gpus_per_learner_worker,
    }


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Refuse a topology the cluster cannot hold, naming the config fields to change."""
    need = required_resources(cfg)
    problems = [f"{kind}: the cluster section asks for {need[kind]:g}, the Ray cluster has "
                f"{available.get(kind, 0.0):g}"
                for kind in ("CPU", "GPU") if need[kind] > available.get(kind, 0.0) + 1e-9]
    if problems:
        raise ConfigError("config error: cluster.{rollout,reward}_actors / learner_workers and their "
                          "cpus_per_* / gpus_per_* do not fit: " + "; ".join(problems))


def start_ray(cfg: Config, address: str | None) -> None:
    """Connect to `address` (or RAY_ADDRESS, as under `ray job submit`), else start a local Ray on loopback."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = required_resources(cfg)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need["CPU"] + 0.999)),
             num_gpus=torch.cuda.device_count(), _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")


@dataclass
class Actors:
    rollouts: list
    rewards: list
    learners: list
    group: object | None  # the learners' placement group

    def kill(self) -> None:
        """Shut the learner ranks down cleanly if they answer, then kill every actor; never raises, so an
        error that ended the run is the one reported."""
        try:
            ray.get([w.shutdown.remote() for w in self.learners], timeout=120)
        except Exception as err:  # dead or hung ranks: they are killed below anyway
            log.warning("learner shutdown failed: %s", err)
        for actor in self.rollouts + self.rewards + self.learners:
            ray.kill(actor)
        if self.group is not None:
            remove_placement_group(self.group)


def start_actors(cfg: Config) -> Actors:
    """Create every actor and form the learner group; if any step fails, what was created is removed."""
    c = cfg.cluster
    actors = Actors([], [], [], None)
    try:
        # rollout and reward actors come back after a crash; the controller re-syncs and retries (see _collect)
        actors.rollouts = [RolloutActor.options(num_cpus=c.cpus_per_rollout_actor, num_gpus=c.gpus_per_rollout_actor,
                                                max_restarts=-1).remote(cfg) for _ in range(c.rollout_actors)]
        actors.rewards = [RewardActor.options(num_cpus=c.cpus_per_reward_actor, num_gpus=c.gpus_per_reward_actor,
                                              max_restarts=-1).remote(cfg) for _ in range(c.reward_actors)]
        gpu = {"GPU": c.gpus_per_learner_worker} if c.gpus_per_learner_worker else {}
        actors.group = placement_group([{"CPU": c.cpus_per_learner_worker, **gpu}] * c.learner_workers,
                                       strategy="PACK")
        ray.get(actors.group.ready(), timeout=600)
        env = {} if gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}
        actors.learners = [
            LearnerWorker.options(num_cpus=c.cpus_per_learner_worker, num_gpus=c.gpus_per_learner_worker,
                                  runtime_env=env,
                                  scheduling_strategy=PlacementGroupSchedulingStrategy(actors.group, i))
            .remote(cfg, i, c.learner_workers) for i in range(c.learner_workers)]
        master = ray.get(actors.learners[0].address.remote())
        ray.get([w.setup.remote(*master) for w in actors.learners])
    except BaseException:
        actors.kill()
        raise
    return actors


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class StepRollout:
    """One step's groups in flight: references only."""

    cursor: dict  # the prompt cursor before this step's groups were drawn (where a resume restarts)
    groups: list[PromptGroup]
    trajectories: list  # ObjectRef[Trajectory] per group
    rewards: list       # ObjectRef[RewardOutput] per group
    infos: list         # ObjectRef[dict] per group: policy version used, generate seconds


# What a dead or restarted actor looks like from here: the task's actor died, an object its death lost,
# or (ActorBehind) a restarted rollout actor that has not received the current adapter yet.
LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError,
        ActorBehind)


@dataclass
class SyncTracker:
    """Sync reports still on their way back, checked against what the learner published."""

    pending: list[tuple[AdapterUpdate, list]] = field(default_factory=list)
    last_load_ms: float = 0.0

    def sent(self, update: AdapterUpdate, report_refs: list) -> None:
        self.pending.append((update, report_refs))

    def check(self, block: bool) -> None:
        still = []
        for update, refs in self.pending:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
            if len(ready) < len(refs):
                still.append((update, refs))
                continue
            reports: list[SyncReport] = []
            for i, ref in enumerate(refs):
                try:
                    report = ray.get(ref)
                except LOST:  # the actor died: it is re-synced before it generates again (see _collect)
                    continue
                if (report.version, report.checksum, report.modules_bound) != \
                        (update.version, update.checksum, update.module_count):
                    raise AdapterSyncError(f"rollout actor {i} reports {report} for published version "
                                           f"{update.version} ({update.checksum[:12]}, {update.module_count} modules)")
                reports.append(report)
            self.last_load_ms = max((r.load_ms for r in reports), default=self.last_load_ms)
        self.pending = still


def _submit(actors: Actors, group: PromptGroup, G: int, slot: int, min_version: int) -> tuple:
    """Generate on rollout actor `slot` (mod count) and score on reward actor `slot`: three references."""
    trajectory, images, info = actors.rollouts[slot % len(actors.rollouts)].generate.remote(group, min_version)
    reward = actors.rewards[slot % len(actors.rewards)].score.remote(images, [group.prompt] * G, [group.unsafe] * G)
    return trajectory, reward, info


def _launch(actors: Actors, prompts: PromptStream, step: int, P: int, G: int, min_version: int) -> StepRollout:
    cursor = prompts.state_dict()
    out = StepRollout(cursor, prompts.next_groups(step, P), [], [], [])
    for i, group in enumerate(out.groups):
        trajectory, reward, info = _submit(actors, group, G, i, min_version)
        out.trajectories.append(trajectory)
        out.rewards.append(reward)
        out.infos.append(info)
    return out


def _wait_until_ready(actors: Actors, update: AdapterUpdate | None, timeout_s: float = 600.0) -> None:
    """Wait for restarting actors to answer; a restarted rollout actor gets the current adapter first."""
    deadline = time.monotonic() + timeout_s
    calls = [lambda a=a: a.resync.remote(update) if update is not None else a.status.remote()
             for a in actors.rollouts] + [lambda r=r: r.batch_stats.remote() for r in actors.rewards]
    for call in calls:
        while True:
            try:
                ray.get(call())
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: Ray refuses calls until it is back
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _collect(actors: Actors, current: StepRollout, G: int, update: AdapterUpdate | None, version: int,
             store: RunStore) -> tuple[list, list]:
    """Rewards and infos of every group of a step. A group whose rollout or reward actor died is generated
    again, exactly once, on the next actors (after re-syncing them): its noise is a function of (seed, step,
    group, sample), so the retry is the same group, and it is counted and trained once."""
    scored, infos = [], []
    for i, group in enumerate(current.groups):
        try:
            reward, info = ray.get([current.rewards[i], current.infos[i]])
        except LOST as err:
            slot = i + 1
            log.warning("step %d group %d lost (%s); retrying on rollout actor %d", group.step, i,
                        type(err).__name__, slot % len(actors.rollouts))
            store.event("group_retried", step=group.step, group=i, error=type(err).__name__)
            _wait_until_ready(actors, update)
            current.trajectories[i], current.rewards[i], current.infos[i] = _submit(actors, group, G, slot, version)
            reward, info = ray.get([current.rewards[i], current.infos[i]])
        scored.append(reward)
        infos.append(info)
    return scored, infos


def _on_learners(actors: Actors, call: str, *args, per_rank: list[tuple] | None = None) -> list:
    """Call `call` on every learner rank (with `args`, or rank i with `per_rank[i]`) and wait; a dead rank
    becomes LearnerFailed."""
    try:
        return ray.get([getattr(w, call).remote(*(per_rank[i] if per_rank else args))
                        for i, w in enumerate(actors.learners)])
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
        raise LearnerFailed(f"a learner rank died in '{call}' ({type(err).__name__}); the job stops here. "
                            f"Resubmit the same command to continue from the newest checkpoint") from err


def run(cfg: Config, address: str | None = None, progress: bool = True, actors: Actors | None = None,
        resume: bool | None = None) -> TrainResult:
    """Train with the Ray runtime; outputs as the single-process loop (`learner.local.train`).
    `actors` replaces the actors built from the config (benchmarks pass no-op stand-ins); `resume` as
    in `learner.local.tracked_run` (None: continue an unfinished previous job on this run id)."""
    with tracked_run(cfg, resume) as tracked, stop_requests() as stop:
        return _run(cfg, tracked, address, progress, actors, stop)


def _run(cfg: Config, tracked: RunContext, address: str | None, progress: bool, actors: Actors | None,
         stop: list[int]) -> TrainResult:
    metrics, store = tracked.metrics, tracked.store
    run_dir = metrics.path.parent
    start_ray(cfg, address)
    check_resources(cfg, ray.cluster_resources())
    ray_metrics = RayRunMetrics(cfg.run.name)
    prompts = PromptStream(cfg.prompts.sources, cfg.run.seed)  # read before any actor starts: bad files fail fast
    layout = f"zero{cfg.cluster.zero_stage}"
    checkpoint = resume_point(run_dir, cfg, layout, store) if tracked.resume else None
    start = checkpoint.step if checkpoint else 0
    metrics.truncate(start)
    unet_config = None
    if cfg.model.finetune == "full":
        from diffusers import UNet2DConditionModel

        unet_config = dict(UNet2DConditionModel.load_config(cfg.model.pretrained, subfolder="unet"))
    actors = actors or start_actors(cfg)
    P, G, K, steps = cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.cluster.max_staleness, cfg.run.steps
    gate, syncs = StalenessGate(K, P), SyncTracker()
    recent: deque[AdapterUpdate] = deque(maxlen=K + 1)  # policies that may still be generating (for checkpoints)
    inflight: dict[int, StepRollout] = {}
    next_gen, version_sent, update = start, 0, None
    images_done, idle_learner_s, busy_actor_s = 0, 0.0, 0.0

    def send(new: AdapterUpdate) -> None:
        nonlocal version_sent
        syncs.sent(new, [a.load_adapter.remote(new) for a in actors.rollouts])
        version_sent = new.version
        recent.append(new)

    def launch_allowed() -> None:
        nonlocal next_gen
        while next_gen < steps and gate.may_start(next_gen, version_sent):
            inflight[next_gen] = _launch(actors, prompts, next_gen, P, G, version_sent)
            next_gen += 1

    def cursor_before(step: int) -> dict:
        return inflight[step].cursor if step in inflight else prompts.state_dict()

    def save(done: int) -> None:
        trainers = _on_learners(actors, "trainer_state")
        replay = {u.version: fetch_state(u) for u in recent if 0 < u.version < update.version}
        write_checkpoint(run_dir, cfg, done, update.version, fetch_state(update), trainers, layout,
                         cursor_before(done), unet_config, store, replay)

    try:
        if checkpoint is not None:
            _restore(actors, checkpoint, prompts)
            update = _on_learners(actors, "publish")[0]
            # Replay the launches the interrupted job made after step `start` - 1, each with the policy it used
            # then (the k previous ones, kept in the checkpoint), so the resumed run is the same run.
            older = {v: publish(state, v, update.module_count) for v, state in checkpoint.replay.items()}
            for v in range(max(0, start - K), start + 1):
                if v > 0:  # version 0 is the seed-initialised adapter every actor starts with
                    send(older[v] if v < start else update)
                else:
                    version_sent = 0
                launch_allowed()
        t_start = time.perf_counter()
        for step in tqdm(range(start, steps), desc="train", unit="step", disable=not progress, initial=start,
                         total=steps):
            t0 = time.perf_counter()
            launch_allowed()
            groups_in_flight = sum(len(r.groups) for r in inflight.values())
            current = inflight.pop(step)
            scored, infos = _collect(actors, current, G, update, version_sent, store)  # the learner waits here
            t_wait = time.perf_counter()
            idle_learner_s += t_wait - t0
            syncs.check(block=False)  # a failed adapter load surfaces here, before its stale groups do
            staleness = [gate.record(step, info["policy_version"]) for info in infos]
            busy_actor_s += sum(info["generate_s"] for info in infos)

            rewards = torch.stack([s.rewards for s in scored]).float()  # [P, G]
            finite = torch.isfinite(rewards).all(dim=1)
            record = {"step": step, "policy_version": version_sent, "dropped_groups": int((~finite).sum()),
                      "reward_mean": float(rewards[finite].mean()) if finite.any() else None,
                      "reward_std": float(rewards[finite].std()) if finite.sum() * G > 1 else 0.0,
                      "cos_prompt_mean": _mean_of([s.cos_prompt for s in scored]),
                      "cos_safe_mean": _mean_of([s.cos_safe for s in scored]),
                      "staleness_max": max(staleness), "staleness_mean": sum(staleness) / len(staleness),
                      "groups_in_flight": groups_in_flight, "time_wait_rollouts": t_wait - t0,
                      "time_generate_mean": sum(i["generate_s"] for i in infos) / len(infos),
                      "time_reward_batch_mean": sum(s.seconds or 0.0 for s in scored) / len(scored)}
            if finite.any():
                kept = [ref for ref, ok in zip(current.trajectories, finite.tolist()) if ok]
                sources = torch.tensor([g.source for g in current.groups])[finite]
                advantages = group_advantages(rewards[finite], cfg.grpo.adv_eps, cfg.grpo.adv_clip,
                                              cfg.grpo.adv_scale, sources)
                record["zero_std_frac"] = zero_std_fraction(rewards[finite])
                record.update(_merge_ranks(_on_learners(actors, "update", kept, advantages, step)))
            else:  # every group dropped: no update, but the version still counts the step (see staleness)
                _on_learners(actors, "skip")
            t_train = time.perf_counter()
            update = _on_learners(actors, "publish")[0]
            record.update(time_train=t_train - t_wait, time_publish=time.perf_counter() - t_train,
                          sync_bytes=update.num_bytes)
            send(update)
            idle_learner_s += time.perf_counter() - t_train
            images_done += P * G
            elapsed = time.perf_counter() - t_start
            record.update(sync_load_ms=syncs.last_load_ms, images_per_s=images_done / elapsed,
                          learner_idle_frac=idle_learner_s / elapsed,
                          actor_idle_frac=max(0.0, 1 - busy_actor_s / (len(actors.rollouts) * elapsed)))
            metrics.write(record)
            ray_metrics.record(record)
            store.record_step(step, version_sent, cursor_before(step + 1), record)
            if (step + 1) % cfg.run.save_every == 0 or step + 1 == steps or stop:
                save(step + 1)
            if stop and step + 1 < steps:
                raise Interrupted(f"stopped by signal {stop[0]} after step {step}; checkpoint written: "
                                  f"resubmit the same command to continue")
        syncs.check(block=True)
        _wait_until_ready(actors, update)  # an actor that restarted after the last sync is brought up to date
        actor_status = ray.get([a.status.remote() for a in actors.rollouts])
        checksum = export_weights(fetch_state(update), cfg, run_dir / "adapter", steps, update.version,
                                   unet_config, store)
    finally:
        actors.kill()
    return TrainResult(run_dir=run_dir, metrics=close_run(cfg, metrics), checksum=checksum,
                       final_version=update.version, actor_status=actor_status, max_staleness_seen=gate.max_seen)


def _restore(actors: Actors, checkpoint: Checkpoint, prompts: PromptStream) -> None:
    """Every learner rank back to the checkpoint (weights, its optimiser partition, RNG); the prompt cursor."""
    weights = ray.put(checkpoint.weights)
    checksums = _on_learners(actors, "restore",
                             per_rank=[(weights, checkpoint.version, t) for t in checkpoint.trainers])
    expected = state_checksum(checkpoint.weights)
    if any(c != expected for c in checksums):
        raise RuntimeError(f"learner ranks restored {checksums} from {checkpoint.path}, expected {expected}")
    prompts.load_state_dict(checkpoint.cursor)


def _mean_of(parts: list[torch.Tensor | None]) -> float | None:
    if any(p is None for p in parts):
        return None
    return float(torch.cat(parts).float().mean())


def _merge_ranks(rank_metrics: list[dict]) -> dict[str, float]:
    """Average the ranks' diagnostics; the step-0 log-ratio and times take the max over ranks."""
    out = {}
    for key in rank_metrics[0]:
        values = [m[key] for m in rank_metrics if m.get(key) is not None]
        if not values:
            continue
        worst = key.startswith("first_update") or key.endswith("_s")
        out[key] = max(values) if worst else sum(values) / len(values)
    return out
