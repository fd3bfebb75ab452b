"""Shared set-up for the benchmarks: tiny models built once under runs/bench-models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from safediff.common.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "runs" / "bench-models"


def tiny_models() -> Path:
    from safediff.common.models import build_tiny_bundle
    from safediff.reward_server.clip_model import build_tiny_clip

    if not (MODELS / "sd" / "model_index.json").is_file():
        build_tiny_bundle(MODELS / "sd")
        build_tiny_clip(MODELS / "clip")
    return MODELS


def demo_config(*overrides: str) -> Config:
    models = tiny_models()
    return load_config(REPO / "deploy/configs/cpu_demo.yaml", [
        f"model.pretrained={models / 'sd'}", f"reward.clip.model=local-dir:{models / 'clip'}",
        f"run.output_dir={REPO / 'runs' / 'bench'}", *overrides])


# The placement of the one-machine cluster: the learner rank and the reward actor on the head, one rollout actor
# per worker node (configs place them with these overrides).
PLACED = ("cluster.resources_per_rollout_actor={rollout_node: 1}", "cluster.resources_per_reward_actor={head_node: 1}",
          "cluster.resources_per_learner_worker={head_node: 1}")


@contextlib.contextmanager
def one_machine_cluster(workers: int, head_cpus: float = 2, worker_cpus: float = 1) -> Iterator:
    """A multi-node Ray cluster on this machine, connected: a head offering `head_node: 2` and `workers` worker
    nodes offering `rollout_node: 1` each, all separate raylets on 127.0.0.1 (Ray's `ray.cluster_utils.Cluster`).
    Yields the Cluster: `remove_node(node, allow_graceful=False)` is a lost node."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # ray.init resolves a loopback address to the machine's IP (services.resolve_ip_for_localhost), where this
    # loopback-only cluster does not listen; Ray's switch for single-machine clusters keeps it on loopback
    kept, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "resources": {"head_node": 2}, "node_ip_address": "127.0.0.1",
        "include_dashboard": False})
    try:
        for _ in range(workers):
            nodes.add_node(num_cpus=worker_cpus, resources={"rollout_node": 1}, node_ip_address="127.0.0.1")
        nodes.connect()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = kept


def node_of(actor) -> str:
    """The id of the node an actor runs on."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
