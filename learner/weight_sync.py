"""Weight broadcast from the learner to every rollout actor, verified on arrival.

The learner publishes each new policy once: the trainable state goes into the object store
(`ray.put`, one copy however many actors read it) and travels as an `AdapterUpdate` carrying its
version, sha256 checksum, the number of adapter modules it must bind, and its size. A receiver
refuses an update whose version is not newer than the one it holds (stale or out of order), and
after loading checks that exactly `module_count` modules carry the adapter and that its own state
hashes to `checksum`; any mismatch raises, because a sync that silently binds nothing would keep
the actors sampling from the base model while the learner trains a different policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.lora import count_lora_modules
from common.policy import Policy


class AdapterSyncError(RuntimeError):
    """A weight update that could not be applied exactly; the actor keeps its previous weights' version."""


@dataclass(frozen=True)
class AdapterUpdate:
    version: int
    state_ref: Any        # ray.ObjectRef of dict[str, Tensor] (nested, so Ray does not resolve it early)
    checksum: str
    module_count: int     # LoRA: modules carrying the adapter; full fine-tune: number of tensors
    num_bytes: int


@dataclass(frozen=True)
class SyncReport:
    version: int
    checksum: str
    modules_bound: int
    load_ms: float


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def bound_modules(policy: Policy) -> int:
    """What `AdapterUpdate.module_count` is compared against on the receiving side."""
    if policy.finetune == "lora":
        return count_lora_modules(policy.unet)
    return len(policy.state())


def apply_update(policy: Policy, update: AdapterUpdate, state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Load `state` into `policy` as version `update.version` after the checks above; returns
    (checksum of the loaded state, modules bound)."""
    if update.version <= policy.version:
        raise AdapterSyncError(f"refused adapter version {update.version}: this actor already holds "
                               f"version {policy.version} (stale or out-of-order update)")
    previous, previous_version = policy.state(), policy.version
    policy.load_state(state, update.version)
    bound = bound_modules(policy)
    checksum = policy.checksum()
    if bound != update.module_count or checksum != update.checksum:
        policy.load_state(previous, previous_version)  # roll back: the actor keeps what it had
        raise AdapterSyncError(
            f"adapter version {update.version} did not bind as published: {bound} modules bound "
            f"(expected {update.module_count}), checksum {checksum[:12]} (expected {update.checksum[:12]})")
    return checksum, bound
