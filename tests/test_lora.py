import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from common.config import LoraConfig
from common.lora import (
    attach_lora,
    count_lora_modules,
    load_trainable_state,
    save_trainable_state,
    state_checksum,
    trainable_state,
)
from common.models import load_bundle


def _images(pipe):
    return pipe("a cat", num_inference_steps=4, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _perturbed_lora_unet(tiny_dir, cfg):
    bundle = load_bundle(str(tiny_dir / "sd"))
    assert attach_lora(bundle.unet, cfg, seed=1) == 32  # 8 attention blocks x (q, k, v, out)
    state = trainable_state(bundle.unet, "lora")
    gen = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()}
    load_trainable_state(bundle.unet, "lora", state)
    return bundle.unet, state


def test_stock_pipeline_loads_our_lora_and_reproduces_our_policy(tiny_dir, tmp_path):
    cfg = LoraConfig(rank=4, alpha=16.0)  # alpha != rank: the scale must travel with the file
    unet, state = _perturbed_lora_unet(tiny_dir, cfg)
    save_trainable_state(trainable_state(unet, "lora"), "lora", cfg, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    stock = StableDiffusionPipeline.from_pretrained(tiny_dir / "sd", safety_checker=None)
    base = _images(stock)
    stock.load_lora_weights(tmp_path / "adapter")
    assert count_lora_modules(stock.unet, adapter=None) == 32
    with_lora = _images(stock)
    assert abs(with_lora - base).max() > 1e-3  # the adapter changes the output

    ours = StableDiffusionPipeline.from_pretrained(tiny_dir / "sd", safety_checker=None)
    ours.unet = unet
    assert abs(_images(ours) - with_lora).max() < 1e-5  # and the file reproduces our policy exactly


def test_trainable_state_roundtrip_and_mismatch(tiny_dir):
    unet, state = _perturbed_lora_unet(tiny_dir, LoraConfig(rank=4, alpha=4.0))
    assert state_checksum(trainable_state(unet, "lora")) == state_checksum(state)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(unet, "lora", bad)
    changed = {k: v + 1 for k, v in state.items()}
    assert state_checksum(changed) != state_checksum(state)


def test_lora_targets_must_match(tiny_dir):
    bundle = load_bundle(str(tiny_dir / "sd"))
    with pytest.raises(ValueError):
        attach_lora(bundle.unet, LoraConfig(target_modules=("no_such_proj",)), seed=0)


def test_full_finetune_saves_a_diffusers_unet(tiny_dir, tmp_path):
    bundle = load_bundle(str(tiny_dir / "sd"))
    with torch.no_grad():
        bundle.unet.conv_out.bias.add_(1.0)
    save_trainable_state(trainable_state(bundle.unet, "full"), "full", LoraConfig(), tmp_path / "ckpt",
                         bundle.unet.config)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "ckpt" / "unet")
    torch.testing.assert_close(loaded.conv_out.bias, bundle.unet.conv_out.bias)
