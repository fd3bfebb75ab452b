"""Experiment tracking: what a run does, sent as it happens to the back-ends the `tracking` section turns on.

    start        the config (store password masked) -> every back-end; TensorBoard on by default, W&B and MLflow
                 when configured (their run ids are kept in <run dir>/tracking.json, so a resumed job continues
                 the same tracked run)
    each step    the step record's numeric fields -> scalars at that step (live-evaluation fields included)
    every N      reward_curve.png drawn anew; a sample grid (tracking.sample_prompts, fixed noise) -> PNG + image
    the end      the exported adapter -> an artifact where the back-end has artifacts (W&B, MLflow)

Both loops call the same `Tracker`: `safediff train` renders its grids itself, `safediff run` on rollout actor 0.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml
from PIL import Image

from safediff.common.config import Config, SuiteConfig, TrackingConfig, dump_config, flatten_tree
from safediff.common.errors import UserInputError
from safediff.common.metrics import numeric_fields, plot_reward_curve, read_metrics
from safediff.common.secrets import write_private
from safediff.common.types import EvalRow

log = logging.getLogger(__name__)


class Backend(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, step: int, name: str, pixels: np.ndarray, caption: str) -> None: ...
    def artifact(self, folder: Path, name: str) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Event files in <run dir>/tensorboard; a resumed run drops the events at and after its checkpoint's step."""

    def __init__(self, run_dir: Path, config_yaml: str, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start if start else None)
        self.writer.add_text("config", "```yaml\n" + config_yaml + "```", global_step=start)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def image(self, step: int, name: str, pixels: np.ndarray, caption: str) -> None:
        self.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
        self.writer.add_text(f"{name}/prompts", caption, global_step=step)
        self.writer.flush()

    def artifact(self, folder: Path, name: str) -> None:  # TensorBoard keeps no files: the run dir has them
        pass

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, cfg: Config, run_dir: Path, config: dict, run_id: str):
        wandb = _import("wandb", "tracking.wandb")
        w = cfg.tracking.wandb
        # no system metadata: it would record the command line, which may carry a store URL with its password
        settings = wandb.Settings(mode=w.mode, console="off", x_disable_meta=True, save_code=False, silent=True)
        self.wandb = wandb
        self.run = wandb.init(project=w.project, entity=w.entity, name=cfg.run.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config, settings=settings)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, name: str, pixels: np.ndarray, caption: str) -> None:
        self.run.log({name: self.wandb.Image(pixels, caption=caption)}, step=step)

    def artifact(self, folder: Path, name: str) -> None:
        artifact = self.wandb.Artifact(name, type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, cfg: Config, run_dir: Path, config: dict, run_id: str | None):
        m = cfg.tracking.mlflow
        uri = m.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store working only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking = _import("mlflow.tracking", "tracking.mlflow")
        from mlflow.entities import Metric, Param

        self.Metric, self.client = Metric, tracking.MlflowClient(uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(m.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(m.experiment)
            run_id = self.client.create_run(experiment_id, run_name=cfg.run.name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten_tree(config).items()]
            for i in range(0, len(params), 100):  # the tracking API takes at most 100 params a call
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id
        self.client.log_dict(run_id, config, "config.yaml")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def image(self, step: int, name: str, pixels: np.ndarray, caption: str) -> None:
        self.client.log_image(self.run_id, pixels, key=name, step=step)

    def artifact(self, folder: Path, name: str) -> None:  # under the folder's own name: the run is the namespace
        self.client.log_artifacts(self.run_id, str(folder), folder.name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracker:
    """Every configured back-end behind one object; see the module docstring for when each call comes."""

    def __init__(self, cfg: Config, run_dir: Path, start: int):
        """`start`: the step the job starts at (0, or a resumed checkpoint's)."""
        self.cfg, self.run_dir, self.every = cfg, run_dir, cfg.tracking.every
        # what both loops render a sample grid from: the rows (prompts and seeds) and the suite's settings
        self.sample_rows, self.sample_suite = _sample_rows(cfg.tracking), _sample_suite(cfg.evaluation.suite)
        config_yaml = dump_config(cfg)
        config = yaml.safe_load(config_yaml)
        ids_file = run_dir / "tracking.json"
        ids = json.loads(ids_file.read_text()) if start and ids_file.is_file() else {}
        t = cfg.tracking
        self.backends: list[Backend] = []
        try:
            if t.tensorboard:
                self.backends.append(TensorBoard(run_dir, config_yaml, start))
            if t.wandb is not None:
                ids.setdefault("wandb", uuid.uuid4().hex[:16])
                self.backends.append(Wandb(cfg, run_dir, config, ids["wandb"]))
            if t.mlflow is not None:
                backend = Mlflow(cfg, run_dir, config, ids.get("mlflow"))
                ids["mlflow"] = backend.run_id
                self.backends.append(backend)
        except BaseException:
            self.close()
            raise
        write_private(ids_file, json.dumps(ids))

    def step(self, step: int, record: dict) -> None:
        """A finished step's record (already in metrics.jsonl); redraws reward_curve.png every `every` steps (the
        run's last curve is drawn when it closes, `runtime.session.close_run`)."""
        values = {k: v for k, v in numeric_fields(record).items() if k != "step"}
        for backend in self.backends:
            backend.scalars(step, values)
        if (step + 1) % self.every == 0 and step + 1 < self.cfg.run.steps:
            plot_reward_curve(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "reward_curve.png",
                              title=f"{self.cfg.run.name}: reward")

    def wants_samples(self, done: int) -> bool:
        """Whether the policy trained for `done` steps gets a sample grid: at the start, every `every` steps and at
        the last step."""
        return bool(self.cfg.tracking.sample_prompts) and (done == 0 or done % self.every == 0
                                                          or done == self.cfg.run.steps)

    def samples(self, done: int, images: list[tuple[str, bytes]]) -> Path:
        """The grid of `self.sample_rows`' rendered images (PNG bytes, row after row) of the policy trained for `done`
        steps: <run dir>/samples/step_<done>.png and an image on every back-end."""
        t = self.cfg.tracking
        pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for _, png in images]
        k = t.images_per_prompt
        grid = np.concatenate([np.concatenate(pixels[i:i + k], axis=1) for i in range(0, len(pixels), k)], axis=0)
        out = self.run_dir / "samples" / f"step_{done}.png"
        out.parent.mkdir(exist_ok=True)
        Image.fromarray(grid).save(out)
        caption = "; ".join(f"row {i}: {p}" for i, p in enumerate(t.sample_prompts))
        for backend in self.backends:
            backend.image(done, "samples", grid, caption)
        return out

    def finish(self) -> None:
        """The run finished: its exported adapter becomes an artifact where a back-end keeps artifacts."""
        adapter = self.run_dir / "adapter"
        if adapter.is_dir():
            for backend in self.backends:
                backend.artifact(adapter, f"{self.cfg.run.name}-adapter")

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception as err:  # a tracker failing to close must not hide the run's own outcome
                log.warning("tracking: closing %s failed: %s", type(backend).__name__, err)


def _sample_rows(t: TrackingConfig) -> list[EvalRow]:
    """The sample grid's prompts as evaluation rows: prompt i starts from seed sample_seed + 1000 i (+ j for image
    j), the same at every grid."""
    return [EvalRow(case_number=f"sample_{i}", prompt=p, seed=t.sample_seed + 1000 * i)
            for i, p in enumerate(t.sample_prompts)]


def _sample_suite(suite: SuiteConfig) -> SuiteConfig:
    """The evaluation suite's rendering settings, image j of a row from its own seed (row seed + j)."""
    return suite.model_copy(update={"seeding": "seed_plus_j", "row_settings": False})


def _import(module: str, field: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserInputError(f"{field}: {err.name} is not installed (pip install 'safediff[tracking]')") from None
