"""The shipped miniature-world models: they load through the same code as Stable Diffusion and open_clip
weights, and a short seeded GRPO run on the world lowers the unsafe rate by more than chance allows."""

import json
import math

import pytest
import torch

from safediff.common.assets import package_root
from safediff.common.config import ClipConfig, load_config
from safediff.common.flow_models import load_sd3_bundle
from safediff.common.models import load_bundle
from safediff.common.policy import Policy
from safediff.reward_server.clip_model import load_clip
from safediff.runtime.local import train
from safediff.world.data import prompt_sets
from safediff.world.evaluate import judge_prompts

WEIGHTS = package_root() / "world" / "weights"


def test_shipped_weights_are_small_safetensors_with_a_model_card():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    for model in ("sd", "clip", "flow"):  # each model at most 20 MB
        assert sum(p.stat().st_size for p in files if p.is_relative_to(WEIGHTS / model)) <= 20 * 2**20, model
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]  # nothing to unpickle
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    scores = json.loads((WEIGHTS / "scores.json").read_text())
    assert "python -m safediff.world.train" in card and scores["base_model"]["unsafe_rate_glyph"] >= 0.0


def test_shipped_models_load_in_stock_sd_and_sd3_pipelines_and_open_clip():
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    bundle = load_bundle(str(WEIGHTS / "sd"))  # strict: any missing or unexpected key is an error
    assert bundle.vae_scale_factor == 2 and bundle.unet.config.sample_size == 16
    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS / "sd"), safety_checker=None)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    flow = load_sd3_bundle(str(WEIGHTS / "flow"))
    assert flow.vae_scale_factor == 2 and flow.transformer.config.patch_size == 2
    stock = StableDiffusion3Pipeline.from_pretrained(str(WEIGHTS / "flow"), text_encoder_3=None, tokenizer_3=None)
    assert type(stock.transformer).__name__ == "SD3Transformer2DModel"
    clip = load_clip(ClipConfig(model=f"local-dir:{WEIGHTS / 'clip'}"))
    text = clip.encode_text(["a red square", "a magenta square", "a cross"])
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)


def _unsafe_flags(policy, cfg, specs, n):
    judged = judge_prompts(policy, cfg.sampler, specs, n, seed=123, progress=False)
    return [u[j.spec.family] for j in judged for u in j.unsafe]


@pytest.mark.slow
def test_a_short_grpo_run_on_the_world_lowers_the_unsafe_rate(tmp_path):
    cfg = load_config("world", [
        f"run.output_dir={tmp_path}", "run.name=short", "run.steps=5", "run.save_every=100", "optim.lr=1e-2",
        "tracking.sample_prompts=[]",
        "grpo.clip_range=1e-2", "grpo.adv_scale=group", "reward.alpha=1.0", "reward.steer=all",
        f"model.pretrained={WEIGHTS / 'sd'}", f"reward.clip.model=local-dir:{WEIGHTS / 'clip'}",
        "prompts.sources=[{path: pkg:world/prompts/glyph_train.txt, unsafe: true}, "
        "{path: pkg:world/prompts/hazard_train.txt, unsafe: true}]",
        # a cheaper run than the demo's (5 steps at lr 1e-2, 8 sampling steps, 4 trained, one update): 95 s on a
        # 2-core machine; measured 125 -> 22 unsafe images of 168 (105 fixed, 2 broken), sign test p = 3.6e-29
        "sampler.num_steps=8", "grpo.train_timesteps=4", "grpo.updates_per_step=1"])
    result = train(cfg, progress=False)
    specs = prompt_sets()["glyph_eval"] + prompt_sets()["hazard_eval"]
    policy = Policy.from_config(cfg)
    before = _unsafe_flags(policy, cfg, specs, 8)
    policy.load_state(policy.trainable.load_saved(result.run_dir / "adapter"), result.final_version)
    after = _unsafe_flags(policy, cfg, specs, 8)
    # paired on the same noise: a sign test on the images whose verdict changed
    fixed = sum(b and not a for b, a in zip(before, after))
    broken = sum(a and not b for b, a in zip(before, after))
    p_value = sum(math.comb(fixed + broken, k) for k in range(fixed, fixed + broken + 1)) / 2 ** (fixed + broken)
    assert sum(after) < sum(before) and p_value < 1e-3, (sum(before), sum(after), fixed, broken)
