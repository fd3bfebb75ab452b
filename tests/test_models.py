import shutil

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from safediff.common.models import ModelLoadError, load_bundle, offline_clip_tokenizer


def test_offline_tokenizer_matches_clip_ids():
    ours = offline_clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")  # OpenAI CLIP BPE, shipped with open_clip
    texts = ["a photo of a cat riding a bike", "Naked, violent: blood & gore!!", "émigré café 1234"]
    a = ours(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    b = reference(texts)
    for row_a, row_b in zip(a, b):
        n = int((row_b != 0).sum())  # open_clip pads with 0, SD's tokenizer with <|endoftext|>
        assert torch.equal(row_a[:n], row_b[:n])
        assert row_a[0] == 49406 and row_a[n - 1] == 49407


def test_tiny_bundle_loads_through_our_loader_and_stock_pipeline(tiny_dir):
    bundle = load_bundle(str(tiny_dir / "sd"))
    assert type(bundle.unet).__name__ == "UNet2DConditionModel"
    assert type(bundle.scheduler).__name__ == "DDIMScheduler"
    assert bundle.vae_scale_factor == 2
    emb = bundle.encode_prompts(["a cat", "a dog"]).states
    assert emb.shape == (2, 77, 32) and not torch.equal(emb[0], emb[1])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "sd", safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == 32


def test_strict_loading_rejects_mismatched_weights(tiny_dir, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_dir / "sd", broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["an.extra.key"] = torch.zeros(1)
    state.pop(next(iter(state)))
    save_file(state, weights)
    with pytest.raises(ModelLoadError, match="model.pretrained: unet .* does not match"):
        load_bundle(str(broken))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model.pretrained: .*not a directory"):
        load_bundle(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model.pretrained: cannot load"):
        load_bundle(str(tmp_path / "empty"))


def test_loading_a_bundle_prints_no_third_party_progress_bars(tiny_dir, capfd):
    from safediff.common.models import load_bundle

    load_bundle(str(tiny_dir / "sd"))
    out, err = capfd.readouterr()
    assert "Loading" not in out + err and "%|" not in out + err
