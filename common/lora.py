"""The trainable part of the policy: a peft LoRA adapter on the UNet (or the whole UNet).

Checkpoints are written with diffusers' own `save_lora_weights`, so `pipe.load_lora_weights(dir)` on
a stock StableDiffusionPipeline reads them; the adapter's rank/alpha travel as safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from common.config import LoraConfig

ADAPTER = "default"


def attach_lora(unet: UNet2DConditionModel, cfg: LoraConfig, seed: int) -> int:
    """Add a LoRA adapter (B = 0, so the policy starts equal to the base model; A ~ Gaussian drawn
    from `seed`), freeze everything else, and return the number of adapted modules."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(peft_lora_config(cfg), adapter_name=ADAPTER)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable weights stay fp32 under bf16 frozen weights
    count = count_lora_modules(unet)
    if count == 0:
        raise ValueError(f"lora.target_modules {list(cfg.target_modules)} matched no UNet module")
    return count


def count_lora_modules(unet: torch.nn.Module, adapter: str | None = ADAPTER) -> int:
    """Modules that carry LoRA adapter `adapter` (None: any adapter). A sync that binds nothing must show."""
    return sum(1 for m in unet.modules()
               if hasattr(m, "lora_A") and (adapter in m.lora_A if adapter else len(m.lora_A) > 0))


def trainable_state(unet: UNet2DConditionModel, finetune: str) -> dict[str, torch.Tensor]:
    """The weights the learner trains, detached on CPU: peft-named LoRA tensors, or the full UNet."""
    if finetune == "lora":
        state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    else:
        state = unet.state_dict()
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_trainable_state(unet: UNet2DConditionModel, finetune: str, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`; every key must bind (raises otherwise)."""
    if finetune == "lora":
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        expected = set(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
        missing = expected - set(state)
        if unexpected or missing:
            raise ValueError(f"adapter state does not match the UNet's LoRA layout: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected keys (e.g. {(sorted(missing) + unexpected)[:3]})")
    else:
        unet.load_state_dict(state, strict=True)


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), init_lora_weights="gaussian")


def save_trainable_state(state: dict[str, torch.Tensor], finetune: str, lora: LoraConfig, out_dir: str | Path,
                         unet_config: dict | None = None) -> Path:
    """Write trained weights without needing the model: `pytorch_lora_weights.safetensors` (diffusers LoRA
    format with rank/alpha as metadata, loadable by `pipe.load_lora_weights(out_dir)`) or, for a full
    fine-tune, a diffusers `unet/` folder (`unet_config` is the UNet's config dict)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if finetune == "lora":
        layers = convert_state_dict_to_diffusers(dict(state))
        metadata = peft_lora_config(lora).to_dict()
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=metadata)
    else:
        if unet_config is None:
            raise ValueError("a full fine-tune checkpoint needs the UNet config")
        (out / "unet").mkdir(exist_ok=True)
        weights = out / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        (out / "unet" / "config.json").write_text(json.dumps(dict(unet_config), indent=2, default=str))
    return out
