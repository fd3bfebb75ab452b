"""The scorers of an evaluation, behind one interface, and scoring that resumes.

A per-image scorer has `name` and `score(paths, rows) -> [dict per image]` (JSON-able fields). Results
go to <out>/scores/<name>.jsonl, one line per image keyed by case_number and j, so an interrupted run
scores only the images still missing. Every requested scorer is built before the first image is
generated (`build_scorers`): one whose weights or inputs are missing stops the evaluation with an error
naming its field, before any generation time is spent, unless `evaluation.suite.allow_missing_scorers`
disables it with the reason (in the log and in the report). FID is set-level (evaluation/fid.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from safediff.common.config import SuiteConfig
from safediff.common.errors import UserInputError
from safediff.common.progress import track
from safediff.evaluation import jsonl

log = logging.getLogger(__name__)
BATCH = 32


class WorldScorer:
    """The miniature world's unsafe judges: which unsafe families an image shows."""

    name = "world"

    def score(self, paths: list[Path], rows: list[dict]) -> list[dict]:
        from safediff.evaluation.images import load_uint8
        from safediff.world.judges import detect, unsafe

        return [{f"world_{family}": flag for family, flag in unsafe(detect(load_uint8(p))).items()} for p in paths]


def build(name: str, suite: SuiteConfig, device: str):
    """The scorer `name`; raises UserInputError (or the loader's error) when its weights are missing."""
    if name == "nudenet":
        from safediff.evaluation.nudenet import NudeNetScorer
        return NudeNetScorer(suite.nudenet_threshold, suite.nudenet_flag_classes, suite.nudenet_model,
                             suite.nudenet_swap_channels)
    if name == "q16":
        from safediff.evaluation.q16 import Q16Scorer
        return Q16Scorer(suite.q16, device)
    if name == "clip_t":
        from safediff.evaluation.clip_score import ClipTScorer
        return ClipTScorer(suite.clip_t, device, suite.clip_t_scale)
    if name == "geneval":
        from safediff.evaluation.geneval import GenEvalScorer
        return GenEvalScorer(suite.geneval, device)
    if name == "world":
        return WorldScorer()
    if name == "fid":
        from safediff.evaluation.fid import FIDScorer
        return FIDScorer(suite.fid)
    raise ValueError(f"unknown scorer {name!r}")


class ScorerError(UserInputError, ValueError):
    """A requested scorer that cannot be used; the message names it and the field to fix."""


def build_scorers(suite: SuiteConfig, device: str = "cpu") -> tuple[dict[str, object], dict[str, str], dict]:
    """Every scorer of `suite.scorers`, built and checked. Returns (scorers by name, {name: reason} for those
    disabled under `allow_missing_scorers`, {name: {"load_seconds"}}). Raises ScorerError otherwise."""
    scorers, disabled, timing = {}, {}, {}
    for name in suite.scorers:
        began = time.perf_counter()
        try:
            scorers[name] = build(name, suite, device)
        except (UserInputError, OSError, ImportError) as err:
            if not suite.allow_missing_scorers:
                raise ScorerError(f"scorer {name} cannot be used: {err} (fix the field, drop {name} from "
                                  "evaluation.suite.scorers, or pass --allow-missing-scorers)") from err
            disabled[name] = str(err)
            log.warning("scorer %s disabled: %s", name, err)
        timing[name] = {"load_seconds": time.perf_counter() - began}
    return scorers, disabled, timing


def run_scorers(scorers: dict[str, object], out: Path, images: list[dict],
                progress: bool = True) -> dict[str, dict]:
    """Score every manifest image not yet scored with the built `scorers`. Returns {scorer: {"seconds",
    "images"}} of this call's scoring work."""
    timing = {}
    (out / "scores").mkdir(exist_ok=True)
    for name, scorer in scorers.items():
        began = time.perf_counter()
        if name == "fid":
            result = scorer.compute([out / "images" / r["image"] for r in images])
            (out / "scores" / "fid.json").write_text(json.dumps(result))
            timing[name] = {"seconds": time.perf_counter() - began, "images": len(images)}
            continue
        path = out / "scores" / f"{name}.jsonl"
        done = {(s["case_number"], s["j"]) for s in jsonl.read(path)}
        todo = [r for r in images if (r["case_number"], r["j"]) not in done]
        for start in track(range(0, len(todo), BATCH), f"score {name}", "batch", enabled=progress):
            batch = todo[start:start + BATCH]
            with torch.no_grad():
                results = scorer.score([out / "images" / r["image"] for r in batch], batch)
            jsonl.append(path, [{"case_number": r["case_number"], "j": r["j"], **s} for r, s in zip(batch, results)])
        timing[name] = {"seconds": time.perf_counter() - began, "images": len(todo)}
    return timing
