"""Experiment tracking read back from each back-end's own files: TensorBoard event files, MLflow's local file store
and W&B's offline run file, each against the run's metrics.jsonl; the sample grids' fixed noise."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safediff.runtime.local import train

pytestmark = pytest.mark.slow


def _tracked_run(tiny_config, tiny_dir, tmp_path, prompt_file, *overrides):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=3", "run.save_every=10", "tracking.every=2",
                      "tracking.sample_prompts=[an image, a picture]", "tracking.images_per_prompt=2", *overrides)
    result = train(cfg, progress=False)
    return cfg, result


def test_every_back_end_gets_the_step_metrics_the_grids_and_the_adapter(tiny_config, tiny_dir, tmp_path, prompt_file):
    cfg, result = _tracked_run(tiny_config, tiny_dir, tmp_path, prompt_file, "tracking.mlflow={}",
                               "tracking.wandb={}")
    run_dir = result.run_dir
    logged = {r["step"]: r for r in result.metrics}
    assert sorted(logged) == [0, 1, 2]

    # TensorBoard: every numeric field at its step, the grids at steps 0 (base), 2 (every) and 3 (the last)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    rewards = {e.step: e.value for e in events.Scalars("reward_mean")}
    assert rewards == pytest.approx({s: r["reward_mean"] for s, r in logged.items()}, rel=1e-6)
    assert {e.step for e in events.Scalars("loss")} == {0, 1, 2}
    assert [e.step for e in events.Images("samples")] == [0, 2, 3]
    assert "config/text_summary" in events.Tags()["tensors"]

    # the grid files: 2 prompts x 2 images of the model's size, one per due step
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["step_0.png", "step_2.png", "step_3.png"]
    grid = np.asarray(Image.open(run_dir / "samples" / "step_3.png"))
    assert grid.shape == (2 * cfg.sampler.height, 2 * cfg.sampler.width, 3)
    assert (run_dir / "reward_curve.png").is_file()

    # MLflow: the local file store, read with MLflow's own client
    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "reward_mean")}
    assert history == pytest.approx({s: r["reward_mean"] for s, r in logged.items()}, rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert {"adapter", "config.yaml", "images"} <= artifacts
    adapter_files = {Path(a.path).name for a in client.list_artifacts(ids["mlflow"], "adapter")}
    assert "pytorch_lora_weights.safetensors" in adapter_files
    assert client.get_run(ids["mlflow"]).data.params["grpo.group_size"] == str(cfg.grpo.group_size)
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"

    # W&B: the offline run's own record file
    (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    history = [row for kind, row in _wandb_records(run_file) if kind == "history"]
    wandb_rewards = {row["_step"]: row["reward_mean"] for row in history if "reward_mean" in row}
    assert wandb_rewards == pytest.approx({s: r["reward_mean"] for s, r in logged.items()}, rel=1e-6)
    assert sorted(row["_step"] for row in history if row.get("samples/_type") == "image-file") == [0, 2, 3]
    assert any(kind == "artifact" for kind, _ in _wandb_records(run_file))


def test_the_sample_grid_noise_is_fixed_whatever_the_run_seed(tiny_config, tiny_dir, tmp_path, prompt_file):
    """Grids compare across steps and runs: the base model's grid is the same for two run seeds (the noise is the
    grid's own), and training changes the grid."""
    grids = []
    for seed in (0, 1):
        _, result = _tracked_run(tiny_config, tiny_dir, tmp_path / str(seed), prompt_file, f"run.seed={seed}",
                                 "tracking.tensorboard=false", "optim.lr=0.05")
        grids.append({s: np.asarray(Image.open(result.run_dir / "samples" / f"step_{s}.png")) for s in (0, 3)})
    assert np.array_equal(grids[0][0], grids[1][0])
    assert not np.array_equal(grids[0][0], grids[0][3])
    assert not (result.run_dir / "tensorboard").exists()


def _wandb_records(path: Path):
    """(record type, fields) of every record of a W&B run file: a LevelDB-style log (32 KiB blocks; each chunk a
    7-byte header: CRC, little-endian length, kind 1 full / 2 first / 3 middle / 4 last) of protobuf Records,
    after a 7-byte file header. History rows come as {key: value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            kind_name = record.WhichOneof("record_type")
            fields = {}
            if kind_name == "history":
                fields = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
            yield kind_name, fields
