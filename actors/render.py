"""Evaluation rendering on a rollout actor: a stock diffusers pipeline over the policy's own modules
(StableDiffusionPipeline; StableDiffusion3Pipeline or FluxPipeline for model.family sd3 or flux), so evaluation
images are what a user's
pipeline with the exported adapter would draw.

Image j of a row is sampled from `torch.Generator().manual_seed(row.seed + j)` (`seeding: seed_plus_j`) or
as the j-th draw of one generator seeded row.seed (`seeding: one_generator`), with the suite's fixed guidance,
else the row's guidance and size when the set fixes them (I2P does), else the config's sampler settings; with
the suite's scheduler (DDIM with `evaluation.suite.eta` by default; the flow families sample with their own
flow-matching Euler scheduler). Rows of equal settings are batched up to sampler.batch_size images.
"""

from __future__ import annotations

import inspect
import io
import re
from typing import Any, NamedTuple

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image

from safediff.common.config import SamplerConfig, SuiteConfig
from safediff.common.flow_models import FluxBundle, SD3Bundle
from safediff.common.policy import Policy
from safediff.common.types import EvalRow


def image_name(row: EvalRow, j: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', row.case_number)}_{j}.png"


SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
              "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "dpm_solver": "DPMSolverMultistepScheduler"}


class EvalPipeline(NamedTuple):
    """A stock pipeline, the per-call arguments its model family needs (sd3, flux: max_sequence_length) and the
    name of its guidance argument (a FLUX transformer without a guidance input takes true CFG's `true_cfg_scale`)."""

    pipe: DiffusionPipeline
    options: dict[str, Any]
    guidance_arg: str = "guidance_scale"


def pipeline(policy: Policy, scheduler: str = "ddim") -> EvalPipeline:
    """A stock pipeline over the policy's modules; for the unet family sampling with the named scheduler
    (`SCHEDULERS`) built from the model's own scheduler config (its noise schedule), for sd3 and flux with its own
    scheduler."""
    b, guidance_arg = policy.bundle, "guidance_scale"
    if isinstance(b, SD3Bundle):
        pipe = StableDiffusion3Pipeline(**b.pipeline.components)
        options = {"max_sequence_length": b.max_sequence_length}
    elif isinstance(b, FluxBundle):
        pipe = FluxPipeline(**b.pipeline.components)
        options = {"max_sequence_length": b.max_sequence_length}
        if not b.transformer.config.guidance_embeds:
            guidance_arg = "true_cfg_scale"
    else:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler])
        pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                       scheduler=scheduler_class.from_config(b.scheduler.config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        options = {}
    pipe.set_progress_bar_config(disable=True)
    return EvalPipeline(pipe, options, guidance_arg)


def settings(row: EvalRow, sampler: SamplerConfig, suite: SuiteConfig) -> tuple[float, int, int]:
    """(guidance, height, width) of a row."""
    own = suite.row_settings
    guidance = row.guidance if own and row.guidance is not None else sampler.guidance_scale
    return (suite.guidance if suite.guidance is not None else guidance,
            row.height if own and row.height is not None else sampler.height,
            row.width if own and row.width is not None else sampler.width)


def image_seed(row: EvalRow, j: int, suite: SuiteConfig) -> int:
    """The seed of the generator image j of `row` is drawn from (its j-th draw under one_generator)."""
    return row.seed + j if suite.seeding == "seed_plus_j" else row.seed


@torch.no_grad()
def render_chunk(renderer: EvalPipeline, rows: list[EvalRow], k: int, sampler: SamplerConfig,
                 suite: SuiteConfig) -> list[tuple[str, bytes]]:
    """PNG bytes of the k images of every row, rows of equal settings batched up to sampler.batch_size images."""
    pipe, options = renderer.pipe, dict(renderer.options)
    if "eta" in inspect.signature(pipe.__call__).parameters:  # DDIM's; a flow pipeline takes none
        options["eta"] = suite.eta
    out: dict[str, bytes] = {}
    by_settings: dict[tuple[float, int, int], list[EvalRow]] = {}
    for row in rows:
        by_settings.setdefault(settings(row, sampler, suite), []).append(row)
    per_call = max(1, sampler.batch_size // k)
    for (guidance, height, width), group in by_settings.items():
        for start in range(0, len(group), per_call):
            batch = group[start:start + per_call]
            if suite.seeding == "seed_plus_j":
                generators = [torch.Generator(pipe.device).manual_seed(r.seed + j) for r in batch for j in range(k)]
            else:  # the same generator object k times: diffusers draws image j's noise as its j-th draw
                generators = [g for r in batch for g in [torch.Generator(pipe.device).manual_seed(r.seed)] * k]
            images = pipe([r.prompt for r in batch], negative_prompt=[sampler.negative_prompt] * len(batch),
                          num_inference_steps=suite.num_steps or sampler.num_steps, height=height, width=width,
                          num_images_per_prompt=k, generator=generators, output_type="np",
                          **{renderer.guidance_arg: guidance}, **options).images
            pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            for i, row in enumerate(batch):
                for j in range(k):
                    out[image_name(row, j)] = png_bytes(pixels[i * k + j])
    return [(image_name(r, j), out[image_name(r, j)]) for r in rows for j in range(k)]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
