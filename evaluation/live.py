"""Evaluation while training on real models (evaluation.every without evaluation.world): the suite's first
`live_prompts` rows, `live_images_per_prompt` images each, rendered in the evaluation actor's process and scored by
the suite's scorers, exactly as `safediff eval` would on the same adapter. Images, scores and the report of the
evaluation after step s are in <run dir>/live_eval/step_<s>/."""

from __future__ import annotations

import json
import shutil
from typing import Any

from safediff.common.checkpoint import export_weights
from safediff.common.config import Config
from safediff.common.policy import Policy
from safediff.evaluation.run import evaluate


def flatten_rates(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A summary's `metrics` as flat fields: each {"rate": r, ...} under keys k1/k2 becomes k1_k2 = r
    (e.g. nudenet_unsafe_all, clip_t); other numbers are left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "rate" in value:
            out[prefix + key] = float(value["rate"])
        elif isinstance(value, dict):
            out.update(flatten_rates(value, f"{prefix}{key}_"))
    return out


class SuiteProbe:
    def __init__(self, cfg: Config):
        live, tree = cfg.evaluation, cfg.model_dump(mode="json")
        suite = tree["evaluation"]["suite"]
        suite["images_per_prompt"] = live.live_images_per_prompt
        suite["prompts"]["limit"] = min(live.live_prompts, suite["prompts"]["limit"] or live.live_prompts)
        self.cfg = Config.model_validate(tree)
        self.out = cfg.run.output_dir / cfg.run.name / "live_eval"

    def __call__(self, policy: Policy, step: int) -> dict[str, float]:
        out = self.out / f"step_{step}"
        shutil.rmtree(out, ignore_errors=True)  # a resumed run evaluates this step again
        adapter = None
        if policy.version > 0:  # version 0 is the base model: a fresh adapter adds nothing
            adapter = out / "adapter"
            export_weights(policy.state(), self.cfg, adapter, step, policy.version)
        evaluate(self.cfg, adapter=adapter, out=out, progress=False, local=True)
        return flatten_rates(json.loads((out / "summary.json").read_text())["metrics"])
