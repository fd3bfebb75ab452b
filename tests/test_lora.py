import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from safediff.common.config import LoraConfig, load_config
from safediff.common.models import load_bundle
from safediff.common.trainable import (
    FullTrainable,
    LoraTrainable,
    count_lora_modules,
    state_checksum,
    trainable_for,
)


def _images(pipe):
    return pipe("a cat", num_inference_steps=4, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _perturbed_lora_unet(tiny_dir, cfg):
    bundle, lora = load_bundle(str(tiny_dir / "sd")), LoraTrainable(cfg)
    assert lora.attach(bundle.unet, seed=1) == 32  # 8 attention blocks x (q, k, v, out)
    gen = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in lora.state(bundle.unet).items()}
    lora.load(bundle.unet, state)
    assert lora.bound_modules(bundle.unet) == lora.expected_modules(state) == 32
    return bundle.unet, state


def test_stock_pipeline_loads_our_lora_and_reproduces_our_policy(tiny_dir, tmp_path):
    cfg = LoraConfig(rank=4, alpha=16.0)  # alpha != rank: the scale must travel with the file
    unet, state = _perturbed_lora_unet(tiny_dir, cfg)
    lora = LoraTrainable(cfg)
    lora.save(lora.state(unet), tmp_path / "adapter")
    assert (tmp_path / "adapter" / lora.weights_file).is_file()
    assert state_checksum(lora.load_saved(tmp_path / "adapter")) == state_checksum(state)  # the export reads back

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
    lora = LoraTrainable(LoraConfig(rank=4, alpha=4.0))
    unet, state = _perturbed_lora_unet(tiny_dir, lora.cfg)
    assert state_checksum(lora.state(unet)) == state_checksum(state)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        lora.load(unet, bad)
    changed = {k: v + 1 for k, v in state.items()}
    assert state_checksum(changed) != state_checksum(state)


def test_lora_targets_must_match(tiny_dir):
    bundle = load_bundle(str(tiny_dir / "sd"))
    with pytest.raises(ValueError):
        LoraTrainable(LoraConfig(target_modules=("no_such_proj",))).attach(bundle.unet, seed=0)


def test_full_finetune_saves_a_diffusers_unet(tiny_dir, tmp_path):
    bundle, full = load_bundle(str(tiny_dir / "sd")), FullTrainable(str(tiny_dir / "sd"))
    full.attach(bundle.unet, seed=0)
    with torch.no_grad():
        bundle.unet.conv_out.bias.add_(1.0)
    state = full.state(bundle.unet)
    full.save(state, tmp_path / "ckpt")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "ckpt" / "unet")
    torch.testing.assert_close(loaded.conv_out.bias, bundle.unet.conv_out.bias)
    assert state_checksum(full.load_saved(tmp_path / "ckpt")) == state_checksum(state)
    assert full.bound_modules(bundle.unet) == full.expected_modules(state) == len(state)
    with pytest.raises(RuntimeError, match="model.finetune=lora"):
        full.reference(bundle.unet)


def test_the_config_picks_the_variant(tiny_dir):
    assert isinstance(trainable_for(load_config("cpu_demo")), LoraTrainable)
    full = trainable_for(load_config("cpu_demo", ["model.finetune=full", f"model.pretrained={tiny_dir / 'sd'}"]))
    assert isinstance(full, FullTrainable) and full.kind == "full"
