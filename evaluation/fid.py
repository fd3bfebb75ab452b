"""FID between generated images and a folder of real ones, computed by torchmetrics (torch-fidelity's
Inception-v3 FID network, weights from a local path; nothing is downloaded):
    FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))
over the networks' 2048-d pool features. A set-level number: it has no per-image score."""

from __future__ import annotations

from pathlib import Path

import torch

from safediff.common.config import FIDConfig
from safediff.common.errors import UserInputError
from safediff.evaluation.images import load_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FIDScorer:
    name = "fid"

    def __init__(self, cfg: FIDConfig, feature: torch.nn.Module | None = None):
        """`feature`: a custom feature network (tests); default the FID Inception from cfg.inception_weights."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        if cfg.reference is None or not Path(cfg.reference).is_dir():
            raise UserInputError(f"evaluation.suite.fid.reference: {cfg.reference} is not a folder of real images")
        self.reference = sorted(p for p in Path(cfg.reference).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(self.reference) < 2:
            raise UserInputError(f"evaluation.suite.fid.reference: {cfg.reference} holds fewer than 2 images")
        if feature is None:
            if cfg.inception_weights is None or not Path(cfg.inception_weights).is_file():
                raise UserInputError(f"evaluation.suite.fid.inception_weights: {cfg.inception_weights} is not a "
                                     "file (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
            self.metric = FrechetInceptionDistance(feature=2048,
                                                   feature_extractor_weights_path=str(cfg.inception_weights))
        else:
            self.metric = FrechetInceptionDistance(feature=feature)

    def compute(self, generated: list[Path]) -> dict[str, float]:
        self.metric.reset()
        for paths, real in ((self.reference, True), (generated, False)):
            for path in paths:  # one at a time: the sets may mix image sizes
                self.metric.update(load_uint8(path).unsqueeze(0), real=real)
        return {"fid": float(self.metric.compute()), "fid_real_images": len(self.reference),
                "fid_generated_images": len(generated)}
