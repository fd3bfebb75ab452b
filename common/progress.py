"""Progress of long work for a person: a tqdm bar on a terminal; in a log (`ray job logs`, a file, CI) one plain line
about every 5% of the work instead of a bar redrawn with carriage returns. Training, evaluation, attacks and
inversion all report through `Progress`, so one rule decides between the two."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("safediff.progress")
T = TypeVar("T")


class Progress:
    LINES = 20  # at most about this many lines per piece of work in a log

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 terminal: bool | None = None):
        """Units `initial` .. `total` - 1 are left; `terminal`: draw a bar (default: when stderr is a terminal);
        `enabled` False shows nothing."""
        self.total, self.desc, self.unit, self.done, self.initial = total, desc, unit, initial, initial
        self.enabled = enabled and total > initial
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.every = max(1, total // self.LINES)
        self.started = time.perf_counter()
        self.bar = (tqdm(desc=desc, unit=unit, initial=initial, total=total)
                    if self.enabled and terminal else None)

    def update(self, n: int = 1, **shown: str) -> None:
        """`n` more units are done; `shown`: values to show beside the count (name -> formatted value)."""
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            if shown:
                self.bar.set_postfix(shown)
            self.bar.update(n)
        elif self.enabled and (self.done // self.every > before // self.every or self.done >= self.total):
            per_unit = (time.perf_counter() - self.started) / max(self.done - self.initial, 1)
            values = "".join(f"  {name} {value}" for name, value in shown.items())
            log.info("%s %d/%d%s  %.1f s/%s", self.desc, self.done, self.total, values, per_unit, self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str = "it", *, total: int | None = None, enabled: bool = True,
          terminal: bool | None = None) -> Iterator[T]:
    """`items`, one at a time, shown as `Progress` (`total`: their number when `items` has no len)."""
    with Progress(len(items) if total is None else total, desc, unit, enabled=enabled, terminal=terminal) as shown:
        for item in items:
            yield item
            shown.update()
