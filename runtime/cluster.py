"""The Ray cluster a run uses: what the config's topology needs, and connecting to (or starting) Ray."""

from __future__ import annotations

import logging
import os

import ray
import torch

from safediff.common.config import Config, ConfigError

log = logging.getLogger(__name__)


def required_resources(cfg: Config) -> dict[str, float]:
    """The cluster's totals the config asks for: CPU, GPU and each custom resource of cluster.resources_per_*."""
    c, attackers, evaluators = cfg.cluster, int(cfg.prompts.adversarial is not None), int(cfg.evaluation.every > 0)
    custom: dict[str, float] = {}
    for count, per_actor in ((c.rollout_actors, c.resources_per_rollout_actor),
                             (c.reward_actors, c.resources_per_reward_actor),
                             (c.learner_workers, c.resources_per_learner_worker)):
        for name, amount in per_actor.items():
            custom[name] = custom.get(name, 0.0) + count * amount
    return {**custom,
        "CPU": c.rollout_actors * c.cpus_per_rollout_actor + c.reward_actors * c.cpus_per_reward_actor
        + c.learner_workers * c.cpus_per_learner_worker + attackers * c.cpus_per_attack_actor
        + evaluators * c.cpus_per_eval_actor,
        "GPU": c.rollout_actors * c.gpus_per_rollout_actor + c.reward_actors * c.gpus_per_reward_actor
        + c.learner_workers * c.gpus_per_learner_worker + attackers * c.gpus_per_attack_actor
        + evaluators * c.gpus_per_eval_actor,
    }


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Refuse a topology the cluster cannot hold, naming the config fields to change."""
    need = required_resources(cfg)
    if available.get("GPU", 0.0) > 0 and need["GPU"] == 0:
        log.warning("the Ray cluster has %g GPUs but the config asks for none: every actor runs on CPU; set "
                    "cluster.gpus_per_{rollout_actor,reward_actor,learner_worker} (deploy/configs/gpu1.yaml shows "
                    "one GPU shared by the three roles)", available["GPU"])
    short = [kind for kind in need if need[kind] > available.get(kind, 0.0) + 1e-9]
    if short:
        problems = "; ".join(f"{kind}: the cluster section asks for {need[kind]:g}, the Ray cluster has "
                             f"{available.get(kind, 0.0):g}" for kind in short)
        hint = " (`ray start --num-cpus=N` offers a node N logical CPUs)" if "CPU" in short else ""
        if set(short) - {"CPU", "GPU"}:
            hint += " (`ray start --resources='{\"NAME\": N}'` offers a node N of a custom resource)"
        raise ConfigError("config error: cluster.{rollout,reward}_actors / learner_workers (and the attack and "
                          "evaluation actors) and their cpus_per_* / gpus_per_* / resources_per_* do not fit: "
                          f"{problems}{hint}")


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
