"""A run's session, the same for both loops: its directory, metrics log and run store with the lease held,
signals turned into a stop after the current step, and the result a finished run returns."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from safediff.common.checkpoint import set_aside
from safediff.common.config import Config, dump_config
from safediff.common.metrics import MetricsLog, plot_reward_curve, read_metrics
from safediff.runtime.run_store import Interrupted, RunStore, open_run_store, store_url
from safediff.runtime.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    checksum: str                  # sha256 of the final trainable state
    final_version: int = 0
    actor_status: list[tuple[int, str]] = field(default_factory=list)  # (version, checksum) per rollout actor
    max_staleness_seen: int = 0


@dataclass
class RunContext:
    cfg: Config
    metrics: MetricsLog
    store: RunStore
    resume: bool  # continue from the newest complete checkpoint
    tracker: Tracker | None = None

    @property
    def run_dir(self) -> Path:
        return self.metrics.path.parent

    def track(self, start: int) -> Tracker:
        """Open the experiment trackers once the loop knows its first step (0, or its checkpoint's)."""
        self.tracker = Tracker(self.cfg, self.run_dir, start)
        return self.tracker


@contextlib.contextmanager
def tracked_run(cfg: Config, resume: bool | None = None) -> Iterator[RunContext]:
    """The run directory and its run store, with the run's lease held (a second job on the same run id is
    refused before it touches any file); writes the resolved config; the store's status ends 'finished',
    'interrupted' or 'failed'. `resume`: True continues from the newest checkpoint, False starts over
    (a fresh metrics.jsonl), None decides from the store: a job resubmitted on a run id whose previous job
    did not finish continues it, unless that job failed before its first checkpoint (then it starts over)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.store
    url = store_url(s.url, s.password_file)
    with open_run_store(url, cfg.run.name, run_dir, s.lease_ttl_s, s.metrics_maxlen,
                        s.events_maxlen) as store:
        if resume is None:
            previous = store.status()
            unfinished = previous in ("running", "interrupted", "failed")
            resume = unfinished and bool(store.manifest())  # nothing to continue before the first checkpoint
            if resume:
                log.warning("run '%s': the previous job ended '%s'; continuing it (--fresh to start over)",
                            cfg.run.name, previous)
            elif unfinished:
                log.warning("run '%s': the previous job ended '%s' before its first checkpoint; starting over",
                            cfg.run.name, previous)
        config_yaml = dump_config(cfg)
        (run_dir / "config.yaml").write_text(config_yaml)
        if not resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            moved = set_aside(run_dir)
            store.start_over(moved)
            if moved is not None:
                log.warning("run '%s': starting over; the previous checkpoints are kept in %s", cfg.run.name, moved)
        store.begin(config_yaml)
        context = RunContext(cfg, MetricsLog(run_dir / "metrics.jsonl"), store, resume)
        try:
            yield context
            if context.tracker is not None:
                context.tracker.finish()
        except Interrupted:
            store.finish("interrupted")
            raise
        except BaseException as err:
            store.finish("failed")
            store.event("error", message=f"{type(err).__name__}: {err}"[:2000])
            raise
        finally:
            if context.tracker is not None:
                context.tracker.close()
        store.finish("finished")


def close_run(cfg: Config, metrics: MetricsLog) -> list[dict]:
    """Read the run's metrics back and draw its reward curve next to them."""
    records = read_metrics(metrics.path)
    plot_reward_curve(records, metrics.path.parent / "reward_curve.png", title=f"{cfg.run.name}: reward")
    return records


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGTERM/SIGINT into a request (the list gets the signal number) that the loop honours after
    the current step, with a checkpoint; a second signal interrupts at once."""
    requested: list[int] = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("signal %d: stopping after this step with a checkpoint (again to stop now)", signum)

    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
