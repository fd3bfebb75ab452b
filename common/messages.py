"""The driver's messages that carry no tensors: the prompt groups it sends rollout actors, and the weight-update
contract between the learner and every actor holding a policy (an `AdapterUpdate` describing a published policy,
the `SyncReport` of what a receiver bound, and how a mismatch is named). This module imports neither torch nor the
models, so a process that only routes them (the load benchmark's stand-ins) can read them without loading either;
common/weight_sync.py packs, publishes and applies the updates, common/types.py holds the records with tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptGroup:
    """One prompt to be sampled G times by a single policy version."""

    step: int            # training step the group belongs to
    group_index: int     # position within the step; with `step` it seeds the group's noise
    prompt: str
    source: int          # index of the prompt source in the config's mixture
    prompt_index: int    # row of the prompt within its source
    unsafe: bool | None  # label, when the source has one


class AdapterSyncError(RuntimeError):
    """A weight update that could not be applied exactly; the actor keeps its previous weights' version."""


class ActorBehind(RuntimeError):
    """An actor holds an older policy than the call needs (it restarted and has not been re-synced)."""


@dataclass(frozen=True)
class AdapterUpdate:
    version: int
    state_ref: Any        # ray.ObjectRef of a PackedState (nested, so Ray does not resolve it early)
    checksum: str
    module_count: int     # LoRA: modules carrying the adapter; full fine-tune: number of tensors
    num_bytes: int


@dataclass(frozen=True)
class SyncReport:
    version: int
    checksum: str
    modules_bound: int
    load_ms: float


def check_report(report: SyncReport, update: AdapterUpdate, who: str) -> None:
    """The receiver bound exactly what was published, else AdapterSyncError naming `who`."""
    if (report.version, report.checksum, report.modules_bound) != (update.version, update.checksum,
                                                                   update.module_count):
        raise AdapterSyncError(f"{who} reports {report} for published version {update.version} "
                               f"({update.checksum[:12]}, {update.module_count} modules)")
