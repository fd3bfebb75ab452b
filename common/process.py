"""Small process-level settings shared by the Ray actors and the runtime: threads, host memory, device, a free
port."""

from __future__ import annotations

import ctypes
import math
import socket

import torch

from safediff.common.config import Config, resolve_device_dtype


def configure_threads(cpus: float) -> int:
    """Give torch as many intra-op threads as the CPUs the actor reserved (at least 1), so actors
    sharing a node do not oversubscribe it. Returns the thread count."""
    threads = max(1, math.floor(cpus))
    torch.set_num_threads(threads)
    return threads


# glibc's mallopt(3) parameters (malloc.h), and the largest mmap threshold it accepts on a 64-bit machine
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # the largest int: the heap gives memory back only when over 2 GiB of its top is free


def keep_freed_memory() -> bool:
    """Make this process's malloc keep the host memory it frees for reuse. By default glibc serves blocks from 128 KiB
    up (a threshold it raises as blocks are freed) with their own mmap and gives them back to the OS when freed, and
    trims the heap's free top: a torch step that allocates and frees the same activations every pass then has
    the kernel map and zero the same pages again each time (on the world, about a million page faults per update).
    Here blocks up to 32 MiB come from the heap and the heap is not trimmed, so they are reused. The process's RSS
    then stays near its peak. Returns whether the C library took the settings (glibc's mallopt; False elsewhere)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def on_assigned_device(cfg: Config, gpus: float) -> Config:
    """The config an actor should run with: an actor that reserved no GPU runs on the CPU even on a GPU
    node (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0, so 'auto' would pick cuda:0)."""
    if gpus > 0:
        return cfg
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"device": "cpu"})})


def configure_memory(cfg: Config) -> bool:
    """run.keep_freed_memory for a process that computes on `cfg`'s device: `keep_freed_memory` when that is the CPU.
    On a GPU the activations live in the GPU's memory, and kept host memory would only hold what loading the weights
    freed. Returns whether the settings were taken."""
    return cfg.run.keep_freed_memory and resolve_device_dtype(cfg.run)[0] == "cpu" and keep_freed_memory()


def configure_process(cfg: Config, cpus: float, gpus: float = 0.0) -> Config:
    """Set up a process that computes as an actor that reserved `cpus` CPUs and `gpus` GPUs does (the actors, and
    benches standing in for one), and return the config it runs with (`on_assigned_device`): torch's threads
    (`configure_threads`) and its host memory (`configure_memory`)."""
    cfg = on_assigned_device(cfg, gpus)
    configure_threads(cpus)
    configure_memory(cfg)
    return cfg


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
