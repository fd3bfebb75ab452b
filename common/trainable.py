"""The trainable part of the policy, behind one interface: a peft LoRA adapter on the UNet, or the whole UNet.

Everything that depends on what is trained goes through a `Trainable`: making the UNet trainable,
reading and loading the trained state, counting what a loaded state bound (the weight-sync check),
exporting in diffusers format and reading an export back. `trainable_for(cfg)` picks the variant from
`model.finetune`; no other module tests that field.

Exports are written with diffusers' own `save_lora_weights`, so `pipe.load_lora_weights(dir)` on a
stock StableDiffusionPipeline reads them; the adapter's rank/alpha travel as safetensors metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from safediff.common.assets import resolve
from safediff.common.config import Config, LoraConfig

ADAPTER = "default"


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


class Trainable(ABC):
    """What the learner trains and a weight sync ships. States are name -> tensor dicts, detached on CPU."""

    kind: str          # the `model.finetune` value
    weights_file: str  # the weights file of an export, relative to its folder

    @abstractmethod
    def attach(self, unet: UNet2DConditionModel, seed: int) -> int:
        """Make the trained part trainable (everything else frozen); returns the adapted module count."""

    @abstractmethod
    def state(self, unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
        """The trained weights."""

    @abstractmethod
    def load(self, unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `state`; every key must bind (raises otherwise)."""

    @abstractmethod
    def bound_modules(self, unet: UNet2DConditionModel) -> int:
        """What a loaded state bound, compared with `AdapterUpdate.module_count` on the receiving side."""

    @abstractmethod
    def expected_modules(self, state: dict[str, torch.Tensor]) -> int:
        """What `bound_modules` must find once `state` is loaded."""

    @abstractmethod
    def save(self, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Export `state` in diffusers format into `out_dir`, loadable without this project."""

    @abstractmethod
    def load_saved(self, folder: str | Path) -> dict[str, torch.Tensor]:
        """Inverse of `save`."""

    def reference(self, unet: UNet2DConditionModel) -> contextlib.AbstractContextManager:
        """The base model, used as the KL reference (only an adapter keeps the base weights)."""
        raise RuntimeError(f"the reference policy needs model.finetune=lora, not {self.kind}")


class ExportFormat(NamedTuple):
    """Where a model family's adapter goes in a diffusers LoRA export."""

    pipeline: type                     # the pipeline class whose save_lora_weights writes it
    component: str                     # the denoiser's component name: its keys' prefix in the file
    to_diffusers: Callable[[dict], dict]  # peft key names -> the file's
    to_peft: Callable[[dict], dict]       # the file's key names -> peft's


EXPORT_FORMATS = {
    "unet": ExportFormat(StableDiffusionPipeline, "unet", convert_state_dict_to_diffusers,
                         convert_unet_state_dict_to_peft),
    "sd3": ExportFormat(StableDiffusion3Pipeline, "transformer", dict, dict),  # the transformer keeps peft's names
    "flux": ExportFormat(FluxPipeline, "transformer", dict, dict),
}


class LoraTrainable(Trainable):
    """A peft LoRA adapter on the denoiser's `lora.target_modules` (the UNet; or, for `family` "sd3" or "flux", the
    transformer, whose joint attention has the same to_q/to_k/to_v/to_out.0 projections): B = 0 at the start, so
    the policy starts equal to the base model; A ~ Gaussian drawn from the seed. Trainable weights stay fp32 under
    bf16 frozen ones."""

    kind, weights_file = "lora", "pytorch_lora_weights.safetensors"

    def __init__(self, cfg: LoraConfig, family: str = "unet"):
        self.cfg = cfg
        self.format = EXPORT_FORMATS[family]

    def peft_config(self) -> PeftLoraConfig:
        return PeftLoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                              target_modules=list(self.cfg.target_modules), init_lora_weights="gaussian")

    def attach(self, unet: UNet2DConditionModel, seed: int) -> int:
        unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(self.peft_config(), adapter_name=ADAPTER)
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        count = self.bound_modules(unet)
        if count == 0:
            raise ValueError(f"lora.target_modules {list(self.cfg.target_modules)} matched no UNet module")
        return count

    def state(self, unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
        return _detached(get_peft_model_state_dict(unet, adapter_name=ADAPTER))

    def load(self, unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = set(get_peft_model_state_dict(unet, adapter_name=ADAPTER)) - set(state)
        if unexpected or missing:
            raise ValueError(f"adapter state does not match the UNet's LoRA layout: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected keys (e.g. {(sorted(missing) + unexpected)[:3]})")

    def bound_modules(self, unet: UNet2DConditionModel) -> int:
        return count_lora_modules(unet)

    def expected_modules(self, state: dict[str, torch.Tensor]) -> int:
        return sum(k.endswith("lora_A.weight") for k in state)

    def save(self, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fmt = self.format
        fmt.pipeline.save_lora_weights(out, safe_serialization=True, **{
            f"{fmt.component}_lora_layers": fmt.to_diffusers(dict(state)),
            f"{fmt.component}_lora_adapter_metadata": self.peft_config().to_dict()})
        return out

    def load_saved(self, folder: str | Path) -> dict[str, torch.Tensor]:
        saved = load_file(str(Path(folder) / self.weights_file))
        prefix = f"{self.format.component}."
        return self.format.to_peft({k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)})

    @contextlib.contextmanager
    def reference(self, unet: UNet2DConditionModel) -> Iterator[None]:
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()


class FullTrainable(Trainable):
    """Every UNet weight (the reference's full fine-tune), fp32 master weights; exported as a diffusers `unet/`
    folder with the base model's UNet config."""

    kind, weights_file = "full", "unet/diffusion_pytorch_model.safetensors"

    def __init__(self, pretrained: str, revision: str | None = None):
        self.pretrained, self.revision = pretrained, revision

    def attach(self, unet: UNet2DConditionModel, seed: int) -> int:
        unet.float().requires_grad_(True)  # autocast runs the math in the run's dtype
        return 0

    def state(self, unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
        return _detached(unet.state_dict())

    def load(self, unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
        unet.load_state_dict(state, strict=True)

    def bound_modules(self, unet: UNet2DConditionModel) -> int:
        return len(unet.state_dict())

    def expected_modules(self, state: dict[str, torch.Tensor]) -> int:
        return len(state)

    def save(self, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
        out = Path(out_dir)
        (out / "unet").mkdir(parents=True, exist_ok=True)
        kwargs = {"revision": self.revision} if self.revision else {}
        unet_config = UNet2DConditionModel.load_config(resolve(self.pretrained), subfolder="unet", **kwargs)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / self.weights_file))
        (out / "unet" / "config.json").write_text(json.dumps(dict(unet_config), indent=2, default=str))
        return out

    def load_saved(self, folder: str | Path) -> dict[str, torch.Tensor]:
        return load_file(str(Path(folder) / self.weights_file))


def trainable_for(cfg: Config) -> Trainable:
    """The variant `model.finetune` names."""
    if cfg.model.finetune == "lora":
        return LoraTrainable(cfg.lora, cfg.model.family)
    return FullTrainable(cfg.model.pretrained, cfg.model.revision)


def count_lora_modules(unet: torch.nn.Module, adapter: str | None = ADAPTER) -> int:
    """Modules that carry LoRA adapter `adapter` (None: any adapter). A sync that binds nothing must show."""
    return sum(1 for m in unet.modules()
               if hasattr(m, "lora_A") and (adapter in m.lora_A if adapter else len(m.lora_A) > 0))
