"""Training progress for a person: a tqdm bar on a terminal; in a log (`ray job logs`, a file, CI) one plain line
every few steps instead of a bar redrawn with carriage returns."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("safediff.progress")


class StepProgress:
    LINES = 20  # at most about this many lines per run in a log

    def __init__(self, start: int, total: int, enabled: bool = True, terminal: bool | None = None):
        """Steps `start` .. `total` - 1 are left; `terminal`: draw a bar (default: when stderr is a terminal)."""
        self.total, self.enabled = total, enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.every = max(1, total // self.LINES)
        self.started, self.start = time.perf_counter(), start
        self.bar = tqdm(desc="train", unit="step", initial=start, total=total) if enabled and self.terminal else None

    def step(self, step: int, record: dict) -> None:
        """Step `step` is done; `record` its step record."""
        reward, kl = record.get("reward_mean"), record.get("approx_kl", 0.0)
        shown = {"reward": "nan" if reward is None else f"{reward:.4f}", "kl": f"{kl or 0.0:.2e}"}
        if self.bar is not None:
            self.bar.set_postfix(shown)
            self.bar.update(1)
        elif self.enabled and ((step + 1) % self.every == 0 or step + 1 == self.total):
            per_step = (time.perf_counter() - self.started) / (step + 1 - self.start)
            log.info("step %d/%d  reward %s  kl %s  %.1f s/step", step + 1, self.total, shown["reward"],
                     shown["kl"], per_step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
