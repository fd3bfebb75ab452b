"""The policy: a model bundle whose denoiser carries the trainable weights (LoRA adapter or full UNet).

Rollout workers and the learner each hold one; the learner's trainable state is what a weight sync
ships (`state` / `load_state`), tagged with a version number and a checksum.
"""

from __future__ import annotations

import contextlib

import torch

from safediff.common.config import Config, resolve_device_dtype
from safediff.common.family import ModelFamily, load_model
from safediff.common.seeds import derive_seed
from safediff.common.trainable import Trainable, state_checksum, trainable_for


class Policy:
    def __init__(self, bundle: ModelFamily, trainable: Trainable, device: str, dtype: torch.dtype):
        self.bundle, self.trainable = bundle, trainable
        self.device, self.dtype = torch.device(device), dtype
        self.version = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        """Load the bundle, move it to the run's device/dtype and make the configured part trainable.
        The LoRA initialisation derives from the run seed, so every process builds the same policy."""
        device, dtype_name = resolve_device_dtype(cfg.run)
        dtype = getattr(torch, dtype_name)
        bundle = load_model(cfg.model).to(device, dtype)
        trainable = trainable_for(cfg)
        trainable.attach(bundle.denoiser, seed=derive_seed("lora-init", cfg.run.seed))
        return cls(bundle, trainable, device, dtype)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.bundle.denoiser

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for denoiser calls when the run's dtype is not fp32 (a no-op on fp32)."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def reference(self) -> contextlib.AbstractContextManager:
        """The base model (adapter disabled), used as the KL reference."""
        return self.trainable.reference(self.denoiser)

    def state(self) -> dict[str, torch.Tensor]:
        return self.trainable.state(self.denoiser)

    def bound_modules(self) -> int:
        """What `AdapterUpdate.module_count` is compared against on the receiving side."""
        return self.trainable.bound_modules(self.denoiser)

    def checksum(self) -> str:
        return state_checksum(self.state())

    def load_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.trainable.load(self.denoiser, state)
        self.version = version
