"""Actor failures on a real local Ray cluster: the run finishes with every prompt group trained once."""

import contextlib
import os
import signal
import threading
import time

import pytest
import ray

from safediff.runtime.controller import run
from safediff.runtime.groups import start_actors
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _stop(pid: int, for_s: float | None = None) -> None:
    """SIGSTOP the process `pid`: for good (it answers nothing until killed), or resumed after `for_s` seconds."""
    os.kill(pid, signal.SIGSTOP)
    if for_s is not None:
        time.sleep(for_s)
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("hangs", ["rollout", "reward"])
def test_killed_hung_and_slow_actors_lose_no_group_and_count_none_twice(tiny_dir, tmp_path, prompt_file, hangs,
                                                                        tiny_config, before_step, restarts_awaited):
    """Three faults in one run (4 steps, two rollout actors, one reward actor, staleness 1). As step 2 is sent out,
    actor 0 of the role `hangs` stops answering (SIGSTOP, for good) and rollout actor 1 pauses for 3 s, well under
    the hang limit (at least 10 s, 4x the slowest step); as step 3 is, actor 0 of the other role is killed."""
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=4", "run.name=faults",
                      "cluster.rollout_actors=2", "cluster.reward_actors=1", "cluster.max_staleness=1",
                      "cluster.cpus_per_rollout_actor=0.5", "cluster.cpus_per_reward_actor=0.5",
                      "cluster.cpus_per_learner_worker=0.5", "cluster.hang_factor=4", "cluster.hang_min_s=10")
    actors = start_actors(cfg)
    hung, killed = (actors.rollouts[0], actors.rewards[0]) if hangs == "rollout" else \
        (actors.rewards[0], actors.rollouts[0])
    hung_pid, slow_pid = _pid(hung), _pid(actors.rollouts[1])
    pause = threading.Thread(target=_stop, args=(slow_pid, 3.0))
    before_step(2, lambda _: (_stop(hung_pid), pause.start()))
    before_step(3, lambda _: ray.kill(killed, no_restart=False))
    try:
        result = run(cfg, progress=False, actors=actors)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the run; if the run failed, not left stopped
            os.kill(hung_pid, signal.SIGKILL)
    pause.join()
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    assert [m["dropped_groups"] for m in result.metrics] == [0] * 4
    assert all(m["samples_trained"] == P * G for m in result.metrics)  # every group trained, none twice
    assert result.actor_status == [(4, result.checksum)] * 2  # the restarted actors were re-synced
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        events = RunStore(srv.url, "faults").events()
    assert {(e["role"], e["slot"]) for e in events if e["kind"] == "actor_hung"} == {(hangs, 0)}  # not the slow one
    retried = [(e["step"], e["group"]) for e in events if e["kind"] == "group_retried"]
    assert 2 <= len(retried) <= 2 * P * (cfg.cluster.max_staleness + 1)  # only groups in flight at each fault
    assert len(set(retried)) == len(retried)  # each retried once
