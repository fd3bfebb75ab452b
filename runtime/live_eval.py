"""Evaluation while training (evaluation.every): the evaluation actor scores the policy on a fixed schedule while
the learner goes on, and the best adapter by a stated rule is kept.

    before step 0      the base model (the seed-initialised adapter, which leaves the UNet unchanged)
    after step s       when s % every == 0 or s is the last step: the policy published after step s

The learner never waits for an evaluation, except after the last step, when nothing is left to train. Each
finished evaluation is a row of <run dir>/evaluations.jsonl (step, policy version, checksum, the probe's fields,
seconds) and an `evaluation` event in the run store; the next step record carries the newest one as eval_*
fields (metrics.jsonl, dashboard gauges). <run dir>/evaluation_curve.png is drawn anew after each one.

The rule (evaluation.select, `select_best`): among the evaluations whose `guard` is at least the base model's minus
`margin`, the lowest `metric`, the earliest on ties. An adapter that becomes the best is written to
<run dir>/evaluations/step_<s>/ and exported as <run dir>/adapter_best/. With `patience`, training stops after
that many evaluations in a row without a new best. A resumed run keeps the evaluations up to its checkpoint (and
the best among them) and evaluates again what came after.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from safediff.common.checkpoint import export_weights
from safediff.common.config import Config, SelectConfig
from safediff.common.errors import UserInputError
from safediff.common.messages import AdapterUpdate
from safediff.common.metrics import MetricsLog, plot_evaluations, read_metrics
from safediff.common.weight_sync import fetch_state
from safediff.runtime.groups import EvalGroup
from safediff.runtime.run_store import RunStore

log = logging.getLogger(__name__)
BOOKKEEPING = ("step", "policy_version", "checksum", "seconds")  # an evaluation row's fields besides the probe's


def select_best(history: list[dict], rule: SelectConfig) -> dict | None:
    """The evaluation `rule` picks from `history` (rows in the order they were made; the first is the base model's):
    the lowest `rule.metric` among rows whose `rule.guard` >= base's - `rule.margin`, the earliest on ties."""
    if not history:
        return None
    for field in (rule.metric, rule.guard):
        if field is not None and field not in history[0]:
            fields = ", ".join(k for k in history[0] if k not in BOOKKEEPING)
            raise UserInputError(f"evaluation.select: the evaluation has no field {field!r} (it has: {fields})")
    floor = None if rule.guard is None else history[0][rule.guard] - rule.margin
    eligible = [row for row in history if floor is None or row[rule.guard] >= floor - 1e-12]
    return min(eligible, key=lambda row: row[rule.metric])


def evaluations_since_best(history: list[dict], rule: SelectConfig) -> int:
    """How many evaluations came after the best one (the early stop's count)."""
    best = select_best(history, rule)
    return 0 if best is None else len(history) - 1 - history.index(best)


@dataclass
class Request:
    """An evaluation asked of the actor: its policy, and references to the result and to the load report."""

    step: int
    update: AdapterUpdate
    result: Any           # ObjectRef[dict[str, float]]
    report: Any = None    # ObjectRef[SyncReport] when this request loaded `update`


class LiveEval:
    def __init__(self, cfg: Config, group: EvalGroup, store: RunStore, run_dir: Path, start: int):
        self.cfg, self.group, self.store, self.run_dir = cfg, group, store, run_dir
        self.every, self.rule = cfg.evaluation.every, cfg.evaluation.select
        self.rows = MetricsLog(run_dir / "evaluations.jsonl")
        # a resumed run evaluates again what came after its checkpoint; a fresh one starts with nothing
        self.rows.truncate(start + 1 if start else 0)
        if not start:
            shutil.rmtree(run_dir / "evaluations", ignore_errors=True)
        self.history = read_metrics(self.rows.path)
        self.pending: list[Request] = []
        self.loaded = 0        # the policy version the actor was last sent (0: the one it starts with)
        self.newest: dict = {}  # the newest evaluation not yet in a step record
        shutil.rmtree(run_dir / "adapter_best", ignore_errors=True)  # it may hold one made after the checkpoint
        if self.history:
            self._export_best(select_best(self.history, self.rule), state=None)

    def begin(self, start: int, update: AdapterUpdate) -> None:
        """Evaluate the policy a run starts from (`update`, trained for `start` steps) when it is due and not done:
        the base model of a fresh run, or a resumed run's checkpoint at an evaluation step."""
        if start == 0 or (self._due(start) and start not in {row["step"] for row in self.history}):
            self._request(start, update)

    def after_step(self, done: int, update: AdapterUpdate) -> None:
        """The policy `update` has been trained for `done` steps: evaluate it if due."""
        if self._due(done):
            self._request(done, update)

    def collect(self, wait: bool = False) -> dict[str, float]:
        """Record the evaluations finished by now (all of them with `wait`); returns the newest one's eval_* fields
        for the step record (empty when none finished since the last call)."""
        while self.pending:
            request = self.pending[0]
            if not wait and not ray.wait([request.result], timeout=0)[0]:
                break
            self.pending.pop(0)
            self._record(request, self._result(request))
        newest, self.newest = self.newest, {}
        return newest

    def should_stop(self) -> bool:
        """The early stop: `patience` evaluations in a row found no better adapter."""
        patience = self.rule.patience
        return patience is not None and evaluations_since_best(self.history, self.rule) >= patience

    def _due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.cfg.run.steps

    def _request(self, step: int, update: AdapterUpdate) -> None:
        report = None
        if update.version > self.loaded:
            report, self.loaded = self.group.load_adapter(update), update.version
        self.pending.append(Request(step, update, self.group.evaluate(step, update.version), report))

    def _result(self, r: Request) -> dict[str, float]:
        """The evaluation's fields (asked again, once, of a restarted evaluation actor: `SideGroup.answer`; the
        requests queued behind a lost one fail the same way and are asked again in their turn)."""
        fields = self.group.answer(r.step, r.update, r.report, r.result,
                                   lambda: self.group.evaluate(r.step, r.update.version), self.store)
        self.loaded = max(self.loaded, r.update.version)
        return fields

    def _record(self, request: Request, fields: dict[str, float]) -> None:
        row = {"step": request.step, "policy_version": request.update.version, "checksum": request.update.checksum,
               **fields}
        best_before = select_best(self.history, self.rule)
        self.history.append(row)
        self.rows.write(row)
        best = select_best(self.history, self.rule)
        self.store.event("evaluation", **{k: v for k, v in row.items() if k != "checksum"}, best_step=best["step"])
        log.info("evaluation after step %d: %s = %.4g (best: step %d)", row["step"], self.rule.metric,
                 row[self.rule.metric], best["step"])
        if best is not best_before:
            self._export_best(best, fetch_state(request.update))
        plot_evaluations(self.history, self.run_dir / "evaluation_curve.png", self.rule.metric, self.rule.guard,
                         best["step"], title=f"{self.cfg.run.name}: evaluation while training")
        self.newest = {"eval_step": row["step"], "eval_best_step": best["step"],
                       **{f"eval_{k}": v for k, v in fields.items() if isinstance(v, (int, float))}}

    def _export_best(self, best: dict, state) -> None:
        """Write the best adapter to evaluations/step_<s>/ (when `state` is given) and make adapter_best/ a copy."""
        kept = self.run_dir / "evaluations" / f"step_{best['step']}"
        if state is not None:
            export_weights(state, self.cfg, kept, best["step"], best["policy_version"])
        if not kept.is_dir():
            log.warning("evaluations/step_%d (the best adapter so far) is missing: adapter_best/ is not written",
                        best["step"])
            return
        target = self.run_dir / "adapter_best"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(kept, target)
