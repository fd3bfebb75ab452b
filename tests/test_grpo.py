import numpy as np
import pytest
import torch

from safediff.common.grpo import group_advantages, kl_to_reference, ppo_clip_loss, zero_std_fraction


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 10.0]])
    adv = group_advantages(rewards, eps=1e-8, clip=2.5)
    # row 0: mean 2.5, unbiased std sqrt(5/3) = 1.290994
    np.testing.assert_allclose(adv[0].numpy(), np.array([-1.5, -0.5, 0.5, 1.5]) / 1.2909944, rtol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # no signal in a constant group
    # row 2: mean 2.5, std 5 -> (-0.5, -0.5, -0.5, 1.5): inside the clamp
    np.testing.assert_allclose(adv[2].numpy(), [-0.5, -0.5, -0.5, 1.5], rtol=1e-6)
    big = group_advantages(torch.tensor([[0.0] * 15 + [1.0]]), clip=2.5)
    assert big.max().item() == 2.5  # (1 - 1/16) / 0.25 = 3.75 before the clamp
    assert zero_std_fraction(rewards) == pytest.approx(1 / 3)


def test_ppo_clip_loss_by_hand():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    old = torch.zeros(4)
    terms = ppo_clip_loss(adv, ratio.log(), old, clip_range=0.2)
    # per sample max(-A r, -A clip(r)): A=1,r=1.5 -> max(-1.5,-1.2) = -1.2; A=1,r=.5 -> max(-.5,-.8) = -.5
    # A=-1,r=1.5 -> max(1.5,1.2) = 1.5; A=-1,r=.5 -> max(.5,.8) = .8
    assert terms.loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, abs=1e-6)
    assert terms.clipped.tolist() == [True, True, True, True]
    assert terms.approx_kl.item() == pytest.approx(0.5 * (2 * np.log(1.5) ** 2 + 2 * np.log(0.5) ** 2) / 4, rel=1e-5)


def test_ppo_gradient_vanishes_only_where_clipped():
    logp = torch.zeros(2, requires_grad=True)
    old = torch.tensor([-0.5, 0.0])  # ratio e^0.5 (clipped for A > 0) and 1 (not clipped)
    ppo_clip_loss(torch.tensor([1.0, 1.0]), logp, old, 0.2).loss.backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[1].item() == pytest.approx(-0.5)


def test_kl_to_reference_by_hand():
    mean, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    std = torch.tensor([1.0, 0.5]).view(2, 1, 1, 1)
    torch.testing.assert_close(kl_to_reference(mean, ref, std), torch.tensor([0.5, 2.0]))


def test_pooled_advantages_share_one_scale_across_groups():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.2]])
    adv = group_advantages(rewards, eps=1e-8, clip=2.5, scale="pooled")
    # unbiased variances by hand: 5/3, 0, and (3 * 0.05^2 + 0.15^2) / 3 = 0.01; pooled s = sqrt((5/3 + 0.01) / 3)
    s = ((5 / 3 + 0.01) / 3) ** 0.5
    np.testing.assert_allclose(adv[0].numpy(), np.array([-1.5, -0.5, 0.5, 1.5]) / s, rtol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))
    np.testing.assert_allclose(adv[2].numpy(), np.array([-0.05, -0.05, -0.05, 0.15]) / s, rtol=1e-5)
    # the reference ("group") scales the near-constant third group up to unit size: 0.15 / 0.1
    assert group_advantages(rewards)[2, 3].item() == pytest.approx(1.5, rel=1e-5)


def test_pooled_advantages_pool_within_each_prompt_source():
    # sources 0, 1, 0: groups 0 and 2 share a pool, group 1 is alone in its own
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.2], [0.0, 0.0, 0.0, 0.2]])
    adv = group_advantages(rewards, scale="pooled", sources=torch.tensor([0, 1, 0]))
    s0 = ((5 / 3 + 0.01) / 2) ** 0.5  # unbiased variances 5/3 and 0.01, pooled over source 0
    np.testing.assert_allclose(adv[0].numpy(), np.array([-1.5, -0.5, 0.5, 1.5]) / s0, rtol=1e-5)
    np.testing.assert_allclose(adv[2].numpy(), np.array([-0.05, -0.05, -0.05, 0.15]) / s0, rtol=1e-5)
    np.testing.assert_allclose(adv[1].numpy(), np.array([-0.5, -0.5, -0.5, 1.5]), rtol=1e-5)  # its own std: 0.1


def test_kl_controlled_lr_by_hand():
    from safediff.common.grpo import kl_controlled_lr

    # four times the target: sqrt(1/4) = 1/2 of the rate
    assert kl_controlled_lr(4e-3, 4e-3, 1e-3, max_lr=5e-3) == pytest.approx(2e-3, rel=1e-12)
    # far under the target: at most 1.5x per step, never above the configured rate
    assert kl_controlled_lr(2e-3, 1e-6, 1e-3, max_lr=5e-3) == pytest.approx(3e-3, rel=1e-12)
    assert kl_controlled_lr(4e-3, 1e-6, 1e-3, max_lr=5e-3) == pytest.approx(5e-3, rel=1e-12)
    assert kl_controlled_lr(4e-3, 0.0, 1e-3, max_lr=5e-3) == pytest.approx(5e-3, rel=1e-12)  # nothing measured
    # a runaway step: 10^6 x the target would ask for 1/1000 of the rate; the floor is 1/100 of the configured one
    assert kl_controlled_lr(5e-3, 1.0, 1e-6, max_lr=5e-3) == pytest.approx(5e-5, rel=1e-12)
    assert kl_controlled_lr(1e-3, 1.1e-3, 1.1e-3, max_lr=5e-3) == pytest.approx(1e-3, rel=1e-12)  # on target


def test_decoupled_terms_by_hand():
    from safediff.common.grpo import behaviour_weights

    prox, behav = torch.tensor([0.0, -1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -1.0, -5.0])
    w = behaviour_weights(prox, behav, cap=2.0)  # exp(prox - behav) = 1, e^-1, e, e^5 -> truncated at 2
    np.testing.assert_allclose(w.numpy(), [1.0, np.exp(-1.0), 2.0, 2.0], rtol=1e-6)
    # terms whose behaviour policy is further than max_log_ratio from pi_prox, on either side, are dropped
    np.testing.assert_allclose(behaviour_weights(prox, behav, cap=2.0, max_log_ratio=1.5).numpy(),
                               [1.0, np.exp(-1.0), 2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(behaviour_weights(prox, behav, cap=2.0, max_log_ratio=0.5).numpy(), [1.0, 0, 0, 0])
    adv, logp = torch.tensor([1.0, 1.0, -1.0, 1.0]), torch.log(torch.tensor([1.5, 1.0, 0.5, 1.0])) + prox
    terms = ppo_clip_loss(adv, logp, prox, clip_range=0.2, weights=w)
    # per term max(-A r, -A clip(r)) with r vs prox: -1.2, -1, 0.8, -1; weighted 1, e^-1, 2, 2
    assert terms.loss.item() == pytest.approx((-1.2 - np.exp(-1.0) + 1.6 - 2.0) / 4, abs=1e-6)
    far = ppo_clip_loss(torch.ones(1), torch.tensor([1e4]), torch.zeros(1), 0.2)
    assert torch.isfinite(far.ratio).all() and far.ratio.item() == pytest.approx(np.exp(20.0), rel=1e-5)
