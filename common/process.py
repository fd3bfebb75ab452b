"""Small process-level settings shared by the Ray actors and the runtime: threads, device, a free port."""

from __future__ import annotations

import math
import socket

import torch

from safediff.common.config import Config


def configure_threads(cpus: float) -> int:
    """Give torch as many intra-op threads as the CPUs the actor reserved (at least 1), so actors
    sharing a node do not oversubscribe it. Returns the thread count."""
    threads = max(1, math.floor(cpus))
    torch.set_num_threads(threads)
    return threads


def on_assigned_device(cfg: Config, gpus: float) -> Config:
    """The config an actor should run with: an actor that reserved no GPU runs on the CPU even on a GPU
    node (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0, so 'auto' would pick cuda:0)."""
    if gpus > 0:
        return cfg
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"device": "cpu"})})


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"memory_max_mib": the most device memory this process's tensors held so far} on CUDA; {} elsewhere (the
    CPU's is the process's RSS, which Ray's dashboard shows per actor)."""
    if device.type != "cuda":
        return {}
    return {"memory_max_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now ("" = every interface: a port other nodes will connect to)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
