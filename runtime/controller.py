"""The distributed training recipe: the entrypoint of `safediff run` and of `ray job submit`.

A step's prompt groups travel: prompt stream -> rollout actor (trajectory, images) -> reward actor
(images by reference) -> here (rewards only: G floats per group) -> advantages -> learner ranks
(trajectories by reference) -> new adapter, published once -> every rollout actor, verified.
`RolloutPipeline` owns what is in flight (runtime/pipeline.py), `StepRecipe` what a step does with its
scored groups (runtime/recipe.py, shared with `safediff train`), the groups in runtime/groups.py the actors;
`RedTeam` (runtime/redteam.py) and `LiveEval` (runtime/live_eval.py) the attack and evaluation actors' schedules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from safediff.common.checkpoint import Checkpoint, Layout, export_weights, resume_point, write_checkpoint
from safediff.common.config import Config
from safediff.common.metrics import PhaseTimer
from safediff.common.prompts import PromptStream, read_prompt_file
from safediff.common.weight_sync import fetch_state
from safediff.reward_server.steering import DIAGNOSTICS
from safediff.runtime.cluster import check_resources, start_ray
from safediff.runtime.groups import Actors, start_actors
from safediff.runtime.live_eval import LiveEval
from safediff.runtime.pipeline import RolloutPipeline
from safediff.runtime.progress import StepProgress
from safediff.runtime.recipe import StepRecipe
from safediff.runtime.redteam import RedTeam
from safediff.runtime.session import RunContext, TrainResult, close_run, stop_requests, tracked_run
from safediff.runtime.telemetry import RayRunMetrics
from safediff.runtime.tracking import Tracker

log = logging.getLogger(__name__)


def run(cfg: Config, address: str | None = None, progress: bool = True, actors: Actors | None = None,
        resume: bool | None = None, make_probe=None) -> TrainResult:
    """Train with the Ray runtime; outputs as the single-process loop (`safediff.runtime.local.train`).
    `actors` replaces the actors built from the config (benchmarks pass no-op stand-ins); `resume` as
    in `safediff.runtime.session.tracked_run` (None: continue an unfinished previous job on this run id);
    `make_probe` builds the evaluation actor's probe (actors/eval_actor.py), needed with evaluation.every."""
    if cfg.evaluation.every and make_probe is None and actors is None:
        raise ValueError("evaluation.every needs a probe: `safediff run` passes the world's or the suite's")
    with tracked_run(cfg, resume) as session, stop_requests() as stop:
        start_ray(cfg, address)
        check_resources(cfg, ray.cluster_resources())
        prompts = PromptStream.from_config(cfg.prompts, cfg.run.seed)  # read before any actor starts: bad files fail
        if cfg.prompts.adversarial is not None:  # the attack actor's targets too, here rather than in the actor
            read_prompt_file(cfg.prompts.adversarial.targets)
        checkpoint = resume_point(session.run_dir, cfg, Layout.zero(cfg.cluster.zero_stage), session.store) \
            if session.resume else None
        session.metrics.truncate(checkpoint.step if checkpoint else 0)
        actors = actors or start_actors(cfg, make_probe)
        try:
            return _train(cfg, session, stop, actors, prompts, checkpoint, progress)
        finally:
            actors.kill()


def _train(cfg: Config, session: RunContext, stop: list[int], actors: Actors, prompts: PromptStream,
           checkpoint: Checkpoint | None, progress: bool) -> TrainResult:
    P, G, steps = cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.run.steps
    start, layout = checkpoint.step if checkpoint else 0, Layout.zero(cfg.cluster.zero_stage)
    redteam = None if actors.attack is None else \
        RedTeam(cfg.prompts.adversarial, actors.attack, prompts, session.store, session.run_dir, start)
    pipeline = RolloutPipeline(cfg, actors, prompts, session.store, start, redteam)
    recipe, telemetry = StepRecipe(cfg, session, stop), RayRunMetrics(cfg.run.name)
    live = None if actors.evaluator is None else LiveEval(cfg, actors.evaluator, session.store, session.run_dir, start)
    if checkpoint is not None:
        actors.learners.restore(checkpoint)
        prompts.load_state_dict(checkpoint.cursor)
    if checkpoint is not None or live is not None:
        initial = actors.learners.publish()  # the policy the run starts from
        if checkpoint is not None:
            pipeline.resume(checkpoint, initial)
        if live is not None:
            live.begin(start, initial)

    def save(done: int) -> None:
        write_checkpoint(session.run_dir, cfg, done, pipeline.version, fetch_state(pipeline.update),
                         actors.learners.trainer_states(), layout, pipeline.cursor_before(done), session.store,
                         pipeline.replay_states())

    grids = SampleGrids(session.track(start), cfg, actors)
    grids.request(start, pipeline.version)
    usage = Utilisation(len(actors.rollouts))
    end = steps  # earlier when the evaluations stop the run (evaluation.select.patience)
    shown = StepProgress(start, steps, progress)
    for step in range(start, steps):
        timer = PhaseTimer()
        with timer("wait_rollouts"):
            rollout = pipeline.collect(step)
        scored = recipe.score(step, pipeline.version, rollout.groups, rollout.rewards,
                              {name: rollout.diagnostic(name) for name in DIAGNOSTICS})
        record = {**scored.record, **rollout.record()}
        with timer("train"):
            if scored.advantages is not None:
                record.update(actors.learners.update(scored.kept(rollout.trajectories), scored.advantages, step))
            else:  # every group dropped: no update, but the version still counts the step (see staleness)
                actors.learners.skip()
        with timer("publish"):
            update = actors.learners.publish()
            pipeline.send(update)
        grids.request(step + 1, update.version)
        if live is not None:
            live.after_step(step + 1, update)
            record.update(live.collect(wait=step + 1 == steps))
            if live.should_stop() and step + 1 < steps:
                end = step + 1
        record.update(time_wait_rollouts=timer.seconds["wait_rollouts"], time_train=timer.seconds["train"],
                      time_publish=timer.seconds["publish"], sync_bytes=update.num_bytes,
                      sync_load_ms=pipeline.syncs.last_load_ms,
                      **usage.step(P * G, timer.seconds["wait_rollouts"] + timer.seconds["publish"], rollout.infos),
                      **(redteam.record(rollout.groups) if redteam is not None else {}))
        telemetry.record(record)
        recipe.close(step, record, pipeline.version, pipeline.cursor_before(step + 1), save, last=step + 1 == end)
        grids.collect()
        shown.step(record)
        if step + 1 == end < steps:
            session.store.event("early_stop", step=step, patience=cfg.evaluation.select.patience)
            log.warning("step %d: %d evaluations without a better adapter: training stops early", step,
                        cfg.evaluation.select.patience)
            break
    shown.close()
    if live is not None:
        live.collect(wait=True)  # evaluations still running after an early stop (in evaluations.jsonl)
    grids.collect(wait=True)
    actor_status = pipeline.finish()
    checksum = export_weights(fetch_state(pipeline.update), cfg, session.run_dir / "adapter", end,
                              pipeline.version, session.store)
    return TrainResult(run_dir=session.run_dir, metrics=close_run(cfg, session.metrics), checksum=checksum,
                       final_version=pipeline.version, actor_status=actor_status,
                       max_staleness_seen=pipeline.gate.max_seen)


@dataclass
class Utilisation:
    """Running totals behind a step record's throughput and idle fractions (since the first step began)."""

    rollout_actors: int
    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    learner_idle_s: float = 0.0  # waiting for rollouts, publishing
    actor_busy_s: float = 0.0    # generating, summed over actors

    def step(self, images: int, learner_idle_s: float, infos: list[dict]) -> dict[str, float]:
        self.images += images
        self.learner_idle_s += learner_idle_s
        self.actor_busy_s += sum(info["generate_s"] for info in infos)
        elapsed = time.perf_counter() - self.start
        return {"images_per_s": self.images / elapsed, "learner_idle_frac": self.learner_idle_s / elapsed,
                "actor_idle_frac": max(0.0, 1 - self.actor_busy_s / (self.rollout_actors * elapsed))}


class SampleGrids:
    """The sample grids of `safediff run`, rendered by the first rollout actor taking groups with the policy it was
    sent last (its calls run
    in order, so a render asked after an adapter update renders that update); the learner never waits for one
    except after the last step. A grid whose actor died is skipped with a warning: the next one comes `every`
    steps later."""

    def __init__(self, tracker: Tracker, cfg: Config, actors: Actors):
        self.tracker, self.cfg, self.actors = tracker, cfg, actors
        self.pending: list[tuple[int, ray.ObjectRef]] = []

    def request(self, done: int, version: int) -> None:
        """Ask for the grid of the policy `version`, trained for `done` steps, when one is due."""
        if self.tracker.wants_samples(done):
            self.pending.append((done, self.actors.rollouts.first_up().render.remote(
                self.tracker.sample_rows, version, self.tracker.sample_suite, self.cfg.tracking.images_per_prompt)))

    def collect(self, wait: bool = False) -> None:
        """Send the grids rendered by now (all of them with `wait`) to the tracker."""
        while self.pending and (wait or ray.wait([self.pending[0][1]], timeout=0)[0]):
            done, ref = self.pending.pop(0)
            try:
                self.tracker.samples(done, ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                log.warning("sample grid after step %d skipped: %s", done, str(err).splitlines()[0])
