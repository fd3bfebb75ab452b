"""What an evaluation's numbers were computed with, recorded in summary.json and report.md: every scorer's
weights and embedding files with their sha256, its thresholds and classes, the generation scheduler, and the
versions of the libraries that compute the numbers. Two evaluations whose provenance differs are not
comparable digit for digit, and a reader can see why."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

from safediff.common.assets import resolve
from safediff.common.config import ClipConfig, SuiteConfig

LIBRARIES = ("torch", "diffusers", "transformers", "open_clip_torch", "nudenet", "onnxruntime", "clean-fid",
             "lpips", "numpy", "safediff")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".npy", ".json")


def sha256(path: Path) -> str:
    """The file's sha256, computed once per (path, size, modification time) in this process."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files(path: str | Path | None, digest: bool = True) -> list[dict[str, str]] | str | None:
    """[{path, sha256}] of a weights file, or of the weight and config files of a folder; None when unset;
    with `digest` False just the path (nothing is read)."""
    if path is None or not digest:
        return None if path is None else str(path)
    path = Path(resolve(path))
    if path.is_file():
        return [{"path": str(path), "sha256": sha256(path)}]
    if path.is_dir():
        return [{"path": str(p), "sha256": sha256(p)} for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return [{"path": str(path), "sha256": "missing"}]


def hashes(tree) -> list[dict[str, str]]:
    """Every {path, sha256} inside a provenance entry."""
    if isinstance(tree, dict):
        return [tree] if "sha256" in tree else [h for v in tree.values() for h in hashes(v)]
    if isinstance(tree, list):
        return [h for v in tree for h in hashes(v)]
    return []


def clip(cfg: ClipConfig, digest: bool = True) -> dict:
    folder = cfg.model.removeprefix("local-dir:") if cfg.model.startswith("local-dir:") else None
    return {"model": cfg.model, "files": files(folder if folder else cfg.weights, digest)}


def scorers(suite: SuiteConfig, names: list[str], hash_files: bool = True) -> dict[str, dict]:
    """The settings and files behind each scorer in `names` (files by path only when not `hash_files`)."""
    out: dict[str, dict] = {}
    d = hash_files
    for name in names:
        if name == "nudenet":
            onnx = suite.nudenet_model or "nudenet/320n.onnx (the nudenet package's)"
            if d and suite.nudenet_model is None:
                import nudenet

                onnx = Path(nudenet.__file__).parent / "320n.onnx"
            out[name] = {"files": files(onnx, d), "swap_channels": suite.nudenet_swap_channels,
                         "threshold": suite.nudenet_threshold,
                         "count_classes": "all nine exposed classes", "flag_classes": list(suite.nudenet_flag_classes)}
        elif name == "q16":
            out[name] = {"clip": clip(suite.q16.clip, d), "embeddings": files(suite.q16.embeddings, d),
                         "rule": "argmax softmax(100 cos(image, embeddings)) == 1"}
        elif name == "clip_t":
            out[name] = {"clip": clip(suite.clip_t, d), "scale": suite.clip_t_scale}
        elif name == "geneval":
            g = suite.geneval
            out[name] = {"detector": g.detector, "files": files(g.weights, d) if g.detector == "mask2former" else None,
                         "colour_clip": clip(g.colour_clip, d) if g.detector == "mask2former" else None,
                         "threshold": g.threshold, "counting_threshold": g.counting_threshold,
                         "max_objects": g.max_objects, "position_threshold": g.position_threshold,
                         "test_scale": list(g.test_scale), "max_per_image": g.max_per_image}
        elif name == "fid":
            fid, reference = suite.fid, Path(resolve(suite.fid.reference)) if suite.fid.reference else None
            out[name] = {"library": "clean-fid, mode clean (PIL bicubic to 299 x 299)",
                         "inception": files(fid.inception_weights, d),
                         "reference": files(reference, d) if reference and reference.suffix == ".npz" else
                         reference and str(reference),
                         "reference_images": len(list(reference.iterdir())) if d and reference and reference.is_dir()
                         else None, "kid_subsets": fid.kid_subsets, "kid_subset_size": fid.kid_subset_size}
        elif name == "world":
            out[name] = {"judges": "safediff.world.judges (pixel rules, no weights)"}
    return out


def libraries() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record(suite: SuiteConfig, names: list[str], scheduler: str) -> dict:
    """The provenance block of summary.json."""
    return {"scheduler": scheduler, "scorers": scorers(suite, names), "libraries": libraries()}
