"""Rollout actors that die and stay away, come back late, or die again on a group's retry, on a real local Ray
cluster. The controller is the real one; the actors are the no-op stand-ins of the controller benchmarks
(bench/standins.py, bench/controller_overhead.py) with faults placed at a chosen group, so every case is exact and
takes seconds."""

import os
import time
from pathlib import Path

import pytest
import ray

from bench.controller_overhead import noop_actors
from bench.fixtures import demo_config
from bench.standins import Rollout
from safediff.runtime.controller import run
from safediff.runtime.groups import RolloutGroup
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

ACTORS = 3


@ray.remote(num_cpus=0, max_restarts=-1)
class FaultyRollout(Rollout):
    """A stand-in that dies (the whole process) while rendering a group whose fault file in `faults` still counts
    faults. Each start of slot s counts in `starts-<s>`; with `released`, a restart waits for the file
    `release-<s>` before it answers, then writes `back-<s>`. It records the step of each generate call."""

    def __init__(self, faults: str, slot: int, released: bool = False):
        super().__init__()
        self.faults, self.slot = Path(faults), slot
        starts = self.faults / f"starts-{slot}"
        starts.write_text(str(int(starts.read_text()) + 1 if starts.exists() else 1))
        if int(starts.read_text()) > 1 and released:
            while not (self.faults / f"release-{slot}").exists():
                time.sleep(0.1)
            (self.faults / f"back-{slot}").touch()

    def generate(self, groups, min_version=0):
        for g in groups:
            fault = self.faults / f"fault-{g.step}-{g.group_index}"
            if fault.exists() and int(fault.read_text()) > 0:
                fault.write_text(str(int(fault.read_text()) - 1))
                os._exit(1)
        calls = self.faults / f"calls-{self.slot}"
        calls.write_text(calls.read_text() + f"{groups[0].step} " if calls.exists() else f"{groups[0].step} ")
        return super().generate(groups, min_version)


def _config(tmp_path: Path, *overrides: str):
    return demo_config(f"run.output_dir={tmp_path / 'runs'}", "run.name=fewer", "run.steps=12", "run.save_every=100",
                       "grpo.prompts_per_step=3", "grpo.updates_per_step=1", "grpo.micro_batch_size=8",
                       f"cluster.rollout_actors={ACTORS}", "cluster.cpus_per_rollout_actor=0.01",
                       "cluster.max_staleness=0", "cluster.hang_min_s=20", "tracking.every=1000000", *overrides)


def _actors(faults: Path, released: bool = False):
    actors = noop_actors(ACTORS, rewards=1)
    actors.rollouts.kill()
    actors.rollouts = RolloutGroup([FaultyRollout.remote(str(faults), slot, released) for slot in range(ACTORS)])
    return actors


def _events(result) -> list[dict]:
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        return RunStore(srv.url, "fewer").events()


def test_a_group_lost_again_on_its_retries_is_retried_until_the_limit(tmp_path, restarts_awaited):
    """Step 2's group 0 kills every actor that renders it, twice in a row: it is generated again on the next actor
    each time and trained once; lost four times with group_retries 3, the job stops with a one-line error."""
    (tmp_path / "fault-2-0").write_text("2")
    result = run(_config(tmp_path), progress=False, actors=_actors(tmp_path), resume=False)
    assert [m["dropped_groups"] for m in result.metrics] == [0] * 12
    retried = [(e["step"], e["group"], e["slot"]) for e in _events(result) if e["kind"] == "group_retried"]
    assert retried == [(2, 0, 1), (2, 0, 2)]  # group 0 was on actor 0; each retry went to the next actor up
    aside = [(e["step"], e["slot"]) for e in _events(result) if e["kind"] == "rollout_actor_set_aside"]
    assert aside == [(2, 0), (2, 1)]
    assert result.actor_status == [(12, "")] * ACTORS  # both came back (restarted at once) and were re-synced

    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "fault-2-0").write_text("4")
    with pytest.raises(RuntimeError, match=r"step 2 group 0 was lost 4 times \(cluster.group_retries=3\); the job "
                                           r"stops here"):
        run(_config(tmp_path / "again"), progress=False, actors=_actors(tmp_path / "again"), resume=False)


def test_the_run_goes_on_without_an_actor_that_does_not_come_back(tmp_path, before_step, kill_for_good):
    """Before step 4 actor 1 dies for good (no restart, as when its node is gone and none takes it): its group of
    step 4 is generated again on another, and the steps after it are launched on the two that answer."""
    actors = _actors(tmp_path)
    victim = actors.rollouts[1]
    before_step(4, lambda _: kill_for_good(victim))
    result = run(_config(tmp_path), progress=False, actors=actors, resume=False)
    assert [m["dropped_groups"] for m in result.metrics] == [0] * 12
    up = [m["rollout_actors_up"] for m in result.metrics]
    assert up[:4] == [3] * 4 and up[4:] == [2] * 8  # counted after each step: step 4 lost actor 1
    assert result.actor_status == [(12, ""), None, (12, "")]
    assert (tmp_path / "calls-1").read_text().split() == ["0", "1", "2", "3"]  # nothing rendered once dead
    retried = [(e["step"], e["group"]) for e in _events(result) if e["kind"] == "group_retried"]
    assert retried == [(4, 1)]


def test_an_actor_that_comes_back_late_takes_groups_again(tmp_path, before_step, wait_for):
    """Before step 4 actor 0 is killed and restarts, but answers only once released before step 7: the run goes on
    with the others meanwhile, and once it answers it is re-synced and gets groups again. (The driver waits for it
    before step 8, so that it is seen back at step 7 or 8 however slow the machine.)"""
    actors = _actors(tmp_path, released=True)
    victim = actors.rollouts[0]

    def kill(_):
        ray.kill(victim, no_restart=False)
        wait_for(lambda: (tmp_path / "starts-0").read_text() == "2", "actor 0's restart")
    before_step(4, kill)
    before_step(7, lambda _: (tmp_path / "release-0").touch())
    before_step(8, lambda pipeline: pipeline.actors.rollouts.wait_back(300))
    result = run(_config(tmp_path, "run.steps=16"), progress=False, actors=actors, resume=False)
    events = _events(result)
    assert [e["step"] for e in events if e["kind"] == "rollout_actor_set_aside" and e["slot"] == 0] == [4]
    back = [e["step"] for e in events if e["kind"] == "rollout_actor_back" and e["slot"] == 0]
    assert len(back) == 1 and back[0] in (7, 8)
    up = [m["rollout_actors_up"] for m in result.metrics]
    assert up[4:7] == [2, 2, 2] and up[8:] == [3] * 8  # counted after each step
    assert result.actor_status == [(16, "")] * ACTORS
    calls = [int(s) for s in (tmp_path / "calls-0").read_text().split()]
    assert calls[:4] == [0, 1, 2, 3] and calls[-8:] == list(range(8, 16))  # rendering again to the end
