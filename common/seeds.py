"""Deterministic randomness: every sample's noise is a pure function of where it sits in the run.

    seed(run_seed, step, group_index, sample_index) = first 8 bytes of BLAKE2b("run/step/group/sample")

`group_index` is the group's position within its training step. Noise is drawn on the CPU from a
generator seeded with that value, so it is identical across devices, batch shapes, actor counts and
restarts: a resumed run continues exactly, and a group retried on another actor is the same group.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def sample_seed(run_seed: int, step: int, group_index: int, sample_index: int) -> int:
    return derive_seed("sample", run_seed, step, group_index, sample_index)


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def trajectory_noise(seed: int, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """[T+1, *latent_shape] fp32 standard normal: index 0 is the initial latent, k+1 the noise of step k."""
    return torch.randn((num_steps + 1, *latent_shape), generator=generator(seed), dtype=torch.float32)
