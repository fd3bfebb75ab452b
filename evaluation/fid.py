"""FID and KID between generated images and real ones, computed by clean-fid (GaParmar/clean-fid) in its "clean"
mode, as the concept-erasure references report them:

- every image is resized to 299 x 299 by PIL bicubic on float channels (clean-fid `resize.build_resizer("clean")`),
  whatever the installed torch or torchvision;
- features are the 2048-d pool features of clean-fid's TorchScript Inception (`inception-2015-12-05.pt`, from a
  local file; nothing is downloaded);
- FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))   (`fid.fid_from_feats`);
- KID = the unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged over `kid_subsets` random
  subsets of min(n_r, n_g, kid_subset_size) images from each side (`fid.kernel_distance`). FID is biased on small
  sets (COCO-3k); KID is not, which is why both are reported.

The real side is a folder of images, or a `.npz` of their features written once by `safediff fid-reference`
(recorded with the feature network's sha256, and refused under another network). Set-level numbers: no per-image
score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from safediff.common.config import FIDConfig
from safediff.common.errors import UserInputError
from safediff.evaluation.provenance import sha256

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid loads from its folder
FIELD = "evaluation.suite.fid"

# A feature network as clean-fid calls it: float images [B, 3, 299, 299] in [0, 255] -> features [B, D].
FeatureNet = Callable[[torch.Tensor], torch.Tensor]


def inception(path: Path | None, field: str = f"{FIELD}.inception_weights") -> FeatureNet:
    """clean-fid's clean-mode Inception from the local file `path` (no download); errors name `field`."""
    from cleanfid.inception_torchscript import InceptionV3W

    if path is None or not Path(path).is_file():
        raise UserInputError(f"{field}: {path} is not a file (clean-fid's {INCEPTION_FILE}, "
                             "from https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/)")
    if Path(path).name != INCEPTION_FILE:
        raise UserInputError(f"{field}: {path} must be named {INCEPTION_FILE} (clean-fid loads "
                             "that name from its folder)")
    return InceptionV3W(str(Path(path).parent), download=False).eval()


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def coco_images(folder: Path, set_name: str) -> list[Path]:
    """The images of `folder` whose COCO id (the number ending the file name: COCO_val2014_000000078748.jpg or
    000000078748.jpg) is a row's `coco_id` in the built-in set `set_name`; every id must be found."""
    import csv

    from safediff.evaluation.prompt_sets import BUILTIN, DATA

    if set_name not in BUILTIN:
        raise UserInputError(f"--set {set_name}: not a built-in set ({', '.join(BUILTIN)})")
    with (DATA / BUILTIN[set_name].file).open(newline="") as f:
        rows = list(csv.DictReader(f)) if BUILTIN[set_name].file.endswith(".csv") else []
    if not rows or "coco_id" not in rows[0]:
        raise UserInputError(f"--set {set_name}: its rows carry no coco_id column")
    wanted = {int(r["coco_id"]) for r in rows}
    found = {}
    for path in image_files(folder):
        tail = path.stem.rsplit("_", 1)[-1]
        if tail.isdigit() and int(tail) in wanted:
            found[int(tail)] = path
    missing = sorted(wanted - set(found))
    if missing:
        raise UserInputError(f"{folder}: {len(missing)} of the {len(wanted)} COCO images of set {set_name} are "
                             f"missing (ids {', '.join(map(str, missing[:5]))}, ...)")
    return [found[i] for i in sorted(found)]


def features(files: list[Path], net: FeatureNet, batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """[N, D] features of `files` after clean-fid's clean resize (clean-fid `fid.get_files_features`)."""
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], model=net, num_workers=0, batch_size=batch_size,
                              device=torch.device("cpu"), mode="clean", verbose=progress)


def fid_kid(real: np.ndarray, generated: np.ndarray, kid_subsets: int, kid_subset_size: int,
            seed: int = 0) -> dict[str, float]:
    """FID and KID of two feature sets [N, D] (module docstring). KID's subsets come from numpy's global RNG
    in clean-fid; it is seeded here and restored after, so the number is reproducible."""
    from cleanfid.fid import fid_from_feats, kernel_distance

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kid = kernel_distance(real, generated, num_subsets=kid_subsets, max_subset_size=kid_subset_size)
    finally:
        np.random.set_state(state)
    return {"fid": float(fid_from_feats(real, generated)), "kid": kid}


def write_reference(files: list[Path], net: FeatureNet, network_sha256: str, out: Path,
                    batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """The real side's features, written once to `out` (.npz: feats, network_sha256, mode, files)."""
    if len(files) < 2:
        raise UserInputError(f"fid-reference: {len(files)} images; FID needs at least 2")
    feats = features(files, net, batch_size, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, feats=feats, network_sha256=np.array(network_sha256), mode=np.array("clean"),
             files=np.array([f.name for f in files]))
    return feats


class FIDScorer:
    name = "fid"

    def __init__(self, cfg: FIDConfig, net: FeatureNet | None = None, network_sha256: str | None = None):
        """`net`: a custom feature network (tests) with its identity; default clean-fid's Inception from
        cfg.inception_weights. Checks every input now, before any image is generated."""
        self.cfg = cfg
        if net is None:
            net, network_sha256 = inception(cfg.inception_weights), sha256(cfg.inception_weights)
        self.net, self.network_sha256 = net, network_sha256
        reference = cfg.reference
        if reference is not None and Path(reference).is_file() and Path(reference).suffix == ".npz":
            self.real = self._stored(Path(reference))
        elif reference is not None and Path(reference).is_dir():
            self.real = image_files(Path(reference))
            if len(self.real) < 2:
                raise UserInputError(f"{FIELD}.reference: {reference} holds fewer than 2 images")
        else:
            raise UserInputError(f"{FIELD}.reference: {reference} is neither a folder of real images nor a .npz "
                                 "written by `safediff fid-reference`")

    def _stored(self, path: Path) -> np.ndarray:
        with np.load(path, allow_pickle=False) as z:
            if str(z["mode"]) != "clean" or str(z["network_sha256"]) != self.network_sha256:
                raise UserInputError(f"{FIELD}.reference: {path} holds features of another network or mode "
                                     f"({str(z['network_sha256'])[:12]}, {z['mode']}); rebuild it with "
                                     "`safediff fid-reference` and this inception_weights")
            return z["feats"]

    def compute(self, generated: list[Path]) -> dict[str, float]:
        if len(generated) < 2:
            raise UserInputError(f"{FIELD}: {len(generated)} generated images; FID needs at least 2")
        real = self.real if isinstance(self.real, np.ndarray) else features(self.real, self.net, self.cfg.batch_size)
        fake = features(generated, self.net, self.cfg.batch_size)
        return {**fid_kid(real, fake, self.cfg.kid_subsets, self.cfg.kid_subset_size),
                "fid_real_images": len(real), "fid_generated_images": len(fake), "mode": "clean"}
