"""The single-process loop end to end: learning, on-policy ratios, bad rewards, KL, determinism, CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from safediff.reward_server.steering import RewardOutput
from safediff.runtime.local import train


def brightness(images, prompts, unsafe=None, groups=None):
    return RewardOutput(rewards=images.float().mean(dim=(1, 2, 3)) / 255)


def _colour_cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_model, *overrides):
    return tiny_config(tiny_dir, tmp_path, prompt_file, "sampler.height=16", "sampler.width=16",
                       "grpo.updates_per_step=1", "grpo.micro_batch_size=16", "optim.lr=1e-2",
                       *overrides, model=colour_model)


def _stock_brightness(model_dir, adapter_dir=None, n=32):
    """Mean image brightness per seed from a stock diffusers pipeline (DDIM, eta=1), optionally with our LoRA."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter_dir is not None:
        pipe.load_lora_weights(adapter_dir)
    out = []
    for seed in range(n):
        image = pipe("an image", num_inference_steps=10, guidance_scale=5.0, eta=1.0, height=16, width=16,
                     generator=torch.Generator().manual_seed(10_000 + seed), output_type="np").images
        out.append(float(image.mean()))
    return np.array(out)


@pytest.mark.slow
def test_grpo_raises_a_known_reward_and_starts_on_policy(tiny_dir, tmp_path, prompt_file, colour_model, tiny_config):
    cfg = _colour_cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_model, "run.steps=6", "run.name=learn")
    result = train(cfg, reward_fn=brightness, progress=False)
    first = result.metrics[0]
    # step 0: the learner's recomputed log-probs equal the recorded ones, for every sample and timestep
    assert first["first_update_max_abs_log_ratio"] < 1e-5
    assert abs(first["ratio_mean"] - 1) < 1e-5 and first["ratio_std"] < 1e-5 and first["clipfrac"] == 0.0

    # held-out seeds through a stock diffusers pipeline, paired: base vs base + the saved adapter
    before = _stock_brightness(colour_model)
    after = _stock_brightness(colour_model, result.run_dir / "adapter")
    diff = after - before
    t_stat = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    # null (no learning): t ~ Student-t(31), P(t > 5) < 1e-5
    assert diff.mean() > 0.01 and t_stat > 5, (before.mean(), after.mean(), t_stat)


def test_nan_rewards_drop_the_group_and_training_goes_on(tiny_dir, tmp_path, prompt_file, colour_model, tiny_config):
    def half_nan(images, prompts, unsafe=None, groups=None):
        rewards = brightness(images, prompts).rewards
        rewards[:8] = float("nan")  # the first group of every step
        return RewardOutput(rewards=rewards)

    cfg = _colour_cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_model, "run.steps=2")
    result = train(cfg, reward_fn=half_nan, progress=False)
    assert [m["dropped_groups"] for m in result.metrics] == [1, 1]
    assert all(math.isfinite(m["reward_mean"]) and math.isfinite(m["loss"]) for m in result.metrics)
    assert result.metrics[-1]["policy_version"] == 1


def test_kl_penalty_to_the_adapter_free_reference(tiny_dir, tmp_path, prompt_file, colour_model, tiny_config):
    cfg = _colour_cfg(tiny_config, tiny_dir, tmp_path, prompt_file, colour_model, "run.steps=2", "grpo.kl_beta=0.1")
    metrics = train(cfg, reward_fn=brightness, progress=False).metrics
    assert metrics[0]["kl_ref"] == 0.0  # LoRA B starts at 0: the policy is the reference
    assert metrics[1]["kl_ref"] > 0.0


@pytest.mark.slow
def test_same_seed_same_adapter(tiny_dir, tmp_path, prompt_file, tiny_config):
    runs = [train(tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=2", f"run.name=r{i}", f"run.seed={s}"),
                  progress=False) for i, s in enumerate([5, 5, 6])]
    assert runs[0].checksum == runs[1].checksum != runs[2].checksum
    assert runs[0].metrics[1]["reward_mean"] == runs[1].metrics[1]["reward_mean"]


@pytest.mark.slow
def test_cli_train_writes_metrics_checkpoints_and_plot(tiny_dir, tmp_path, prompt_file):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "safediff.cli", "train", "--config", "cpu_demo",
           f"model.pretrained={tiny_dir / 'sd'}", f"reward.clip.model=local-dir:{tiny_dir / 'clip'}",
           f"prompts.sources=[{{path: {prompt_file}}}]", f"run.output_dir={out}", "run.steps=3",
           "run.save_every=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = out / "cpu-demo"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for key in ("reward_mean", "reward_std", "cos_prompt_mean", "cos_safe_mean", "zero_std_frac", "approx_kl",
                "clipfrac", "ratio_mean", "ratio_std", "grad_norm", "time_generate", "images_per_s"):
        assert all(key in m for m in lines), key
    assert (run / "checkpoints/step_2/pytorch_lora_weights.safetensors").is_file()
    assert (run / "checkpoints/step_2/config.yaml").is_file()
    state = json.loads((run / "adapter/state.json").read_text())
    assert state["step"] == 3 and state["policy_version"] == 3 and state["checksum"] in proc.stdout
    assert (run / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_is_one_line(tmp_path, tiny_dir):
    cmd = [sys.executable, "-m", "safediff.cli", "train", "--config", "cpu_demo",
           f"model.pretrained={tmp_path / 'missing'}", f"run.output_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "model.pretrained" in proc.stderr and "Traceback" not in proc.stderr
