"""The SD3 (flow-matching) family through the service: the learner re-scores a flow rollout exactly, the KL
reference is the adapter-free transformer, and a short GRPO run changes what a stock StableDiffusion3Pipeline with
the exported adapter draws (the UNet family's tests, tests/test_train.py, for the other family)."""

import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from safediff.actors.rollout import Rollout
from safediff.common.config import ConfigError
from safediff.common.messages import PromptGroup
from safediff.common.policy import Policy
from safediff.reward_server.steering import RewardOutput
from safediff.runtime.local import train
from safediff.world.evaluate import EVAL_STEP

SD3 = ("model.family=sd3", "model.max_sequence_length=0")


def brightness(images, prompts, unsafe=None, groups=None):
    return RewardOutput(rewards=images.float().mean(dim=(1, 2, 3)) / 255)


def _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_sd3, *overrides):
    return tiny_config(tiny_dir, tmp_path, prompt_file, *SD3, "sampler.height=16", "sampler.width=16",
                       "grpo.updates_per_step=1", "grpo.micro_batch_size=16", *overrides, model=colour_sd3)


def test_the_learner_rescores_a_flow_rollout_exactly_and_the_reference_is_the_base_model(
        tiny_dir, tmp_path, prompt_file, colour_sd3, tiny_config):
    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_sd3, "run.steps=2", "grpo.kl_beta=0.1",
               "optim.lr=1e-2")
    metrics = train(cfg, reward_fn=brightness, progress=False).metrics
    first = metrics[0]
    # step 0: the learner's recomputed log-probs equal the recorded ones, for every sample and timestep
    assert first["first_update_max_abs_log_ratio"] < 1e-5
    assert abs(first["ratio_mean"] - 1) < 1e-5 and first["ratio_std"] < 1e-5 and first["clipfrac"] == 0.0
    assert metrics[0]["kl_ref"] == 0.0  # LoRA B starts at 0: the policy is the reference
    assert metrics[1]["kl_ref"] > 0.0


def test_cps_trains_every_step_but_its_last(tiny_dir, tmp_path, prompt_file, colour_sd3, tiny_config):
    with pytest.raises(ConfigError, match="grpo.train_timesteps"):
        _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_sd3, "sampler.sde_kind=cps")
    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_sd3, "sampler.sde_kind=cps",
               "grpo.train_timesteps=3", "run.steps=1")
    first = train(cfg, reward_fn=brightness, progress=False).metrics[0]
    assert first["first_update_max_abs_log_ratio"] < 1e-5 and math.isfinite(first["loss"])


def _stock_brightness(model_dir, adapter_dir=None, n=128):
    """Mean image brightness per seed from a stock StableDiffusion3Pipeline (its own flow-matching Euler sampler:
    the ODE, not the training SDE), optionally with our LoRA."""
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    if adapter_dir is not None:
        pipe.load_lora_weights(adapter_dir)
    images = pipe("an image", num_inference_steps=10, guidance_scale=5.0, height=16, width=16, max_sequence_length=0,
                  num_images_per_prompt=n, generator=[torch.Generator().manual_seed(10_000 + s) for s in range(n)],
                  output_type="np").images
    return images.mean(axis=(1, 2, 3))


def _t_stat(before: np.ndarray, after: np.ndarray) -> float:
    diff = after - before
    return float(diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff))))


def _sampler_brightness(cfg, adapter_dir=None, n=128) -> np.ndarray:
    """Brightness per image of "an image" drawn by our sampler (the training SDE) on noise no training step used."""
    policy = Policy.from_config(cfg)
    if adapter_dir is not None:
        policy.load_state(policy.trainable.load_saved(adapter_dir), version=1)
    group = PromptGroup(step=EVAL_STEP, group_index=0, prompt="an image", source=0, prompt_index=0, unsafe=None)
    images = Rollout(policy, cfg.sampler, n, cfg.run.seed).generate([group])[0].images
    return images.float().mean(dim=(1, 2, 3)).numpy() / 255


@pytest.mark.slow
def test_grpo_on_the_flow_family_raises_the_reward_and_the_stock_pipeline_draws_it(tiny_dir, tmp_path, prompt_file,
                                                                                  colour_sd3, tiny_config):
    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_sd3, "run.steps=12", "optim.lr=1e-2")
    adapter = train(cfg, reward_fn=brightness, progress=False).run_dir / "adapter"
    # held-out noise, paired (base vs base + the exported adapter); null (no learning): t ~ Student-t(127)
    before, after = _sampler_brightness(cfg), _sampler_brightness(cfg, adapter)
    assert after.mean() > before.mean() + 0.01 and _t_stat(before, after) > 5, (before.mean(), after.mean())
    # the stock pipeline samples the ODE, not the SDE that was trained: the gain carries over, more noisily
    before, after = _stock_brightness(colour_sd3), _stock_brightness(colour_sd3, adapter)
    assert after.mean() > before.mean() + 0.01 and _t_stat(before, after) > 3, (before.mean(), after.mean())
