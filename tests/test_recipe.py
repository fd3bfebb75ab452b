"""The step recipe both loops share: scoring a step's groups, and closing a step (log, checkpoint, stop)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from safediff.common.messages import PromptGroup
from safediff.common.metrics import PhaseTimer
from safediff.runtime.groups import merge_ranks
from safediff.runtime.recipe import StepRecipe
from safediff.runtime.run_store import Interrupted
from safediff.runtime.session import tracked_run


def _groups(sources: list[int]) -> list[PromptGroup]:
    return [PromptGroup(step=0, group_index=i, prompt=f"p{i}", source=s, prompt_index=i, unsafe=None)
            for i, s in enumerate(sources)]


def test_score_drops_non_finite_groups_and_computes_advantages_by_hand(tiny_config, tiny_dir, tmp_path, prompt_file):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "grpo.group_size=3", "grpo.prompts_per_step=3",
                      "grpo.updates_per_step=1", "grpo.micro_batch_size=9", "grpo.adv_clip=1.0")
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, float("nan"), 1.0], [5.0, 5.0, 5.0]])
    cos = torch.arange(9, dtype=torch.float32)
    with tracked_run(cfg, resume=False) as run:
        scored = StepRecipe(cfg, run, []).score(4, 7, _groups([0, 0, 1]), rewards,
                                                {"cos_prompt": cos, "cos_safe": None})
    assert scored.finite == [True, False, True]
    assert scored.kept(["a", "b", "c"]) == ["a", "c"]
    # group 0: mean 2, unbiased std 1 -> (-1, 0, 1), clipped to +-1; group 2: all equal -> 0
    torch.testing.assert_close(scored.advantages, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), atol=1e-6,
                               rtol=0)
    r = scored.record
    assert (r["step"], r["policy_version"], r["dropped_groups"]) == (4, 7, 1)
    assert r["reward_mean"] == pytest.approx((6 + 15) / 6)
    assert r["reward_std"] == pytest.approx(float(torch.tensor([1.0, 2, 3, 5, 5, 5]).std()))
    assert r["cos_prompt_mean"] == pytest.approx(4.0) and r["cos_safe_mean"] is None
    assert r["zero_std_frac"] == pytest.approx(0.5)


def test_a_step_with_every_group_dropped_has_no_advantages(tiny_config, tiny_dir, tmp_path, prompt_file):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file)
    with tracked_run(cfg, resume=False) as run:
        scored = StepRecipe(cfg, run, []).score(0, 0, _groups([0, 0]), torch.full((2, 8), float("inf")), {})
    assert scored.advantages is None and scored.record["reward_mean"] is None and scored.kept([1, 2]) == []


def test_close_logs_checkpoints_on_schedule_and_stops_on_request(tiny_config, tiny_dir, tmp_path, prompt_file):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=5", "run.save_every=2")
    saved, stop = [], []
    with tracked_run(cfg, resume=False) as run:
        recipe = StepRecipe(cfg, run, stop)
        with pytest.raises(Interrupted, match="after step 2"):
            for step in range(5):
                if step == 2:
                    stop.append(15)  # SIGTERM arrives during step 2
                recipe.close(step, {"step": step, "x": float("nan")}, step + 1, {"cursor": step}, saved.append)
        stored = [m["step"] for m in run.store.metrics()]
    assert saved == [2, 3]  # the schedule's step 2, then the stop's checkpoint after step 2
    lines = run.metrics.path.read_text().splitlines()
    assert len(lines) == 3 and '"x": null' in lines[0]  # NaN is written as null
    assert stored == [0, 1, 2]


def test_close_saves_at_the_last_step(tiny_config, tiny_dir, tmp_path, prompt_file):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=3", "run.save_every=2")
    saved = []
    with tracked_run(cfg, resume=False) as run:
        recipe = StepRecipe(cfg, run, [])
        for step in range(3):
            recipe.close(step, {"step": step}, step + 1, {}, saved.append)
    assert saved == [2, 3]


def test_phase_timer_adds_up_each_phase(monkeypatch):
    from safediff.common import metrics

    clock = iter([0.0, 1.0, 5.0, 7.0, 10.0, 10.5])  # a: 1 s then 2 s; b: 0.5 s
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    timer = PhaseTimer()
    for _ in range(2):
        with timer("a"):
            pass
    with pytest.raises(ValueError), timer("b"):
        raise ValueError  # a phase that fails is still timed
    assert timer.seconds == {"a": 3.0, "b": 0.5}


def test_merge_ranks_averages_diagnostics_and_takes_the_worst_times():
    merged = merge_ranks([{"loss": 1.0, "fetch_s": 0.5, "first_update_max_abs_log_ratio": 0.0, "kl_ref": None},
                          {"loss": 3.0, "fetch_s": 0.2, "first_update_max_abs_log_ratio": 2e-7, "kl_ref": None}])
    assert merged == {"loss": 2.0, "fetch_s": 0.5, "first_update_max_abs_log_ratio": 2e-7}
    assert not math.isnan(merged["loss"])


def test_an_on_policy_first_update_far_from_ratio_one_raises_an_alarm(tiny_config, tiny_dir, tmp_path, prompt_file,
                                                                       caplog):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=9", "run.save_every=9")
    with tracked_run(cfg, resume=False) as run:
        recipe = StepRecipe(cfg, run, [])
        for step, (first, stale) in enumerate([(2e-7, 0), (5e-3, 1), (5e-3, 0), (None, 0)]):
            recipe.close(step, {"step": step, "first_update_max_abs_log_ratio": first, "staleness_max": stale},
                         step + 1, {}, lambda done: None)
        alarms = [e for e in run.store.events() if e["kind"] == "log_ratio_alarm"]
    assert [(e["step"], e["value"]) for e in alarms] == [(2, 5e-3)]  # stale data (step 1) is expected to differ
    assert "step 2: the first update's max |log ratio| is 0.005" in caplog.text


def test_a_step_that_drops_most_of_its_stale_terms_raises_an_alarm(tiny_config, tiny_dir, tmp_path, prompt_file,
                                                                   caplog):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=9", "run.save_every=9")
    with tracked_run(cfg, resume=False) as run:
        recipe = StepRecipe(cfg, run, [])
        for step, dropped in enumerate([0.1, 0.5, 0.75, None]):
            recipe.close(step, {"step": step, "behaviour_dropped_frac": dropped, "staleness_max": 1}, step + 1, {},
                         lambda done: None)
        alarms = [(e["step"], e["value"]) for e in run.store.events() if e["kind"] == "behaviour_dropped_alarm"]
    assert alarms == [(2, 0.75)]
    assert "step 2: the decoupled objective dropped 75% of the step's terms" in caplog.text


def test_seeds_up_to_the_largest_accepted_give_every_sample_its_own_noise():
    from safediff.common.config import ConfigError, load_config
    from safediff.common.seeds import sample_seed

    top = load_config(None, [f"run.seed={2**63 - 1}"]).run.seed
    assert len({sample_seed(top, 0, 0, i) for i in range(16)}) == 16
    with pytest.raises(ConfigError, match="run.seed"):
        load_config(None, [f"run.seed={2**63}"])
    with pytest.raises(ConfigError, match="lora.dropout: 0.1 is refused"):
        load_config(None, ["lora.dropout=0.1"])


def test_prompt_alignment_or_diversity_falling_by_half_raises_a_hacking_alarm(tiny_config, tiny_dir, tmp_path,
                                                                              prompt_file, caplog):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=9", "run.save_every=9", "run.alarm_drop=0.5")
    rows = [(0.30, 0.20), (0.20, 0.15), (0.14, 0.12), (0.10, 0.11), (0.29, 0.09), (0.12, 0.05)]
    with tracked_run(cfg, resume=False) as run:
        recipe = StepRecipe(cfg, run, [])
        for step, (cos, diversity) in enumerate(rows):
            recipe.close(step, {"step": step, "cos_prompt_mean": cos, "diversity_mean": diversity}, step + 1, {},
                         lambda done: None)
        alarms = [(e["step"], e["signal"]) for e in run.store.events() if e["kind"] == "reward_hacking_alarm"]
    # alignment: below 0.15 at step 2 (once while it stays low), recovered at 4, low again at 5; diversity: < 0.10
    assert alarms == [(2, "cos_prompt_mean"), (4, "diversity_mean"), (5, "cos_prompt_mean")]
    assert "step 2: cos_prompt_mean fell to 0.14 from 0.3" in caplog.text
