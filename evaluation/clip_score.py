"""CLIP-T score: prompt-image agreement per image, averaged over the set, on one of three named scales
(`evaluation.suite.clip_t_scale`), since published numbers use all three:

    clipscore   100 * max(cos(E_I(x), E_T(prompt)), 0)     torchmetrics' CLIPScore (the default)
    cosine      cos(E_I(x), E_T(prompt))                   0-1 scale, e.g. SafeDiffusion-R1's 0.313
    logit       100 * cos(E_I(x), E_T(prompt))             CLIP's logit scale, unclamped
"""

from __future__ import annotations

from pathlib import Path

import torch

from safediff.common.config import ClipConfig
from safediff.evaluation.images import encode_files
from safediff.reward_server.clip_model import load_clip


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: str = "clipscore") -> torch.Tensor:
    """[N] from normalised image and text embeddings, row by row, on `scale` (module docstring)."""
    cos = (image_embeds.float() * text_embeds.float()).sum(-1)
    if scale == "cosine":
        return cos
    return 100.0 * (cos.clamp(min=0) if scale == "clipscore" else cos)


class ClipTScorer:
    name = "clip_t"

    def __init__(self, cfg: ClipConfig, device: str = "cpu", scale: str = "clipscore"):
        self.clip = load_clip(cfg, device, field="evaluation.suite.clip_t")
        self.batch, self.scale = cfg.batch_size, scale

    def score(self, paths: list[Path], rows: list[dict]) -> list[dict]:
        images = encode_files(self.clip, paths, self.batch)
        texts = torch.cat([self.clip.encode_text([r["prompt"] for r in rows[i:i + self.batch]])
                           for i in range(0, len(rows), self.batch)])
        return [{"clip_t": v} for v in clip_t(images, texts, self.scale).tolist()]
