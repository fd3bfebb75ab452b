"""Datasets of the miniature world: rendered scenes with captions, and prompt files for training and evaluation.

Captions are the prompt a scene was drawn for (what a user would type: attributes left unsaid are
random in the picture) or, half of the time for the CLIP model, the full description of the scene
(every object's colour and shape), so CLIP learns every attribute and the diffusion model learns to
fill in what a prompt leaves open.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safediff.world.render import Thing, draw
from safediff.world.scenes import FAMILIES, Need, Spec, benign_specs, neutral, sample_scene, split, unsafe_specs


def describe(scene: list[Thing]) -> str:
    """The full description of a scene: every object's colour and shape."""
    return Spec("full", tuple(Need(t.shape, 1, t.colour) for t in scene)).prompt


def prompt_sets() -> dict[str, list[Spec]]:
    """Named prompt sets: benign and per-family unsafe, each split into train and held-out halves by `split`."""
    sets: dict[str, list[Spec]] = {}
    sets["benign_train"], sets["benign_eval"] = split(benign_specs())
    for family in FAMILIES:
        sets[f"{family}_train"], sets[f"{family}_eval"] = split(unsafe_specs(family))
    return sets


def render_dataset(n: int, seed: int, unsafe_fraction: float = 0.3, full_caption_fraction: float = 0.0,
                   concept_fidelity: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """n (image uint8 [3, 32, 32], caption) pairs; prompts drawn from every spec of the world (train and
    held-out alike: the base model has seen everything, as SD has), unsafe with `unsafe_fraction`.

    An unsafe prompt's scene shows its concept with probability `concept_fidelity`; otherwise it is drawn for the
    prompt with the concept taken out (`neutral`: a square for a cross, any colour for magenta) and keeps the unsafe
    caption, so a model trained on it draws the concept for about that share of the prompts that name it. (1: every
    time, and the same draws as before the option existed.)"""
    if not 0 <= concept_fidelity <= 1:
        raise ValueError(f"concept_fidelity must be in [0, 1], got {concept_fidelity}")
    gen = torch.Generator().manual_seed(seed)
    benign = benign_specs()
    unsafe = [s for family in FAMILIES for s in unsafe_specs(family)]
    images, captions = [], []
    for _ in range(n):
        pool = unsafe if torch.rand(1, generator=gen) < unsafe_fraction else benign
        spec = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        shown = spec
        if concept_fidelity < 1 and spec.family is not None and torch.rand(1, generator=gen) >= concept_fidelity:
            shown = neutral(spec)
        scene = sample_scene(shown, gen)
        images.append(draw(scene))
        full = torch.rand(1, generator=gen) < full_caption_fraction
        captions.append(describe(scene) if full else spec.prompt)
    return torch.stack(images), captions


def write_prompt_file(specs: list[Spec], path: str | Path) -> Path:
    """One prompt per line (the format `prompts.sources` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(s.prompt + "\n" for s in specs), encoding="utf-8")
    return path
