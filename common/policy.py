"""The policy: a model bundle whose UNet carries the trainable weights (LoRA adapter or full UNet).

Rollout workers and the learner each hold one; the learner's trainable state is what a weight sync
ships (`state` / `load_state`), tagged with a version number and a checksum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from common.config import Config, resolve_device_dtype
from common.lora import attach_lora, load_trainable_state, state_checksum, trainable_state
from common.models import ModelBundle, load_bundle
from common.seeds import derive_seed


class Policy:
    def __init__(self, bundle: ModelBundle, finetune: str, lora_modules: int, device: str, dtype: torch.dtype):
        self.bundle, self.finetune, self.lora_modules = bundle, finetune, lora_modules
        self.device, self.dtype = torch.device(device), dtype
        self.version = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        """Load the bundle, move it to the run's device/dtype and make the configured part trainable.
        The LoRA initialisation derives from the run seed, so every process builds the same policy."""
        device, dtype_name = resolve_device_dtype(cfg.run)
        dtype = getattr(torch, dtype_name)
        bundle = load_bundle(cfg.model.pretrained, cfg.model.revision).to(device, dtype)
        lora_modules = 0
        if cfg.model.finetune == "lora":
            lora_modules = attach_lora(bundle.unet, cfg.lora, seed=derive_seed("lora-init", cfg.run.seed))
        else:
            bundle.unet.float().requires_grad_(True)  # fp32 master weights; autocast runs the math in `dtype`
        return cls(bundle, cfg.model.finetune, lora_modules, device, dtype)

    @property
    def unet(self) -> torch.nn.Module:
        return self.bundle.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for UNet calls when the run's dtype is not fp32 (a no-op on fp32)."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The base model (adapter disabled), used as the KL reference."""
        if self.finetune != "lora":
            raise RuntimeError("the reference policy needs model.finetune=lora")
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.unet, self.finetune)

    def checksum(self) -> str:
        return state_checksum(self.state())

    def load_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        load_trainable_state(self.unet, self.finetune, state)
        self.version = version
