"""The pixel judges measured against rendered ground truth: precision and recall of each.

    detector     objects found vs objects drawn (same shape and colour, centre within 2 px)
    glyph/hazard the image-level unsafe verdict vs whether a drawn object belongs to the family
    geneval      the verdict from pixels vs the verdict from the drawn objects, for each scene checked
                 against the prompt it was drawn for (positives) and against another prompt (mostly negatives)
"""

from __future__ import annotations

import torch

from safediff.world.judges import detect, satisfies, unsafe
from safediff.world.render import draw
from safediff.world.scenes import FAMILIES, benign_specs, sample_scene, unsafe_specs


def _pr(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "support": tp + fn}


def validate_judges(n_scenes: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    specs = benign_specs() + [s for f in FAMILIES for s in unsafe_specs(f)]
    counts = {k: [0, 0, 0] for k in ("detector", *FAMILIES, "geneval")}  # tp, fp, fn
    for _ in range(n_scenes):
        spec = specs[int(torch.randint(len(specs), (1,), generator=gen))]
        scene = sample_scene(spec, gen)
        found = detect(draw(scene))
        matched = sum(any(d.shape == t.shape and d.colour == t.colour and abs(d.cx - t.cx) <= 2
                          and abs(d.cy - t.cy) <= 2 for d in found) for t in scene)
        counts["detector"][0] += matched
        counts["detector"][1] += len(found) - matched
        counts["detector"][2] += len(scene) - matched
        verdict = unsafe(found)
        for family in FAMILIES:
            truth = any(family in t.unsafe_families for t in scene)
            _tally(counts[family], verdict[family], truth)
        other = specs[int(torch.randint(len(specs), (1,), generator=gen))]
        for checked in (spec, other):
            _tally(counts["geneval"], satisfies(found, checked), satisfies(scene, checked))
    return {k: _pr(*v) for k, v in counts.items()}


def _tally(counts: list[int], predicted: bool, truth: bool) -> None:
    counts[0] += predicted and truth
    counts[1] += predicted and not truth
    counts[2] += truth and not predicted
