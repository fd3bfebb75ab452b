"""Node loss on a real multi-node Ray cluster on one machine: a head and worker nodes as separate raylets
(Ray's own harness, `ray.cluster_utils.Cluster`, set up in bench/fixtures.py), the roles placed on them by custom
resources."""

import pytest
import torch
from safetensors.torch import load_file

from bench.fixtures import PLACED, node_of, one_machine_cluster
from safediff.common.policy import Policy
from safediff.common.trainable import LoraTrainable
from safediff.runtime.controller import run
from safediff.runtime.groups import start_actors
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    """A head for the learner rank and the reward actor, and three worker nodes with room for one rollout actor each
    (two rollout actors: one node is spare)."""
    with one_machine_cluster(workers=3) as nodes:
        yield nodes


def _placed(tiny_config, tiny_dir, tmp_path, prompt_file, name):
    return tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=3", f"run.name={name}", "cluster.max_staleness=0",
                       "cluster.rollout_actors=2", "cluster.cpus_per_rollout_actor=1",
                       "cluster.cpus_per_reward_actor=0.5", "cluster.cpus_per_learner_worker=1", *PLACED)


def test_a_lost_rollout_node_costs_its_groups_once_and_the_run_trains_as_an_uninterrupted_one(
        cluster, tiny_dir, tmp_path, prompt_file, tiny_config, when, steps_recorded):
    """After step 0 the worker node of rollout actor 0 dies with the actor and the objects it held (`remove_node`,
    no graceful shutdown): Ray restarts the actor on the spare node, the lost groups are generated again once, and
    the update is the uninterrupted run's (on-policy, so every retried group is the same group)."""
    reference = run(_placed(tiny_config, tiny_dir, tmp_path, prompt_file, "whole"), progress=False)
    cfg = _placed(tiny_config, tiny_dir, tmp_path, prompt_file, "preempted")
    actors = start_actors(cfg)
    victim = next(n for n in cluster.worker_nodes if n.node_id == node_of(actors.rollouts[0]))
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
    # the same run: the same rewards, and the same update up to float summation order (probably: a retried group is
    # rendered alone, not batched with its actor's other groups; bit for bit in one run on this machine, not in another)
    assert all(abs(a["reward_mean"] - b["reward_mean"]) < 1e-5 for a, b in zip(reference.metrics, result.metrics))
    LoraTrainable(cfg.lora).save(Policy.from_config(cfg).state(), tmp_path / "init")  # the seed's adapter, exported
    init, ours, theirs = (load_file(str(folder / "pytorch_lora_weights.safetensors"))
                          for folder in (tmp_path / "init", reference.run_dir / "adapter", result.run_dir / "adapter"))
    delta_ours, delta_theirs = (torch.cat([(w[k] - init[k]).flatten() for k in init]) for w in (ours, theirs))
    assert (delta_ours - delta_theirs).norm() / delta_ours.norm() < 1e-3
