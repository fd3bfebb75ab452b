"""Bounded staleness for the asynchronous pipeline.

Versions count finished training steps: the policy after step s is version s + 1 (a step whose groups
were all dropped still advances it, with unchanged weights), so a group of step s generated with
version s is exactly on-policy. With bound k = `cluster.max_staleness`:

    a group of step s may start only on an actor holding version v >= s - k,
    so its staleness s - v lies in [0, k].

Generation therefore runs at most k steps ahead of training, and at most (k + 1) * prompts_per_step
prompt groups are in flight (generated or generating but not yet trained) at any time. k = 0 is
fully on-policy and synchronous; k = 1 overlaps the generation of step s + 1 with training step s.
"""

from __future__ import annotations


class StalenessBoundExceeded(RuntimeError):
    pass


class StalenessGate:
    def __init__(self, max_staleness: int, prompts_per_step: int):
        self.max_staleness, self.prompts_per_step = max_staleness, prompts_per_step
        self.max_seen = 0

    def may_start(self, step: int, actor_version: int) -> bool:
        return actor_version >= step - self.max_staleness

    def max_groups_in_flight(self) -> int:
        return (self.max_staleness + 1) * self.prompts_per_step

    def record(self, step: int, version_used: int) -> int:
        """Staleness of a finished group; raises if the bound was broken (a controller bug)."""
        staleness = step - version_used
        if not 0 <= staleness <= self.max_staleness:
            raise StalenessBoundExceeded(f"group of step {step} was generated with version {version_used}: "
                                         f"staleness {staleness} outside [0, {self.max_staleness}]")
        self.max_seen = max(self.max_seen, staleness)
        return staleness
