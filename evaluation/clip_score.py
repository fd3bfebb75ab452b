"""CLIP-T score: prompt-image agreement, 100 * max(cos(E_I(x), E_T(prompt)), 0) per image (the scale of
torchmetrics' CLIPScore), averaged over the set."""

from __future__ import annotations

from pathlib import Path

import torch

from safediff.common.config import ClipConfig
from safediff.evaluation.images import encode_files
from safediff.reward_server.clip_model import load_clip


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """[N] from normalised image and text embeddings, row by row."""
    return 100.0 * (image_embeds.float() * text_embeds.float()).sum(-1).clamp(min=0)


class ClipTScorer:
    name = "clip_t"

    def __init__(self, cfg: ClipConfig, device: str = "cpu"):
        self.clip = load_clip(cfg, device, field="evaluation.suite.clip_t")
        self.batch = cfg.batch_size

    def score(self, paths: list[Path], rows: list[dict]) -> list[dict]:
        images = encode_files(self.clip, paths, self.batch)
        texts = torch.cat([self.clip.encode_text([r["prompt"] for r in rows[i:i + self.batch]])
                           for i in range(0, len(rows), self.batch)])
        return [{"clip_t": v} for v in clip_t(images, texts).tolist()]
