"""Evaluation while training: the rule that picks adapter_best/ and the early stop, on hand-worked histories; on a
real local Ray cluster, the evaluation actor's schedule, records and exports, and the early stop."""

import json
import sys

import pytest
import ray

from safediff.common.config import SelectConfig
from safediff.common.errors import UserInputError
from safediff.common.metrics import read_metrics
from safediff.common.policy import Policy
from safediff.evaluation.live import SuiteProbe
from safediff.runtime.controller import run
from safediff.runtime.live_eval import LiveEval, evaluations_since_best, select_best
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore
from safediff.world.report import WorldProbe


def _row(step: int, unsafe: float, benign: float) -> dict:
    return {"step": step, "policy_version": step, "checksum": f"c{step}", "unsafe_rate": unsafe,
            "benign_accuracy": benign, "seconds": 1.0}


HISTORY = [_row(0, 0.70, 0.40),   # the base model
           _row(4, 0.30, 0.41),
           _row(8, 0.10, 0.37),   # lowest unsafe rate, but benign fell 3 points: outside a 2-point margin
           _row(12, 0.20, 0.385),  # within the margin (0.40 - 0.02 = 0.38)
           _row(16, 0.20, 0.45),  # ties step 12: the earlier one is kept
           _row(20, 0.25, 0.50)]


def test_the_best_is_the_lowest_metric_whose_guard_stays_within_the_margin_of_the_base():
    rule = SelectConfig(metric="unsafe_rate", guard="benign_accuracy", margin=0.02)
    assert select_best(HISTORY, rule)["step"] == 12
    assert select_best(HISTORY, rule.model_copy(update={"margin": 0.03}))["step"] == 8
    assert select_best(HISTORY, rule.model_copy(update={"guard": None}))["step"] == 8
    assert select_best(HISTORY[:2], rule)["step"] == 4
    assert select_best(HISTORY[:1], rule)["step"] == 0  # nothing beat the base model yet
    assert select_best([], rule) is None


def test_the_early_stop_counts_evaluations_since_the_best():
    rule = SelectConfig(metric="unsafe_rate", guard="benign_accuracy", margin=0.02)
    assert [evaluations_since_best(HISTORY[:n], rule) for n in range(1, 7)] == [0, 0, 1, 0, 1, 2]


def test_a_resumed_run_keeps_the_evaluations_up_to_its_checkpoint_and_their_best(tmp_path, tiny_dir, prompt_file,
                                                                                 tiny_config):
    from safediff.common.metrics import MetricsLog
    from safediff.runtime.live_eval import LiveEval

    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "evaluation.every=4")
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir / "evaluations.jsonl")
    for row in HISTORY:  # steps 0 ... 20; the best up to step 12 is step 12 (step 8 fails the guard)
        log.write(row)
    for step in (0, 4, 8, 12):  # each was the best when it was made
        (run_dir / "evaluations" / f"step_{step}").mkdir(parents=True)
        (run_dir / "evaluations" / f"step_{step}" / "state.json").write_text(json.dumps({"step": step}))
    (run_dir / "adapter_best").mkdir()
    (run_dir / "adapter_best" / "state.json").write_text(json.dumps({"step": 99}))  # made after the checkpoint
    live = LiveEval(cfg, None, None, run_dir, start=12)  # resumed from the checkpoint of step 12
    assert [row["step"] for row in live.history] == [0, 4, 8, 12]
    assert [row["step"] for row in read_metrics(run_dir / "evaluations.jsonl")] == [0, 4, 8, 12]
    assert json.loads((run_dir / "adapter_best" / "state.json").read_text())["step"] == 12
    LiveEval(cfg, None, None, run_dir, start=0)  # a fresh run on the same run id starts with nothing
    assert read_metrics(run_dir / "evaluations.jsonl") == [] and not (run_dir / "evaluations").exists()
    assert not (run_dir / "adapter_best").exists()


def test_a_rule_naming_a_field_the_evaluation_lacks_is_refused_naming_it():
    with pytest.raises(UserInputError, match=r"evaluation.select: .*'nudity'.*unsafe_rate, benign_accuracy"):
        select_best(HISTORY, SelectConfig(metric="nudity"))


def test_the_world_probe_scores_every_held_out_set_and_averages_the_families(tmp_path, world_config):
    cfg = world_config(tmp_path, "evaluation.live_images_per_prompt=1")
    row = WorldProbe(cfg)(Policy.from_config(cfg), 0)
    assert row["unsafe_rate"] == pytest.approx((row["unsafe_rate_glyph"] + row["unsafe_rate_hazard"]) / 2)
    assert 0 <= row["benign_accuracy"] <= 1 and row["unsafe_rate"] > 0.3  # the base model shows the concepts


def test_the_suite_probe_is_safediff_eval_on_the_first_rows(tmp_path, world_config):
    cfg = world_config(tmp_path, "evaluation.suite.prompts.name=world_glyph", "evaluation.suite.scorers=[world]",
                       "evaluation.live_prompts=3", "evaluation.live_images_per_prompt=2", "run.name=probe")
    policy = Policy.from_config(cfg)
    policy.load_state({k: v + 0.05 for k, v in policy.state().items()}, version=4)  # an adapter, not the base
    fields = SuiteProbe(cfg)(policy, 8)
    out = tmp_path / "runs" / "probe" / "live_eval" / "step_8"
    flags = [json.loads(line)["world_glyph"] for line in (out / "scores" / "world.jsonl").read_text().splitlines()]
    assert len(flags) == 3 * 2 and fields["world_unsafe_glyph"] == pytest.approx(sum(flags) / len(flags))
    assert json.loads((out / "identity.json").read_text())["checksum"] == policy.checksum()


class NormProbe:
    """A probe whose numbers follow the adapter: unsafe_rate falls as the LoRA weights grow from B = 0."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, policy, step: int) -> dict[str, float]:
        norm = sum(float(t.abs().sum()) for key, t in policy.state().items() if "lora_B" in key)  # 0 at the base
        return {"unsafe_rate": 1.0 / (1.0 + norm), "benign_accuracy": 0.5, "norm": norm}


class FlatProbe(NormProbe):
    """The same numbers for every adapter: no evaluation is ever better than the base model's."""

    def __call__(self, policy, step: int) -> dict[str, float]:
        return {"unsafe_rate": 0.5, "benign_accuracy": 0.5}


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probes travel to the actor by value
SHAPE = ("cluster.rollout_actors=1", "cluster.cpus_per_rollout_actor=0.5", "cluster.cpus_per_reward_actor=0.5",
         "cluster.cpus_per_learner_worker=0.5", "cluster.cpus_per_eval_actor=0.5", "reward.batch_max_images=8",
         "run.save_every=100", "evaluation.every=2")


def _events(run_dir, kind: str) -> list[dict]:
    with EmbeddedRedis(run_dir / "redis") as server:
        return [e for e in RunStore(server.url, run_dir.name).events() if e["kind"] == kind]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_evaluations_run_on_schedule_and_the_best_adapter_is_exported(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, *SHAPE, "run.steps=3", "run.name=live", "optim.lr=1e-2")
    result = run(cfg, progress=False, make_probe=NormProbe)
    rows = read_metrics(result.run_dir / "evaluations.jsonl")
    # the base model, then after steps 2 and 3 (the last): each the policy published after that step
    assert [(r["step"], r["policy_version"]) for r in rows] == [(0, 0), (2, 2), (3, 3)]
    assert rows[0]["norm"] == 0 and rows[1]["norm"] > 0 and rows[2]["checksum"] == result.checksum
    # the newest evaluation rides on the next step record; the last one is waited for
    assert result.metrics[-1]["eval_step"] == 3 and result.metrics[-1]["eval_norm"] == rows[2]["norm"]
    best = select_best(rows, cfg.evaluation.select)
    saved = json.loads((result.run_dir / "adapter_best" / "state.json").read_text())
    assert (saved["step"], saved["checksum"]) == (best["step"], best["checksum"]) and best["step"] > 0
    assert [e["step"] for e in _events(result.run_dir, "evaluation")] == [0, 2, 3]
    assert (result.run_dir / "evaluation_curve.png").stat().st_size > 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_patience_stops_training_with_a_checkpoint_and_both_exports(tiny_dir, tmp_path, prompt_file, tiny_config,
                                                                     monkeypatch):
    """The step record waits for each evaluation here (the run never does), so the stop lands at a known step: the
    first evaluation after the base model's (step 2) finds nothing better, and patience 1 stops the run there."""
    collect = LiveEval.collect
    monkeypatch.setattr(LiveEval, "collect", lambda self, wait=False: collect(self, wait=True))
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, *SHAPE, "run.steps=12", "run.name=flat",
                      "evaluation.select.patience=1")
    result = run(cfg, progress=False, make_probe=FlatProbe)
    done = len(result.metrics)
    assert done == 2
    assert json.loads((result.run_dir / "adapter" / "state.json").read_text())["step"] == done
    assert (result.run_dir / "checkpoints" / f"step_{done}").is_dir()
    assert json.loads((result.run_dir / "adapter_best" / "state.json").read_text())["step"] == 0  # the base model
    assert [e["step"] for e in _events(result.run_dir, "early_stop")] == [done - 1]
