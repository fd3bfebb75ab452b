"""Training progress: `common.progress.Progress` counted in steps, each shown with its mean reward and KL."""

from __future__ import annotations

from safediff.common.progress import Progress


class StepProgress(Progress):
    def __init__(self, start: int, total: int, enabled: bool = True, terminal: bool | None = None):
        """Steps `start` .. `total` - 1 are left; `terminal`: draw a bar (default: when stderr is a terminal)."""
        super().__init__(total, "step", "step", initial=start, enabled=enabled, terminal=terminal)

    def step(self, record: dict) -> None:
        """A step is done; `record` its step record."""
        reward, kl = record.get("reward_mean"), record.get("approx_kl", 0.0)
        self.update(1, reward="nan" if reward is None else f"{reward:.4f}", kl=f"{kl or 0.0:.2e}")
