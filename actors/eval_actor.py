"""EvalActor: evaluation while training (evaluation.every > 0) as its own Ray role.

It holds the policy as a rollout actor does (verified adapter loads, a re-sync after a restart) and, asked to
evaluate version v, runs its probe on the policy it holds. The probe is what the caller built the actor with:
a callable `make_probe(cfg) -> probe`, `probe(policy, step) -> {field: float}` (the world's judges in
world/report.py, the suite's scorers in evaluation/live.py). Roles cannot import those layers, so the
entrypoint passes the factory down.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from safediff.common.config import Config
from safediff.common.messages import ActorBehind
from safediff.common.policy import Policy
from safediff.common.process import configure_process
from safediff.common.weight_sync import PolicyHolder

Probe = Callable[[Policy, int], dict[str, float]]


@ray.remote
class EvalActor(PolicyHolder):
    def __init__(self, cfg: Config, make_probe: Callable[[Config], Probe]):
        cfg = configure_process(cfg, cfg.cluster.cpus_per_eval_actor, cfg.cluster.gpus_per_eval_actor)
        self.policy = Policy.from_config(cfg)
        self.probe = make_probe(cfg)

    def evaluate(self, step: int, version: int) -> dict[str, float]:
        """The probe's fields for policy `version` (trained for `step` steps), which this actor must hold
        (ActorBehind otherwise), plus `seconds`, the evaluation's wall time."""
        if self.policy.version != version:
            raise ActorBehind(f"evaluation actor holds version {self.policy.version}, the evaluation after step "
                              f"{step} needs {version}")
        start = time.perf_counter()
        fields = self.probe(self.policy, step)
        return {**fields, "seconds": time.perf_counter() - start}
