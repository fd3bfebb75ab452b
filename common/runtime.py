"""Small process-level settings shared by the Ray actors."""

from __future__ import annotations

import math

import torch


def configure_threads(cpus: float) -> int:
    """Give torch as many intra-op threads as the CPUs the actor reserved (at least 1), so actors
    sharing a node do not oversubscribe it. Returns the thread count."""
    threads = max(1, math.floor(cpus))
    torch.set_num_threads(threads)
    return threads
