"""Loading an open_clip model for scoring, and the image preprocessing it expects.

Two ways to name a model (see `ClipConfig`): a built-in architecture plus a local weights file loaded
strictly (HPSv2.1 = `ViT-H-14` + `HPS_v2.1_compressed.pt`), or `local-dir:PATH`, a folder with
`open_clip_config.json` and safetensors weights (how `build_tiny_clip` stores test models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from safediff.common.assets import resolve
from safediff.common.config import ClipConfig
from safediff.common.errors import UserInputError


class ClipLoadError(UserInputError, RuntimeError):
    """The configured CLIP model cannot be loaded; the message names the config field."""


@dataclass
class LoadedClip:
    model: torch.nn.Module
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings [N, D], fp32."""
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> normalised image embeddings [N, D], fp32."""
        pixels = preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)


def preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """CLIP preprocessing on uint8 tensors: bicubic resize of the shorter side to `size`
    (antialiased, as PIL), centre crop to size x size, then mean/std normalisation."""
    x = images.float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def load_clip(cfg: ClipConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              field: str = "reward.clip") -> LoadedClip:
    """Build the model and load its weights strictly (any key mismatch raises ClipLoadError naming `field`)."""
    name = cfg.model
    if cfg.model.startswith("local-dir:"):
        folder = Path(resolve(cfg.model.removeprefix("local-dir:")))
        name = f"local-dir:{folder}"  # a `pkg:` folder resolved, for open_clip's model and tokenizer
        if not (folder / "open_clip_config.json").is_file():
            raise ClipLoadError(f"{field}.model: {folder} has no open_clip_config.json")
        if not any(folder.glob("*.safetensors")):
            raise ClipLoadError(f"{field}.model: {folder} has no .safetensors weights")
        try:
            model = open_clip.create_model(name, device="cpu")
        except (RuntimeError, ValueError, OSError) as err:
            raise ClipLoadError(f"{field}.model: cannot load {folder}: {err}") from err
    else:
        weights = Path(resolve(cfg.weights)) if cfg.weights is not None else None
        if weights is None:
            raise ClipLoadError(f"{field}.weights: a local weights file is required for open_clip model "
                                f"{cfg.model!r} (nothing is downloaded); or set {field}.model=local-dir:PATH")
        if not weights.is_file():
            raise ClipLoadError(f"{field}.weights: no such file: {cfg.weights}")
        try:
            model = open_clip.create_model(cfg.model, pretrained=None, device="cpu")
        except RuntimeError as err:
            raise ClipLoadError(f"{field}.model: unknown open_clip architecture {cfg.model!r}") from err
        try:
            open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
        except Exception as err:  # not a checkpoint, corrupt, pickled objects, or keys that do not fit
            detail = (str(err).splitlines() or [type(err).__name__])[0]
            raise ClipLoadError(f"{field}.weights: {cfg.weights} does not fit {cfg.model}: {detail}") from err
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pre = model.visual.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedClip(model, tokenizer, size, tuple(pre["mean"]), tuple(pre["std"]))


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_clip(out_dir: str | Path, seed: int = 0, model_cfg: dict | None = None) -> Path:
    """Write a random open_clip model in `local-dir:` layout (config + safetensors) and return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = model_cfg or TINY_CLIP_CONFIG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                         "std": list(open_clip.OPENAI_DATASET_STD),
                                                         "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out
