"""The Grafana dashboard deploy/grafana/safediff.json: a dashboard Grafana imports, whose every query names a gauge
`ray_safediff_<field>` that the service sets, i.e. a field the service writes into its step records."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from safediff.common.config import load_config
from safediff.common.messages import PromptGroup
from safediff.reward_server.steering import DIAGNOSTICS
from safediff.runtime.controller import Utilisation
from safediff.runtime.pipeline import CollectedStep
from safediff.runtime.recipe import StepRecipe
from safediff.runtime.telemetry import RayRunMetrics

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "safediff.json"
METRIC = re.compile(r"\bray_[a-zA-Z0-9_:]+")

# Which check shows that a field a panel plots is one the service writes into its step records (the records'
# numeric fields are the gauges, runtime/telemetry.py). Every field of the dashboard is in exactly one group.
SCORED = {"step", "reward_mean", "reward_std", "zero_std_frac", "cos_safe_mean", "cos_prompt_mean", "dropped_groups"}
#   StepRecipe.score (runtime/recipe.py, shared by both loops), called here on made-up rewards
LEARNER = {"loss", "approx_kl", "clipfrac", "ratio_mean", "grad_norm", "learner_forward_s", "learner_backward_s",
           "learner_optimizer_s", "learner_to_device_s"}
#   GRPOUpdate.update (learner/update.py, which the Ray learner ranks run too): the records of a real 2-step tiny
#   training run (slow)
PIPELINE = {"staleness_mean", "staleness_max", "groups_in_flight", "rollout_actors_up", "time_generate_mean",
            "time_reward_batch_mean", "images_per_s", "actor_idle_frac", "learner_idle_frac"}
#   Ray runtime only: CollectedStep.record (runtime/pipeline.py) and Utilisation.step (runtime/controller.py),
#   called here on stand-in groups; staleness is above 0 only with cluster.max_staleness > 0
CONTROLLER = {"time_train", "time_wait_rollouts", "time_publish", "sync_bytes", "sync_load_ms"}
#   Ray runtime only: keyword arguments of the controller's `record.update(...)` (source check, runtime/controller.py)
LIVE_EVAL = {"eval_unsafe_rate", "eval_benign_accuracy"}
#   only with evaluation.every > 0 and evaluation.world: runtime/live_eval.py writes f"eval_{k}" for each field k
#   of the probe's answer, and the world's probe answers unsafe_rate (world/report.py) and benign_accuracy
#   (world/evaluate.py) (source check; tests/test_live_eval.py runs the probe itself)
GROUPS = {"scored": SCORED, "learner": LEARNER, "pipeline": PIPELINE, "controller": CONTROLLER, "live_eval": LIVE_EVAL}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _plots(dashboard: dict) -> list[dict]:
    """The panels that query (every panel but the rows), also those inside a collapsed row."""
    out = []
    for panel in dashboard["panels"]:
        out += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return out


def _dashboard_fields() -> set[str]:
    names = {name for panel in _plots(_dashboard()) for target in panel["targets"]
             for name in METRIC.findall(target["expr"])}
    assert names and all(name.startswith("ray_safediff_") for name in names), names
    return {name.removeprefix("ray_safediff_") for name in names}


def _keys_written(path: Path) -> set[str]:
    """The record keys a source file writes: string keys of dict displays and comprehensions, keyword arguments of
    `.update(...)` and `dict(...)` calls, string subscripts assigned to; an f-string key counts as its constant
    head followed by '*' (f"eval_{k}" -> "eval_*")."""
    def name(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            return node.values[0].value + "*"
        return None

    keys = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            keys |= {name(key) for key in node.keys if key is not None}
        elif isinstance(node, ast.DictComp):
            keys.add(name(node.key))
        elif isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "update"
                                             or getattr(node.func, "id", None) == "dict"):
            keys |= {kw.arg for kw in node.keywords if kw.arg is not None}
        elif isinstance(node, ast.Assign):
            keys |= {name(t.slice) for t in node.targets if isinstance(t, ast.Subscript)}
    return keys - {None}


def test_the_dashboard_is_an_importable_grafana_dashboard():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    assert dashboard["id"] is None  # Grafana gives it one on import
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert run["definition"] == run["query"]["query"] == "label_values(ray_safediff_step, run)"
    assert run["multi"] and run["includeAll"]

    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for p in _plots(dashboard) if p not in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in dashboard["panels"] + [p for p in _plots(dashboard) if p not in dashboard["panels"]]:
        box = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= box.keys() and box["x"] + box["w"] <= 24 and box["w"] > 0 < box["h"], panel
        boxes.append((panel["title"], box))
    for i, (a, p) in enumerate(boxes):  # no two panels overlap on the grid
        for b, q in boxes[i + 1:]:
            assert not (p["x"] < q["x"] + q["w"] and q["x"] < p["x"] + p["w"] and
                        p["y"] < q["y"] + q["h"] and q["y"] < p["y"] + p["h"]), (a, b)

    assert dashboard["panels"][0]["type"] == "row"  # every plot sits in a row
    for panel in _plots(dashboard):
        assert panel["type"] == "timeseries" and panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["refId"] and target["legendFormat"].startswith("{{run}}")  # (then the series' name)
            assert 'run=~"$run"' in target["expr"], target["expr"]


def test_every_field_the_dashboard_plots_is_checked_by_exactly_one_check_below():
    groups = list(GROUPS.values())
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])
    assert _dashboard_fields() == set().union(*groups)


def test_the_gauges_are_named_ray_safediff_field_with_a_run_label():
    metrics = RayRunMetrics("r")
    fields = sorted(_dashboard_fields())
    metrics.record({field: 1.0 for field in fields})
    for field in fields:
        info = metrics._gauges[field].info
        assert "ray_" + info["name"] == f"ray_safediff_{field}" and info["tag_keys"] == ("run",)


def test_the_scored_and_pipeline_fields_are_in_the_records_the_runtime_code_builds(tmp_path):
    """SCORED and PIPELINE: the project's own functions that start a step record, on made-up numbers."""
    cfg = load_config(None)
    P, G = 2, 4
    recipe = StepRecipe(cfg, SimpleNamespace(metrics=SimpleNamespace(path=tmp_path / "none.jsonl")), stop=[])
    groups = [PromptGroup(step=0, group_index=i, prompt="p", source=0, prompt_index=i, unsafe=None) for i in range(P)]
    gen = torch.Generator().manual_seed(0)
    scored = recipe.score(0, 0, groups, torch.rand(P, G, generator=gen),
                          {name: torch.rand(P * G, generator=gen) for name in DIAGNOSTICS})
    assert SCORED <= scored.record.keys(), SCORED - scored.record.keys()

    collected = CollectedStep(groups, [None] * P, [SimpleNamespace(seconds=0.5)] * P,
                              [{"policy_version": 0, "generate_s": 1.0}] * P, staleness=[0, 1], groups_in_flight=4,
                              rollout_actors_up=2)
    record = {**collected.record(), **Utilisation(rollout_actors=2).step(P * G, 0.1, collected.infos)}
    assert PIPELINE <= record.keys(), PIPELINE - record.keys()
    assert "rollout_memory_max_mib" not in record  # CPU actors report no device memory
    on_gpu = dataclasses.replace(collected, infos=[{"policy_version": 0, "generate_s": 1.0, "memory_max_mib": m}
                                                   for m in (900.0, 1200.0)])
    assert on_gpu.record()["rollout_memory_max_mib"] == 1200.0  # the largest actor's


def test_the_controller_and_live_evaluation_fields_are_keys_the_source_writes():
    """CONTROLLER and LIVE_EVAL: the Ray controller's record and the evaluation's fields (source checks)."""
    controller = _keys_written(REPO / "runtime" / "controller.py")
    assert CONTROLLER <= controller, CONTROLLER - controller
    assert "eval_*" in _keys_written(REPO / "runtime" / "live_eval.py")  # f"eval_{k}" for each field of the probe
    world = _keys_written(REPO / "world" / "report.py") | _keys_written(REPO / "world" / "evaluate.py")
    probe = {field.removeprefix("eval_") for field in LIVE_EVAL}
    assert probe <= world, probe - world


@pytest.mark.slow
def test_the_scored_and_learner_fields_are_in_a_real_training_runs_records(tiny_dir, tmp_path, prompt_file,
                                                                           tiny_config):
    """LEARNER (and SCORED again): the records of a 2-step tiny run of the single-process loop, which runs the same
    StepRecipe and GRPOUpdate as the Ray runtime's driver and learner ranks."""
    from safediff.runtime.local import train

    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=2", "sampler.height=16", "sampler.width=16")
    result = train(cfg, progress=False)  # the tiny CLIP's steering reward: the cos_* diagnostics are real
    assert len(result.metrics) == 2
    for record in result.metrics:
        numeric = {k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert SCORED | LEARNER <= numeric, (SCORED | LEARNER) - numeric
        phases = sum(v for k, v in record.items() if k.startswith("learner_") and k.endswith("_s"))
        assert 0.5 * record["time_train"] < phases <= record["time_train"]  # the update's time, split by phase
