"""Evaluation images: a stock diffusers StableDiffusionPipeline over the policy's own modules.

Contract (what makes an evaluation exact, resumable and comparable):
- image j of a row is sampled from `torch.Generator().manual_seed(row.seed + j)` with the row's guidance
  and size when the set fixes them (I2P does), else the config's sampler settings; DDIM with
  `evaluation.suite.eta` (0: deterministic);
- rows are cut into fixed chunks (CHUNK_ROWS consecutive rows, a function of the row order only), and a
  chunk is rendered in one go, so an interrupted evaluation renders exactly the same images on resume;
- a chunk's PNGs are written first and its manifest lines appended after, so a row is in
  `manifest.jsonl` only when its images are on disk; resume skips the chunks whose rows are all there.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from common.config import Config, SamplerConfig, SuiteConfig
from common.errors import UserInputError
from common.lora import state_checksum
from common.policy import Policy
from evaluation import jsonl
from evaluation.prompt_sets import EvalRow
from learner.checkpoint import load_weights
from learner.weight_sync import apply_update, describe, expected_modules

CHUNK_ROWS = 8


class AdapterError(UserInputError, ValueError):
    """An adapter folder that cannot be evaluated; the message names it."""


def image_name(row: EvalRow, j: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', row.case_number)}_{j}.png"


def load_adapter(folder: Path, finetune: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights written by a run (`<run>/adapter` or `<run>/checkpoints/step_N`) and their state.json; weights
    whose checksum differs from the one state.json recorded are refused."""
    folder = Path(folder)
    wanted = "pytorch_lora_weights.safetensors" if finetune == "lora" else "unet/diffusion_pytorch_model.safetensors"
    if not (folder / wanted).is_file():
        raise AdapterError(f"--adapter {folder}: no {wanted} (expected a run's adapter/ or checkpoints/step_N/ "
                           f"folder for model.finetune={finetune})")
    info = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
    state = load_weights(folder, finetune)
    expected, found = info.get("checksum"), state_checksum(state)
    if expected and found != expected:
        raise AdapterError(f"--adapter {folder}: weights checksum {found[:12]} differs from its state.json "
                           f"({expected[:12]})")
    return state, info


def pipeline(policy: Policy) -> StableDiffusionPipeline:
    b = policy.bundle
    pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=DDIMScheduler.from_config(b.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def settings(row: EvalRow, sampler: SamplerConfig, suite: SuiteConfig) -> tuple[float, int, int]:
    """(guidance, height, width) of a row."""
    own = suite.row_settings
    return (row.guidance if own and row.guidance is not None else sampler.guidance_scale,
            row.height if own and row.height is not None else sampler.height,
            row.width if own and row.width is not None else sampler.width)


@torch.no_grad()
def render_chunk(pipe: StableDiffusionPipeline, rows: list[EvalRow], k: int, sampler: SamplerConfig,
                 suite: SuiteConfig) -> list[tuple[str, bytes]]:
    """PNG bytes of the k images of every row, rows of equal settings batched up to sampler.batch_size images."""
    out: dict[str, bytes] = {}
    by_settings: dict[tuple[float, int, int], list[EvalRow]] = {}
    for row in rows:
        by_settings.setdefault(settings(row, sampler, suite), []).append(row)
    per_call = max(1, sampler.batch_size // k)
    for (guidance, height, width), group in by_settings.items():
        for start in range(0, len(group), per_call):
            batch = group[start:start + per_call]
            generators = [torch.Generator(pipe.device).manual_seed(r.seed + j) for r in batch for j in range(k)]
            images = pipe([r.prompt for r in batch], negative_prompt=[sampler.negative_prompt] * len(batch),
                          num_inference_steps=sampler.num_steps, guidance_scale=guidance, height=height,
                          width=width, eta=suite.eta, num_images_per_prompt=k, generator=generators,
                          output_type="np").images
            pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            for i, row in enumerate(batch):
                for j in range(k):
                    out[image_name(row, j)] = png_bytes(pixels[i * k + j])
    return [(image_name(r, j), out[image_name(r, j)]) for r in rows for j in range(k)]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


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
            records += [{"image": image_name(row, j), "j": j, "seed": row.seed + j, "guidance": guidance,
                         "height": height, "width": width,
                         **{key: value for key, value in asdict(row).items() if key != "seed"}} for j in range(k)]
        jsonl.append(self.manifest, records)

    def rows(self) -> list[dict]:
        """The manifest's image records, each image once (a chunk rendered again after a crash lists its rows
        again: the last record wins)."""
        return list({r["image"]: r for r in jsonl.read(self.manifest)}.values())


def local_renderer(cfg: Config, state: dict | None, info: dict):
    """A function chunk -> rendered PNGs in this process."""
    policy = Policy.from_config(cfg)
    if state is not None:  # else the base model: a fresh LoRA has B = 0 and adds exactly nothing
        update = describe(state, int(info.get("policy_version", 1)), expected_modules(state, cfg.model.finetune))
        apply_update(policy, update, state)  # the actors' checks: version, modules bound, checksum
    pipe = pipeline(policy)
    suite = cfg.evaluation.suite
    return lambda rows: render_chunk(pipe, rows, suite.images_per_prompt, cfg.sampler, suite)
