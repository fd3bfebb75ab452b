"""Shared set-up for the benchmarks: tiny models built once under runs/bench-models."""

from __future__ import annotations

from pathlib import Path

from safediff.common.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "runs" / "bench-models"


def tiny_models() -> Path:
    from safediff.common.models import build_tiny_bundle
    from safediff.reward_server.clip_model import build_tiny_clip

    if not (MODELS / "sd" / "model_index.json").is_file():
        build_tiny_bundle(MODELS / "sd")
        build_tiny_clip(MODELS / "clip")
    return MODELS


def demo_config(*overrides: str) -> Config:
    models = tiny_models()
    return load_config(REPO / "deploy/configs/cpu_demo.yaml", [
        f"model.pretrained={models / 'sd'}", f"reward.clip.model=local-dir:{models / 'clip'}",
        f"run.output_dir={REPO / 'runs' / 'bench'}", *overrides])
