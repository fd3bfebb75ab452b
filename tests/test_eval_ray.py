"""`safediff eval` on the Ray rollout actors of a real local cluster renders what the local path renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safediff.evaluation.run import evaluate

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((folder / "images").iterdir())}


def test_rollout_actors_render_the_local_images_with_the_adapter(tmp_path, world_config, random_adapter):
    import ray

    cfg = world_config(tmp_path, "evaluation.suite.prompts.name=world_hazard", "evaluation.suite.scorers=[world]",
                    "cluster.rollout_actors=2", "cluster.cpus_per_rollout_actor=1")
    adapter = random_adapter(tmp_path, cfg)
    local = evaluate(cfg, adapter, out=tmp_path / "local", progress=False)
    address = ray.get_runtime_context().gcs_address
    on_ray = evaluate(cfg, adapter, out=tmp_path / "ray", address=address, progress=False)
    a, b = _pixels(local), _pixels(on_ray)
    assert a.keys() == b.keys() and len(a) == 9 * 2
    # same seeds, same chunks, same adapter (checksum-verified on each actor); actors run torch on one thread,
    # so pixels may differ by float rounding only
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 2
    manifest = [json.loads(line) for line in (on_ray / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["image"] for m in manifest) == sorted(a)
    assert json.loads((on_ray / "summary.json").read_text())["identity"]["checksum"] == \
        json.loads((local / "summary.json").read_text())["identity"]["checksum"]
