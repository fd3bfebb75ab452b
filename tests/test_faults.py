"""Actor failures on a real local Ray cluster: the run finishes with every prompt group trained once."""

import threading
import time

import pytest
import ray

from safediff.runtime.controller import run
from safediff.runtime.groups import start_actors
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def _kill_when(run_dir, steps_done: int, actor) -> threading.Thread:
    """Kill `actor` (Ray restarts it) once metrics.jsonl holds `steps_done` records."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            path = run_dir / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= steps_done:
                ray.kill(actor, no_restart=False)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("victim", ["rollout", "reward"])
def test_a_killed_actor_is_restarted_and_no_group_is_lost_or_counted_twice(tiny_dir, tmp_path, prompt_file, victim,
                                                                           tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=4", "run.name=faults",
                      "cluster.rollout_actors=2", "cluster.reward_actors=1", "cluster.max_staleness=1",
                      "cluster.cpus_per_rollout_actor=0.5", "cluster.cpus_per_reward_actor=0.5",
                      "cluster.cpus_per_learner_worker=0.5")
    actors = start_actors(cfg)
    target = actors.rollouts[0] if victim == "rollout" else actors.rewards[0]
    killer = _kill_when(tmp_path / "runs" / "faults", 1, target)
    result = run(cfg, progress=False, actors=actors)
    killer.join()
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    assert [m["dropped_groups"] for m in result.metrics] == [0] * 4
    assert all(m["samples_trained"] == P * G for m in result.metrics)  # every group trained, none twice
    assert result.actor_status == [(4, result.checksum)] * 2  # the restarted actor was re-synced
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        retried = [e for e in RunStore(srv.url, "faults").events() if e["kind"] == "group_retried"]
    assert 1 <= len(retried) <= P * (cfg.cluster.max_staleness + 1)  # only groups in flight at the kill
    assert len({(e["step"], e["group"]) for e in retried}) == len(retried)  # each retried once
