"""The no-op rollout stand-in of the controller benchmarks, in a module of its own that imports neither torch nor
the models: Ray imports an actor class's module in the actor's process, so each of the load benchmark's 64
stand-ins costs a Ray worker (about 90 MB) instead of a worker with torch and diffusers loaded (about 570 MB)."""

from __future__ import annotations

import ray

from safediff.common.messages import SyncReport


class Rollout:
    """Answers a rollout actor's calls at once: no trajectory, no images, the policy version it was sent."""

    def __init__(self):
        self.version = 0

    def generate(self, groups, min_version=0):
        info = {"policy_version": self.version, "generate_s": 0.0}
        return tuple(x for _ in groups for x in (None, None, info))

    def load_adapter(self, update):
        self.version = update.version
        return SyncReport(update.version, update.checksum, update.module_count, 0.0)

    def resync(self, update):
        return self.load_adapter(update) if update.version > self.version else SyncReport(self.version, "", 0, 0.0)

    def status(self):
        return self.version, ""


NoopRollout = ray.remote(num_cpus=0)(Rollout)
