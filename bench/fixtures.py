"""Shared set-up for the benchmarks: tiny models built once under runs/bench-models."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from safediff.common.config import Config, load_config
from safediff.common.process import free_port
from safediff.runtime.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "runs" / "bench-models"


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (e.g. "AMD EPYC"), for the benchmarks' first line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def learner_phases(record: dict) -> dict[str, float]:
    """The learner's seconds per phase in a step record or update's metrics (`learner_<phase>_s`), by phase name."""
    return {key.removeprefix("learner_").removesuffix("_s"): value for key, value in record.items()
            if key.startswith("learner_") and key.endswith("_s")}


def saved_activation_bytes(module: torch.nn.Module, work: Callable[[], object]) -> int:
    """Bytes of the tensors autograd keeps for backward while `work()` runs (each storage once; `module`'s
    parameters excluded): the activation memory of a forward, counted the same way on any device. Tensors kept
    inside a gradient-checkpointed region are not kept, and not counted."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        work()
    return sum(kept.values())


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


class OneMachineCluster:
    """A multi-node Ray cluster on this machine: a head offering `head_node: 2` and worker nodes, all separate
    raylets on 127.0.0.1 (Ray's `ray.cluster_utils.Cluster`, here `.ray`).

    Every node operation runs on one thread that lives as long as the cluster: Ray starts a node's processes with
    PR_SET_PDEATHSIG, so they die with the thread that started them, and tests call these from watcher threads.
    For the same reason the nodes register no exit hooks (signal handlers need the main thread): `shutdown` stops
    them, and they die with this process in any case."""

    def __init__(self, head_cpus: float, gcs_redis: EmbeddedRedis | None):
        from ray.cluster_utils import Cluster

        self._keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-nodes")
        head = {"num_cpus": head_cpus, "resources": {"head_node": 2}, "node_ip_address": "127.0.0.1",
                "include_dashboard": False}
        if gcs_redis is not None:
            head["external_addresses"] = [f"127.0.0.1:{gcs_redis.port}"] * 2  # Ray's form: the primary, one shard
            head["num_redis_shards"] = 1
            head["redis_password"] = gcs_redis.password
            head["gcs_server_port"] = free_port()  # a restarted GCS must come back where the raylets look for it
        self.ray = self._on_keeper(
            lambda: Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=False))

    def _on_keeper(self, call):
        return self._keeper.submit(call).result()

    @property
    def worker_nodes(self) -> set:
        return self.ray.worker_nodes

    def add_node(self, cpus: float, resource: str):
        """A worker node offering `cpus` and `{resource: 1}`; returns Ray's node."""
        return self._on_keeper(lambda: self.ray.add_node(num_cpus=cpus, resources={resource: 1},
                                                         node_ip_address="127.0.0.1"))

    def remove_node(self, node) -> None:
        """A lost node: its processes killed, no graceful shutdown."""
        self._on_keeper(lambda: self.ray.remove_node(node, allow_graceful=False))

    def restart_gcs(self, down_s: float) -> None:
        """Kill the GCS server, wait `down_s`, start it again on the same port (needs `gcs_redis`)."""
        self._on_keeper(self.ray.head_node.kill_gcs_server)
        time.sleep(down_s)
        self._on_keeper(self.ray.head_node.start_gcs_server)

    def shutdown(self) -> None:
        self._on_keeper(self.ray.shutdown)
        self._keeper.shutdown()


@contextlib.contextmanager
def one_machine_cluster(workers: int, head_cpus: float = 2, worker_cpus: float = 1, learner_nodes: int = 0,
                        gcs_redis: EmbeddedRedis | None = None) -> Iterator[OneMachineCluster]:
    """A connected OneMachineCluster: the head, `workers` worker nodes offering `rollout_node: 1` each and
    `learner_nodes` offering `learner_node: 1` (configs place roles there with cluster.resources_per_*).

    With `gcs_redis` (a running Redis) the GCS keeps its tables there instead of in memory, Ray's GCS fault
    tolerance as `RAY_REDIS_ADDRESS=host:port ray start --head --redis-password P` sets it up, so `restart_gcs`
    is survivable."""
    import ray
    from ray._private import ray_constants

    # ray.init resolves a loopback address to the machine's IP (services.resolve_ip_for_localhost), where this
    # loopback-only cluster does not listen; Ray's switch for single-machine clusters keeps it on loopback
    kept, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    nodes = OneMachineCluster(head_cpus, gcs_redis)
    try:
        for _ in range(workers):
            nodes.add_node(worker_cpus, "rollout_node")
        for _ in range(learner_nodes):
            nodes.add_node(worker_cpus, "learner_node")
        nodes.ray.connect()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = kept


def node_of(actor) -> str:
    """The id of the node an actor runs on."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def timed(work) -> float:
    """Seconds one call of `work()` took."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def best_of(repeats: int, work) -> float:
    """The best time of `repeats` calls of `work()`, after one warm-up call."""
    work()  # warm-up
    return min(timed(work) for _ in range(repeats))


def best_in_turns(repeats: int, *works, warm_up: bool = True) -> list[float]:
    """The best time of each call, timed in turns (after one warm-up each unless `warm_up` is false), so that a
    slower spell of the machine (other processes, clock changes) falls on all alike."""
    if warm_up:
        for work in works:
            work()
    times: list[list[float]] = [[] for _ in works]
    for _ in range(repeats):
        for work, out in zip(works, times):
            out.append(timed(work))
    return [min(t) for t in times]
