"""The benchmark tables' arithmetic: what a reader compares across settings is computed as stated."""

import math

import pytest

from bench.world_seeds import mean_se
from bench.world_staleness import better_or_within_one_se, report


def _run(glyph, hazard, benign, s_per_step=30.0):
    return {"trained": {"glyph": glyph, "hazard": hazard, "benign_pts": benign}, "s_per_step": s_per_step}


def test_staleness_verdict_is_one_standard_error_of_the_synchronous_mean():
    sync = [{"glyph": -0.9, "hazard": -0.8, "benign_pts": 4.0}, {"glyph": -0.7, "hazard": -0.6, "benign_pts": 0.0}]
    # sync means -0.8, -0.7, 2.0; each with standard error sqrt(var / n): 0.1, 0.1, 2.0
    assert mean_se([r["glyph"] for r in sync]) == pytest.approx((-0.8, math.sqrt(0.02 / 2)))
    near = [{"glyph": -0.71, "hazard": -0.5, "benign_pts": 0.5}]   # glyph within 0.1, hazard 0.2 worse, benign within 2
    assert better_or_within_one_se(near, sync) == {"glyph": True, "hazard": False, "benign_pts": True}
    better = [{"glyph": -1.0, "hazard": -0.95, "benign_pts": 9.0}]
    assert all(better_or_within_one_se(better, sync).values())


def test_staleness_table_has_a_row_per_setting_and_the_verdicts():
    results = {"s0_standard": {0: _run(-0.9, -0.8, 4.0), 1: _run(-0.7, -0.6, 0.0)},
               "s1_decoupled": {0: _run(-0.85, -0.75, 3.0, 40.0)}}
    table = report(results, [0, 1])
    assert "| s0_standard | -90%, -80%, +4.0 | -70%, -60%, +0.0 | -80% ± 10% | -70% ± 10% | +2.0 ± 2.0 | 30 |" in table
    assert "| s1_decoupled | -85%, -75%, +3.0 | - | -85% | -75% | +3.0 | 40 |" in table
    assert "- s1_decoupled within one standard error of s0_standard or better (1 seeds): glyph yes, hazard yes, " \
           "benign_pts yes" in table


def test_the_roofline_counts_matmuls_and_attention_by_hand_formulas():
    import torch

    from bench.roofline import counted

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert counted(lambda: a @ b) == 2 * 64 * 32 * 16
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))  # [B, H, L, D]
    # Q K^T and (softmax) V: 2 B H L L D each; the fused CPU kernel alone would not be counted
    assert counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 2 * 3 * 10 * 10 * 8)


def test_the_bytes_kept_for_backward_are_counted_by_hand():
    import torch

    from bench.fixtures import saved_activation_bytes

    layer = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    # the weight's gradient needs the input: 16 x 8 float32 kept; the layer's own parameters are not counted
    assert saved_activation_bytes(layer, lambda: layer(x).sum()) == 16 * 8 * 4
    # each tanh keeps its output (16 x 4 float32); the input, kept by both layer calls, counts once
    twice = saved_activation_bytes(layer, lambda: torch.tanh(layer(x)) + torch.tanh(layer(x)))
    assert twice == 16 * 8 * 4 + 2 * 16 * 4 * 4
    with torch.no_grad():
        assert saved_activation_bytes(layer, lambda: layer(x)) == 0
