"""Evaluation images: rendered by `safediff.actors.render` (a stock diffusers pipeline over the policy's own
modules), here or on the Ray rollout actors, and stored so that an evaluation is exact and resumable:
- image j of a row is sampled from `torch.Generator().manual_seed(row.seed + j)` (see actors/render.py);
- rows are cut into fixed chunks (CHUNK_ROWS consecutive rows, a function of the row order only), and a
  chunk is rendered in one go, so an interrupted evaluation renders exactly the same images on resume;
- a chunk's PNGs are written first and its manifest lines appended after, so a row is in
  `manifest.jsonl` only when its images are on disk; resume skips the chunks whose rows are all there.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from safediff.actors.render import image_name, image_seed, pipeline, render_chunk, settings
from safediff.common.config import Config, SamplerConfig, SuiteConfig
from safediff.common.errors import UserInputError
from safediff.common.policy import Policy
from safediff.common.text_tokens import load_token_embeddings
from safediff.common.trainable import Trainable, state_checksum
from safediff.common.types import EvalRow
from safediff.common.weight_sync import apply_update, describe
from safediff.evaluation import jsonl

CHUNK_ROWS = 8


class AdapterError(UserInputError, ValueError):
    """An adapter folder that cannot be evaluated; the message names it."""


def load_adapter(folder: Path, trainable: Trainable) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights written by a run (`<run>/adapter` or `<run>/checkpoints/step_N`) and their state.json; weights
    whose checksum differs from the one state.json recorded are refused."""
    folder = Path(folder)
    if not (folder / trainable.weights_file).is_file():
        raise AdapterError(f"--adapter {folder}: no {trainable.weights_file} (expected a run's adapter/ or "
                           f"checkpoints/step_N/ folder for model.finetune={trainable.kind})")
    info = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
    state = trainable.load_saved(folder)
    expected, found = info.get("checksum"), state_checksum(state)
    if expected and found != expected:
        raise AdapterError(f"--adapter {folder}: weights checksum {found[:12]} differs from its state.json "
                           f"({expected[:12]})")
    return state, info


def chunks(rows: list[EvalRow]) -> list[list[EvalRow]]:
    return [rows[i:i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]


class ImageStore:
    """<out>/images/*.png + <out>/manifest.jsonl (one line per image: the row, j, seed, settings)."""

    def __init__(self, out: Path):
        self.out, self.images = Path(out), Path(out) / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.manifest = self.out / "manifest.jsonl"

    def done(self) -> set[str]:
        """Images listed in the manifest whose file exists."""
        return {r["image"] for r in jsonl.read(self.manifest) if (self.images / r["image"]).is_file()}

    def todo(self, rows: list[EvalRow], k: int) -> list[list[EvalRow]]:
        done = self.done()
        return [c for c in chunks(rows) if not all(image_name(r, j) in done for r in c for j in range(k))]

    def write(self, rows: list[EvalRow], rendered: list[tuple[str, bytes]], k: int, sampler: SamplerConfig,
              suite: SuiteConfig) -> None:
        for name, data in rendered:
            (self.images / name).write_bytes(data)
        records = []
        for row in rows:
            guidance, height, width = settings(row, sampler, suite)
            records += [{"image": image_name(row, j), "j": j, "seed": image_seed(row, j, suite), "guidance": guidance,
                         "height": height, "width": width,
                         **{key: value for key, value in asdict(row).items() if key != "seed"}} for j in range(k)]
        jsonl.append(self.manifest, records)

    def rows(self) -> list[dict]:
        """The manifest's image records, each image once (a chunk rendered again after a crash lists its rows
        again: the last record wins)."""
        return list({r["image"]: r for r in jsonl.read(self.manifest)}.values())


def policy_with(cfg: Config, state: dict | None, info: dict) -> Policy:
    """The policy of `cfg` with the saved weights `state` applied (None: the base model)."""
    policy = Policy.from_config(cfg)
    if state is not None:  # else the base model: a fresh LoRA has B = 0 and adds exactly nothing
        update = describe(state, int(info.get("policy_version", 1)), policy.trainable.expected_modules(state))
        apply_update(policy, update, state)  # the actors' checks: version, modules bound, checksum
    return policy


def local_renderer(cfg: Config, state: dict | None, info: dict):
    """A function chunk -> rendered PNGs in this process."""
    suite = cfg.evaluation.suite
    renderer = pipeline(policy_with(cfg, state, info), suite.scheduler)
    if suite.textual_inversion is not None:
        try:
            load_token_embeddings(renderer.pipe, suite.textual_inversion)
        except ValueError as err:
            raise UserInputError(f"evaluation.suite.textual_inversion: {err}") from None
    return lambda rows: render_chunk(renderer, rows, suite.images_per_prompt, cfg.sampler, suite)
