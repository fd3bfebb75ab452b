"""LPIPS between two evaluations' images of the same prompts and seeds (base model vs adapter): how far the
adapter moves images it should leave alone. Computed by the `lpips` package (Zhang et al., 2018, v0.1):

    LPIPS(x, y) = sum_l mean_{h,w} sum_c w_lc (f^_l(x) - f^_l(y))^2,   f^_l = f_l / |f_l| over channels,

with f_l the l-th ReLU output of the backbone on the scaled image ((x - shift) / scale, x in [-1, 1]) and w_l the
calibrated linear weights. AlexNet, v0.1, images made 64 pixels first, by one of two published conventions:

- `rece`: CharlesGong12/RECE `execs/lpips_score.py`, whose evaluation scripts the SafeDiffusion-R1 reference
  ships: `cv2.resize(image, (64, 64))` (bilinear, no antialiasing, aspect ratio not kept);
- `esd`: rohitgandikota/erasing `eval-scripts/lpips_eval.py`: torchvision `Resize(64)` on the PIL image (shorter
  side 64, bilinear with antialiasing);
- `none`: the native size.

The distance per image pair, the mean per prompt, the mean over prompts (with a fixed number of images per prompt
this equals RECE's mean over images). Weights come from files, never downloaded: the backbone's torchvision state
dict (e.g. `alexnet-owt-7be5be79.pth`, or a .safetensors copy) and the linear layers (default: the calibrated
ones the lpips package ships).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safediff.common.errors import UserInputError
from safediff.evaluation.metrics import bootstrap_interval
from safediff.evaluation.provenance import files

RESIZE = ("rece", "esd", "none")
SIDE = 64


def load_state(path: Path, field: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only (no code is unpickled)."""
    if not Path(path).is_file():
        raise UserInputError(f"{field}: {path} is not a file")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def shipped_linear(net: str) -> Path:
    """The calibrated v0.1 linear layers inside the lpips package."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


class LpipsDistance:
    def __init__(self, backbone: Path, net: str = "alex", linear: Path | None = None, resize: str = "rece"):
        """`resize`: rece, esd or none (module docstring)."""
        import lpips

        if resize not in RESIZE:
            raise UserInputError(f"--lpips-resize {resize}: one of {', '.join(RESIZE)}")
        self.net, self.resize = net, resize
        self.backbone, self.linear = Path(backbone), Path(linear) if linear else shipped_linear(net)
        # pnet_rand / pretrained=False: build the architecture without downloading anything; weights below
        with warnings.catch_warnings():  # lpips builds torchvision's net with the deprecated `pretrained`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False).eval()
        trunk = load_state(self.backbone, "--lpips-backbone")
        # lpips splits torchvision's `features` into slices that keep the layer indices: slice2.3.weight is
        # features.3.weight
        wanted = {name: "features." + name.split(".", 1)[1] for name, _ in self.model.net.named_parameters()}
        missing = sorted(source for source in wanted.values() if source not in trunk)
        if missing:
            raise UserInputError(f"--lpips-backbone: {backbone} is not a torchvision {net} state dict (missing "
                                 f"{', '.join(missing[:3])})")
        self.model.net.load_state_dict({name: trunk[source] for name, source in wanted.items()})
        linear_state = load_state(self.linear, "--lpips-linear")
        lins = {k for k in self.model.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
        if set(linear_state) != lins:
            raise UserInputError(f"--lpips-linear: {self.linear} does not hold the {net} linear layers "
                                 f"({', '.join(sorted(lins)[:3])}, ...)")
        self.model.load_state_dict(linear_state, strict=False)

    def image(self, path: Path) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1], made 64 pixels by the `resize` convention."""
        from torchvision.transforms import functional

        picture = np.asarray(Image.open(path).convert("RGB"))
        if self.resize == "rece":
            import cv2
            picture = cv2.resize(picture, (SIDE, SIDE))
        elif self.resize == "esd":
            picture = np.asarray(functional.resize(Image.fromarray(picture), SIDE))
        return functional.to_tensor(picture.copy()).unsqueeze(0) * 2 - 1

    @torch.no_grad()
    def distance(self, a: Path, b: Path) -> float:
        return float(self.model(self.image(a), self.image(b)).item())


def paired_lpips(first: Path, second: Path, first_records: list[dict], second_records: list[dict],
                 lpips: LpipsDistance, resamples: int, seed: int = 0) -> dict:
    """LPIPS of every image pair (same case_number and j), its mean over prompts and a 95% bootstrap interval
    over prompts. Records: the joined per-image records (records.jsonl) of the two evaluation folders."""
    by_key = {(str(r["case_number"]), int(r["j"])): r["image"] for r in second_records}
    per_prompt: dict[str, list[float]] = {}
    for r in sorted(first_records, key=lambda r: (str(r["case_number"]), int(r["j"]))):
        key = (str(r["case_number"]), int(r["j"]))
        if key not in by_key:
            raise UserInputError(f"{second}: no image for prompt {key[0]} image {key[1]}; LPIPS pairs images of "
                                 "the same prompts and seeds")
        per_prompt.setdefault(key[0], []).append(
            lpips.distance(first / "images" / r["image"], second / "images" / by_key[key]))
    means = np.array([np.mean(v) for v in per_prompt.values()])
    low, high = bootstrap_interval(means, resamples, seed)
    return {"lpips": float(means.mean()), "ci_low": low, "ci_high": high, "prompts": len(means),
            "images": sum(len(v) for v in per_prompt.values()), "net": lpips.net, "resize": lpips.resize,
            "backbone": files(lpips.backbone), "linear": files(lpips.linear)}
