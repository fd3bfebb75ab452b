"""Node loss on a real multi-node Ray cluster on one machine: a head and worker nodes as separate raylets
(Ray's own harness, `ray.cluster_utils.Cluster`), the roles placed on them by custom resources."""

import pytest
import ray
from ray.cluster_utils import Cluster

from safediff.runtime.controller import run
from safediff.runtime.groups import start_actors
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODE = {"num_cpus": 1, "resources": {"rollout_node": 1}, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def cluster():
    """A head for the learner rank and the reward actor, and three worker nodes with room for one rollout actor each
    (two rollout actors: one node is spare)."""
    with pytest.MonkeyPatch.context() as patch:
        # ray.init resolves a loopback address to the machine's IP (services.resolve_ip_for_localhost), where this
        # loopback-only cluster does not listen; Ray's switch for single-machine clusters keeps it on loopback
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        nodes = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"head_node": 2}, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        for _ in range(3):
            nodes.add_node(**NODE)
        nodes.connect()
        yield nodes
        ray.shutdown()
        nodes.shutdown()


def _placed(tiny_config, tiny_dir, tmp_path, prompt_file, name):
    return tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=3", f"run.name={name}", "cluster.max_staleness=0",
                       "cluster.rollout_actors=2", "cluster.cpus_per_rollout_actor=1",
                       "cluster.resources_per_rollout_actor={rollout_node: 1}",
                       "cluster.cpus_per_reward_actor=0.5", "cluster.resources_per_reward_actor={head_node: 1}",
                       "cluster.cpus_per_learner_worker=1", "cluster.resources_per_learner_worker={head_node: 1}")


def _node_id(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def test_a_lost_rollout_node_costs_its_groups_once_and_the_run_ends_as_an_uninterrupted_one(
        cluster, tiny_dir, tmp_path, prompt_file, tiny_config, when, steps_recorded):
    """After step 0 the worker node of rollout actor 0 dies with the actor and the objects it held (`remove_node`,
    no graceful shutdown): Ray restarts the actor on the spare node, the lost groups are generated again once, and
    the adapter is the uninterrupted run's (on-policy, so every retried group is the same group)."""
    reference = run(_placed(tiny_config, tiny_dir, tmp_path, prompt_file, "whole"), progress=False)
    cfg = _placed(tiny_config, tiny_dir, tmp_path, prompt_file, "preempted")
    actors = start_actors(cfg)
    victim = next(n for n in cluster.worker_nodes if n.node_id == _node_id(actors.rollouts[0]))
    watcher = when(steps_recorded(tmp_path / "runs" / "preempted", 1),
                   lambda: cluster.remove_node(victim, allow_graceful=False))
    result = run(cfg, progress=False, actors=actors)
    watcher.join()
    assert victim not in cluster.worker_nodes
    P, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    assert all(m["samples_trained"] == P * G and m["dropped_groups"] == 0 for m in result.metrics)
    assert result.actor_status == [(3, result.checksum)] * 2  # the restarted actor holds the final policy
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        retried = [(e["step"], e["group"]) for e in RunStore(srv.url, "preempted").events()
                   if e["kind"] == "group_retried"]
    assert retried and len(set(retried)) == len(retried)
    assert result.checksum == reference.checksum
