"""Node loss and a GCS restart on a real multi-node Ray cluster on one machine: a head and worker nodes as separate
raylets (Ray's own harness, `ray.cluster_utils.Cluster`, set up in bench/fixtures.py), the roles placed on them by
custom resources."""

import threading

import pytest

from bench.fixtures import node_of, one_machine_cluster
from safediff.common.errors import LearnerFailed
from safediff.runtime.controller import run
from safediff.runtime.groups import start_actors
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


# The reward actor on the head, one rollout actor per rollout node, the learner rank on the learner node; one group
# per UNet batch and per reward forward, so the numerics do not depend on how groups happened to meet in a batch (an
# actor taking a lost actor's groups renders them in the same call as its own).
PLACED = ("cluster.resources_per_rollout_actor={rollout_node: 1}", "cluster.resources_per_reward_actor={head_node: 1}",
          "cluster.resources_per_learner_worker={learner_node: 1}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head for the reward actor, two worker nodes with room for one rollout actor each (no spare) and a worker
    node for the learner rank; the GCS keeps its tables in a password-protected Redis (Ray's GCS fault
    tolerance)."""
    with EmbeddedRedis(tmp_path_factory.mktemp("gcs-redis")) as gcs_redis, \
            one_machine_cluster(workers=2, learner_nodes=1, gcs_redis=gcs_redis) as nodes:
        yield nodes


def _placed(tiny_config, tiny_dir, tmp_path, prompts, name):
    return tiny_config(tiny_dir, tmp_path, prompts, "run.steps=3", "run.save_every=1", f"run.name={name}",
                       "cluster.max_staleness=0", "cluster.rollout_actors=2", "cluster.cpus_per_rollout_actor=1",
                       "cluster.cpus_per_reward_actor=0.5", "cluster.cpus_per_learner_worker=1",
                       "reward.batch_max_images=8", "sampler.batch_size=8", *PLACED)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a bright image\na dark image\nan image\na picture of colour\n")
    return path


@pytest.fixture(scope="module")
def whole(cluster, tiny_dir, tmp_path_factory, prompts, tiny_config):
    """The undisturbed run, on the same cluster, that the disturbed ones are compared with."""
    return run(_placed(tiny_config, tiny_dir, tmp_path_factory.mktemp("whole"), prompts, "whole"), progress=False)


def test_a_lost_rollout_node_costs_its_groups_once_the_run_goes_on_and_a_new_node_takes_its_actor(
        cluster, whole, tiny_dir, tmp_path, prompts, tiny_config, before_step):
    """After step 0 the worker node of rollout actor 0 dies with the actor and the objects it held (`remove_node`,
    no graceful shutdown) and no node has room for it: its groups are generated again once on actor 1, which takes
    every group until, after step 1, a new node joins; Ray restarts the actor there and it is re-synced. The run ends
    on the uninterrupted run's adapter (on-policy, so every retried group is the same group)."""
    reference = whole
    cfg = _placed(tiny_config, tiny_dir, tmp_path, prompts, "preempted")
    actors = start_actors(cfg)
    victim = next(n for n in cluster.worker_nodes if n.node_id == node_of(actors.rollouts[0]))
    joined = []
    before_step(1, lambda _: cluster.remove_node(victim))
    before_step(2, lambda _: joined.append(cluster.add_node(1, "rollout_node").node_id))
    result = run(cfg, progress=False, actors=actors)
    assert victim not in cluster.worker_nodes and len(joined) == 1
    assert [m["rollout_actors_up"] for m in result.metrics][:2] == [2, 1]  # step 1 went on with one actor
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    assert all(m["samples_trained"] == P * G and m["dropped_groups"] == 0 for m in result.metrics)
    assert result.actor_status == [(3, result.checksum)] * 2  # the restarted actor holds the final policy
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        retried = [(e["step"], e["group"]) for e in RunStore(srv.url, "preempted").events()
                   if e["kind"] == "group_retried"]
    assert retried and len(set(retried)) == len(retried)
    # the same run, bit for bit: a retried group is the same group (its noise is a function of its coordinates), and
    # each group is scored in a CLIP forward of its own
    assert [m["reward_mean"] for m in result.metrics] == [m["reward_mean"] for m in reference.metrics]
    assert result.checksum == reference.checksum


def test_a_lost_learner_node_stops_the_job_and_resubmitting_on_a_new_node_ends_as_the_uninterrupted_run(
        cluster, whole, tiny_dir, tmp_path, prompts, tiny_config, before_step):
    """After the checkpoint of step 1 the node of the learner rank dies, taking its optimiser state: the job stops
    with a one-line error and the checkpoint behind it; a new learner node joins, and the same command again
    continues the run to the uninterrupted run's adapter."""
    cfg = _placed(tiny_config, tiny_dir, tmp_path, prompts, "learner-node")
    actors = start_actors(cfg)
    victim = next(n for n in cluster.worker_nodes if n.node_id == node_of(actors.learners[0]))
    before_step(2, lambda _: cluster.remove_node(victim))
    with pytest.raises(LearnerFailed, match=r"a learner rank died in '\w+' \(\w+\); the job stops here"):
        run(cfg, progress=False, actors=actors)
    assert (tmp_path / "runs" / "learner-node" / "checkpoints" / "step_1").is_dir()
    assert victim not in cluster.worker_nodes
    cluster.add_node(1, "learner_node")
    resumed = run(cfg, progress=False)
    assert resumed.checksum == whole.checksum
    assert [m["reward_mean"] for m in resumed.metrics] == [m["reward_mean"] for m in whole.metrics]
    assert resumed.actor_status == [(3, whole.checksum)] * 2


def test_a_gcs_restart_mid_run_loses_nothing(cluster, whole, tiny_dir, tmp_path, prompts, tiny_config, before_step):
    """With GCS fault tolerance the GCS server is killed as step 1 is sent out and started again 5 s later, while
    the step runs: the actors, their objects and the driver survive it (Ray's documented behaviour, here measured),
    no group is retried, and the run ends on the undisturbed run's adapter. (Step 2 waits for the restart.)"""
    cfg = _placed(tiny_config, tiny_dir, tmp_path, prompts, "gcs-restart")
    actors = start_actors(cfg)
    pids, after = _pids(actors), []

    def restart_gcs():
        cluster.restart_gcs(down_s=5)
        after.append(_pids(actors))  # the actors answer the driver again

    restarter = threading.Thread(target=restart_gcs)
    before_step(1, lambda _: restarter.start())
    before_step(2, lambda _: restarter.join())
    result = run(cfg, progress=False, actors=actors)
    assert after == [pids]  # the GCS was restarted during the run, and every actor is the same process
    assert result.checksum == whole.checksum
    assert result.actor_status == [(3, result.checksum)] * 2
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        assert not [e for e in RunStore(srv.url, "gcs-restart").events() if e["kind"] == "group_retried"]


def _pids(actors) -> list[int]:
    import os

    import ray

    every = [*actors.rollouts, *actors.rewards, *actors.learners]
    return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in every])
