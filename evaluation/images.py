"""Reading evaluation images back, and CLIP image embeddings of files of any mix of sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_uint8(path: Path) -> torch.Tensor:
    """A PNG/JPEG file -> uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def encode_files(clip, paths: list[Path], batch: int) -> torch.Tensor:
    """Normalised CLIP image embeddings [N, D] in `paths` order; images of one size share a batch."""
    images = [load_uint8(p) for p in paths]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for indices in by_size.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            for i, emb in zip(chunk, clip.encode_images(torch.stack([images[i] for i in chunk]))):
                out[i] = emb
    return torch.stack(out)
