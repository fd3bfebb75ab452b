"""FID / KID through clean-fid and LPIPS through the lpips package, each against a direct computation written here
from the formula, on tiny feature networks (Inception and AlexNet weights cannot be downloaded here): the same
code paths as with the real weights, only the network differs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from scipy import linalg

from safediff.common.config import FIDConfig
from safediff.common.errors import UserInputError
from safediff.evaluation import fid
from safediff.evaluation.lpips_score import LpipsDistance, paired_lpips


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A tiny feature network as clean-fid calls one: [B, 3, 299, 299] in [0, 255] -> 2x2 mean pool, 12 features
    (fewer than the images, so the covariances are full rank)."""
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


def _write(folder, images):
    folder.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return sorted(folder.iterdir())


def _clean_features(files) -> np.ndarray:
    """clean-fid's clean resize written from its definition: each channel as a float image, PIL bicubic to 299,
    clipped to [0, 255] (bicubic overshoots)."""
    out = []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB")).astype(np.float32)
        channels = [np.asarray(Image.fromarray(a[..., c], mode="F").resize((299, 299), Image.BICUBIC)).clip(0, 255)
                    for c in range(3)]
        out.append(pooled(torch.from_numpy(np.stack(channels))[None]).double().numpy()[0])
    return np.stack(out)


def test_fid_and_kid_match_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 36, 44, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-30, 90, real.shape), 0, 255).astype(np.uint8)
    real_files, fake_files = _write(tmp_path / "real", real), _write(tmp_path / "fake", fake)
    scorer = fid.FIDScorer(FIDConfig(reference=tmp_path / "real"), net=pooled, network_sha256="pooled")
    result = scorer.compute(fake_files)

    fr, ff = _clean_features(real_files), _clean_features(fake_files)
    s_r, s_f = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    expected_fid = ((fr.mean(0) - ff.mean(0)) ** 2).sum() + np.trace(s_r + s_f - 2 * linalg.sqrtm(s_r @ s_f).real)
    # KID: with subsets as large as the sets, every subset is the whole set, so KID is the unbiased MMD^2 with
    # the cubic kernel k(x, y) = (x.y / d + 1)^3 over all images
    d, m = fr.shape[1], len(fr)
    k_rr, k_ff, k_rf = ((a @ b.T / d + 1) ** 3 for a, b in ((fr, fr), (ff, ff), (fr, ff)))
    off = (k_rr.sum() - np.trace(k_rr) + k_ff.sum() - np.trace(k_ff)) / (m * (m - 1))
    expected_kid = off - 2 * k_rf.mean()
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-4) and expected_fid > 10
    assert result["kid"] == pytest.approx(expected_kid, rel=1e-4) and expected_kid > 0
    assert (result["fid_real_images"], result["fid_generated_images"], result["mode"]) == (40, 40, "clean")

    # the reference features written once give the same numbers; another network's are refused
    stored = tmp_path / "ref.npz"
    fid.write_reference(real_files, pooled, "pooled", stored, progress=False)
    again = fid.FIDScorer(FIDConfig(reference=stored), net=pooled, network_sha256="pooled").compute(fake_files)
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9) and again["kid"] == result["kid"]
    with pytest.raises(UserInputError, match="another network"):
        fid.FIDScorer(FIDConfig(reference=stored), net=pooled, network_sha256="other")


def test_fid_names_the_field_of_a_missing_or_misnamed_inception(tmp_path):
    _write(tmp_path / "real", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserInputError, match="evaluation.suite.fid.inception_weights: .* is not a file"):
        fid.FIDScorer(FIDConfig(reference=tmp_path / "real", inception_weights=tmp_path / "nope.pt"))
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(UserInputError, match="must be named inception-2015-12-05.pt"):
        fid.FIDScorer(FIDConfig(reference=tmp_path / "real", inception_weights=tmp_path / "weights.pt"))
    with pytest.raises(UserInputError, match="evaluation.suite.fid.reference"):
        fid.FIDScorer(FIDConfig(reference=tmp_path / "none"), net=pooled, network_sha256="pooled")


def test_coco_reference_images_are_chosen_by_the_sets_coco_ids(tmp_path):
    import csv

    from safediff.evaluation.prompt_sets import DATA

    ids = [int(r["coco_id"]) for r in csv.DictReader((DATA / "coco_3k_val.csv").open())]
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i in ids[:5] + [999_999_999]:
        (folder / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"")
    with pytest.raises(UserInputError, match=f"{len(set(ids)) - 5} of the {len(set(ids))} COCO images"):
        fid.coco_images(folder, "coco")
    for i in ids[5:]:
        (folder / f"{i:012d}.jpg").write_bytes(b"")
    chosen = fid.coco_images(folder, "coco")
    assert len(chosen) == len(set(ids)) and not any("999999999" in p.name for p in chosen)
    with pytest.raises(UserInputError, match="no coco_id column"):
        fid.coco_images(folder, "i2p")


# ---------------------------------------------------------------- LPIPS

SHIFT = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)   # lpips' ScalingLayer (Zhang et al.'s code)
SCALE = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
RELU = (1, 4, 7, 9, 11)  # the ReLUs of torchvision's AlexNet `features` whose outputs LPIPS compares


@pytest.fixture
def alexnet_files(tmp_path):
    """A random AlexNet saved as torchvision names it (.safetensors) and random non-negative linear layers (a
    torch file, read with weights_only)."""
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None).eval()
    save_file({k: v.contiguous() for k, v in alex.state_dict().items()}, tmp_path / "alexnet.safetensors")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lins, tmp_path / "lin.pth")
    return alex, lins, tmp_path / "alexnet.safetensors", tmp_path / "lin.pth"


@torch.no_grad()
def _lpips_by_hand(alex, lins, a: torch.Tensor, b: torch.Tensor) -> float:
    """The LPIPS formula in float64 on torchvision's AlexNet: sum over layers of the spatial mean of the
    channel-weighted squared difference of channel-normalised ReLU features."""
    feats = []
    for x in (a, b):
        h, outs = ((x - SHIFT) / SCALE).double(), []
        for i, layer in enumerate(alex.double().features):
            h = layer(h)
            if i in RELU:
                outs.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        feats.append(outs)
    total = 0.0
    for layer, (fa, fb) in enumerate(zip(*feats)):
        w = lins[f"lin{layer}.model.1.weight"].double().view(1, -1, 1, 1)
        total += float(((fa - fb) ** 2 * w).sum(1).mean())
    return total


def test_lpips_matches_the_formula_by_hand(tmp_path, alexnet_files):
    alex, lins, backbone, linear = alexnet_files
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, (72, 90, 3), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    lpips = LpipsDistance(backbone, "alex", linear, resize="none")
    tensors = [torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255 * 2 - 1 for p in pictures]
    expected = _lpips_by_hand(alex, lins, *tensors)
    assert lpips.distance(*paths) == pytest.approx(expected, rel=1e-4) and expected > 0
    assert lpips.distance(paths[0], paths[0]) == pytest.approx(0, abs=1e-7)
    # the two published ways to make images 64 pixels
    assert tuple(LpipsDistance(backbone, "alex", linear, "rece").image(paths[0]).shape) == (1, 3, 64, 64)
    assert tuple(LpipsDistance(backbone, "alex", linear, "esd").image(paths[0]).shape) == (1, 3, 64, 80)


def test_lpips_names_a_wrong_weights_file(tmp_path, alexnet_files):
    _, lins, backbone, linear = alexnet_files
    save_file({"features.0.weight": torch.zeros(1)}, tmp_path / "partial.safetensors")
    with pytest.raises(UserInputError, match="--lpips-backbone: .* not a torchvision alex state dict"):
        LpipsDistance(tmp_path / "partial.safetensors", "alex", linear)
    with pytest.raises(UserInputError, match="--lpips-linear: .* does not hold the alex linear layers"):
        LpipsDistance(backbone, "alex", backbone)
    with pytest.raises(UserInputError, match="--lpips-backbone: .* is not a file"):
        LpipsDistance(tmp_path / "missing.pth", "alex", linear)


def test_paired_lpips_averages_per_prompt_and_needs_every_pair(tmp_path, alexnet_files):
    _, _, backbone, linear = alexnet_files
    lpips = LpipsDistance(backbone, "alex", linear)
    rng = np.random.default_rng(2)
    records = []
    for side in ("a", "b"):
        (tmp_path / side / "images").mkdir(parents=True)
    for case in ("1", "2", "3"):
        for j in range(2):
            name = f"{case}_{j}.png"
            base = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(base).save(tmp_path / "a" / "images" / name)
            moved = base if case == "1" else rng.integers(0, 256, base.shape, dtype=np.uint8)
            Image.fromarray(moved).save(tmp_path / "b" / "images" / name)
            records.append({"case_number": case, "j": j, "image": name})
    result = paired_lpips(tmp_path / "a", tmp_path / "b", records, records[::-1], lpips, 500)
    per_prompt = [np.mean([lpips.distance(tmp_path / "a" / "images" / f"{c}_{j}.png",
                                          tmp_path / "b" / "images" / f"{c}_{j}.png") for j in range(2)])
                  for c in ("1", "2", "3")]
    assert per_prompt[0] == pytest.approx(0, abs=1e-7) and min(per_prompt[1:]) > 0
    assert result["lpips"] == pytest.approx(np.mean(per_prompt)) and (result["prompts"], result["images"]) == (3, 6)
    assert result["ci_low"] <= result["lpips"] <= result["ci_high"] and result["resize"] == "rece"
    with pytest.raises(UserInputError, match="no image for prompt 3 image 1"):
        paired_lpips(tmp_path / "a", tmp_path / "b", records, records[:-1], lpips, 500)


def test_fid_reference_command_names_a_missing_inception(tmp_path, capsys):
    from safediff.cli import main

    _write(tmp_path / "real", np.zeros((2, 8, 8, 3), np.uint8))
    assert main(["fid-reference", str(tmp_path / "real"), str(tmp_path / "ref.npz"),
                 "--inception", str(tmp_path / "inception-2015-12-05.pt")]) == 2
    assert "--inception: " in capsys.readouterr().err and not (tmp_path / "ref.npz").exists()


class _TinyInception(torch.nn.Module):
    """The interface of clean-fid's TorchScript Inception (a `layers` module giving 2048 features after its
    own normalisation), 2048 random projections of the mean colour: small enough to script and save here."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Conv2d(3, 2048, 2))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_the_inception_file_loads_through_clean_fids_own_loader(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_TinyInception().eval()).save(str(path))
    rng = np.random.default_rng(3)
    _write(tmp_path / "real", rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8))
    fake = _write(tmp_path / "fake", rng.integers(0, 128, (6, 20, 20, 3), dtype=np.uint8))
    scorer = fid.FIDScorer(FIDConfig(reference=tmp_path / "real", inception_weights=path))
    assert scorer.network_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    result = scorer.compute(fake)
    assert result["fid"] > 0 and result["fid_generated_images"] == 6
