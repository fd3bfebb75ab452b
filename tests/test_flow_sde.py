"""The stochastic flow-matching step (common/flow_sde.py) against an independent float64 computation written from
the SDE and CPS formulas, and against diffusers' FlowMatchEulerDiscreteScheduler at zero noise (the sampling loop
is tested against the stock SD3 pipeline in test_flow_models.py)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from safediff.common.flow_sde import flow_step_with_logprob

SHAPE = (3, 4, 8, 8)


def _schedule(steps: int = 10) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's shift
    scheduler.set_timesteps(steps)
    return scheduler


def _reference(x, v, sigma, sigma_next, a, kind, sigma_max):
    """Mean, std and the Gaussian log-density (float64, one sample at a time, written from the papers' equations:
    the drift as velocity plus half the noise scale times the score -eps/sigma)."""
    x, v = x.double(), v.double()
    if kind == "sde":
        s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
        dt = sigma_next - sigma
        eps_hat = x + (1 - sigma) * v
        score = -eps_hat / sigma
        drift = v - 0.5 * s**2 * score
        mean, std = x + drift * dt, s * math.sqrt(-dt)
    else:
        x0_hat, eps_hat = x - sigma * v, x + (1 - sigma) * v
        std = sigma_next * math.sin(a * math.pi / 2)
        mean = (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - std**2) * eps_hat
    return mean, std


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_the_step_is_the_gaussian_of_the_formulas_in_float64(kind):
    torch.manual_seed(0)
    sched = _schedule()
    sigmas = sched.sigmas
    index = torch.tensor([0, 4, 8])  # each sample at its own step: the first (sigma 1), a middle one, a late one
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    x, v, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    step = flow_step_with_logprob(v, x, sigma, sigma_next, 0.7, kind, sigma_max=sigmas[1], noise=noise)
    for b in range(SHAPE[0]):
        mean, std = _reference(x[b], v[b], sigma[b].item(), sigma_next[b].item(), 0.7, kind, sigmas[1].item())
        torch.testing.assert_close(step.mean[b].double(), mean, rtol=1e-5, atol=1e-6)
        assert step.std[b].item() == pytest.approx(std, rel=1e-6)
        torch.testing.assert_close(step.prev_sample[b].double(), mean + std * noise[b].double(), rtol=1e-5, atol=1e-6)
        log_prob = torch.distributions.Normal(mean, std).log_prob(step.prev_sample[b].double()).mean()
        assert step.log_prob[b].item() == pytest.approx(log_prob.item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_at_zero_noise_the_step_is_diffusers_euler_step(kind):
    torch.manual_seed(1)
    sched = _schedule(8)
    x = torch.randn(1, *SHAPE[1:])
    ours = theirs = x
    for i, t in enumerate(sched.timesteps[:-1]):  # CPS's last step is the same Euler step, but has no density
        v = torch.randn_like(x)
        theirs = sched.step(v, t, theirs).prev_sample
        ours = flow_step_with_logprob(v, ours, sched.sigmas[i:i + 1], sched.sigmas[i + 1:i + 2], 0.0, kind,
                                      sigma_max=sched.sigmas[1], noise=torch.randn_like(x)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_stored_step_is_rescored_to_the_same_log_prob_with_the_analytic_gradient():
    """Recomputing a stored step gives the recorded log-prob exactly (the on-policy ratio is 1), and its gradient in
    the velocity is d/dv mean_d[-(x' - mean)^2 / (2 std^2)] = (x' - mean) / std^2 * dmean/dv / D, with
    dmean/dv = (1 + s^2 (1 - sigma) / (2 sigma)) dt for the SDE step."""
    torch.manual_seed(2)
    sched = _schedule()
    sigma, sigma_next = sched.sigmas[3:4].repeat(2), sched.sigmas[4:5].repeat(2)
    x, v = torch.randn(2, *SHAPE[1:]), torch.randn(2, *SHAPE[1:])
    drawn = flow_step_with_logprob(v, x, sigma, sigma_next, 0.7, noise=torch.randn_like(x))
    v.requires_grad_(True)
    again = flow_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=drawn.prev_sample)
    assert torch.equal(again.log_prob.detach(), drawn.log_prob)
    again.log_prob.sum().backward()
    s2, dt = 0.7**2 * sigma[0] / (1 - sigma[0]), sigma_next[0] - sigma[0]
    dmean_dv = (1 + s2 * (1 - sigma[0]) / (2 * sigma[0])) * dt
    expected = (drawn.prev_sample - drawn.mean) / drawn.std**2 * dmean_dv / x[0].numel()
    torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-7)


def test_cps_keeps_the_paths_noise_level_exactly():
    """With the true velocity, a CPS step from x_sigma = (1 - sigma) x0 + sigma eps lands on the path at sigma_next:
    x0's coefficient is 1 - sigma_next and the noise's total variance sigma_next^2 (measured over draws)."""
    torch.manual_seed(3)
    sigma, sigma_next = 0.8, 0.6
    x0, eps = torch.randn(1, 1, 16, 16).double(), torch.randn(4000, 1, 16, 16).double()
    x = (1 - sigma) * x0 + sigma * eps
    step = flow_step_with_logprob(eps - x0, x, torch.full((4000,), sigma), torch.full((4000,), sigma_next), 0.7,
                                  "cps", noise=torch.randn_like(x))
    residual = step.prev_sample.double() - (1 - sigma_next) * x0
    assert residual.mean().item() == pytest.approx(0.0, abs=2e-3)
    assert residual.var().item() == pytest.approx(sigma_next**2, rel=1e-2)


def test_steps_without_a_density_are_refused():
    sched = _schedule(4)
    x = torch.randn(1, *SHAPE[1:])
    with pytest.raises(ValueError, match="no log-probability"):  # CPS to sigma 0
        flow_step_with_logprob(x, x, sched.sigmas[-2:-1], sched.sigmas[-1:], 0.7, "cps", noise=x)
    with pytest.raises(ValueError, match="needs sigma_max"):
        flow_step_with_logprob(x, x, sched.sigmas[:1], sched.sigmas[1:2], 0.7, "sde", noise=x)

