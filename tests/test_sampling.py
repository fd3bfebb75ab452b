import math

import pytest
import torch
from diffusers import DDIMScheduler

from safediff.common.models import sd_ddim_scheduler
from safediff.common.sampling import ddim_step_with_logprob
from safediff.common.seeds import sample_seed, trajectory_noise

STEPS = 10


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler.from_config(sd_ddim_scheduler().config, prediction_type=prediction_type)


def _inputs(seed: int, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g), \
        torch.randn(batch, 4, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_equals_diffusers_ddim_step(prediction_type):
    ours_sched, ref = _scheduler(prediction_type), _scheduler(prediction_type)
    ref.set_timesteps(STEPS)
    for k, t in enumerate(ref.timesteps):  # every step, including the last (prev timestep < 0)
        model_output, sample, noise = _inputs(k)
        expected_mean = ref.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)).prev_sample
        expected_draw = ref.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
        step = ddim_step_with_logprob(ours_sched, model_output, torch.full((3,), int(t)), sample, STEPS, 1.0,
                                      noise=noise)
        torch.testing.assert_close(step.mean, expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.prev_sample, expected_draw, rtol=1e-5, atol=1e-5)


def test_log_prob_is_the_gaussian_density_averaged_over_dims():
    sched, ref = _scheduler("epsilon"), _scheduler("epsilon")
    ref.set_timesteps(STEPS)
    for k, t in enumerate(ref.timesteps):
        model_output, sample, x_prev = _inputs(100 + k)
        mean = ref.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)).prev_sample
        prev_t = int(t) - 1000 // STEPS
        std = math.sqrt(ref._get_variance(t, torch.tensor(prev_t)))  # diffusers' own sigma_t^2 (eta = 1)
        expected = torch.distributions.Normal(mean.double(), std).log_prob(x_prev.double()).mean(dim=(1, 2, 3))
        step = ddim_step_with_logprob(sched, model_output, torch.full((3,), int(t)), sample, STEPS, 1.0,
                                      prev_sample=x_prev)
        torch.testing.assert_close(step.log_prob.double(), expected, rtol=1e-5, atol=1e-4)
        assert step.log_prob.dtype == torch.float32


def test_per_sample_timesteps_match_one_at_a_time():
    sched = _scheduler("epsilon")
    sched.set_timesteps(STEPS)
    ts = sched.timesteps[[0, 4, 9]]
    model_output, sample, x_prev = _inputs(7)
    batched = ddim_step_with_logprob(sched, model_output, ts, sample, STEPS, 1.0, prev_sample=x_prev)
    for i, t in enumerate(ts):
        single = ddim_step_with_logprob(sched, model_output[i:i + 1], t.reshape(1), sample[i:i + 1], STEPS, 1.0,
                                        prev_sample=x_prev[i:i + 1])
        torch.testing.assert_close(batched.log_prob[i:i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i:i + 1], single.mean)


def test_noise_is_a_pure_function_of_its_coordinates():
    a = trajectory_noise(sample_seed(0, 3, 1, 2), 5, (4, 2, 2))
    assert torch.equal(a, trajectory_noise(sample_seed(0, 3, 1, 2), 5, (4, 2, 2)))
    others = [sample_seed(1, 3, 1, 2), sample_seed(0, 4, 1, 2), sample_seed(0, 3, 2, 2), sample_seed(0, 3, 1, 3)]
    assert len({sample_seed(0, 3, 1, 2), *others}) == 5


def _rollout(tiny_config, tiny_dir, prompt_file, tmp_path, *overrides):
    from safediff.actors.rollout import Rollout
    from safediff.common.policy import Policy
    from safediff.common.prompts import PromptStream

    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, *overrides)
    policy = Policy.from_config(cfg)
    rollout = Rollout(policy, cfg.sampler, cfg.grpo.group_size, cfg.run.seed)
    return rollout, PromptStream(cfg.prompts.sources, cfg.run.seed).next_groups(0, 2)


def test_same_seeds_same_images_any_batch_shape(tiny_dir, prompt_file, tmp_path, tiny_config):
    rollout, groups = _rollout(tiny_config, tiny_dir, prompt_file, tmp_path)
    first, again = rollout.generate(groups), rollout.generate(groups)
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
        assert a.latents.shape == (8, 5, 4, 16, 16) and a.log_probs.shape == (8, 4)  # tiny_config: 4 steps
        assert a.images.dtype == torch.uint8 and a.images.shape == (8, 3, 32, 32)
    small, groups_small = _rollout(tiny_config, tiny_dir, prompt_file, tmp_path, "sampler.batch_size=3")
    for a, b in zip(first, small.generate(groups_small)):
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-4)
    assert not torch.equal(first[0].latents[:, 0], first[1].latents[:, 0])  # groups get their own noise
    assert not torch.equal(first[0].latents[0, 0], first[0].latents[1, 0])  # so do samples
