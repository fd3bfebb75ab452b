"""GenEval scoring (Ghosh et al., 2023) behind a detector interface.

Per image, with the prompt's metadata (`tag`, `include` clauses joined by AND, `exclude` clauses by OR):
- detections of a class are kept when their confidence exceeds 0.3 (0.9 for the counting task), most
  confident first, at most 16 per class (GenEval's defaults; its overlap suppression is off by default);
- include {class, count}: the `count` most confident detections must exist;
  + color: a colour namer must name `color` for at least `count` of them;
  + position [relation, group]: each of them must stand in `relation` to every object of include
    clause `group` (which must itself have matched), by `relative_position` below;
- exclude {class, count}: fewer than `count` detections of that class (counting: exactly n).
The task score is the share of correct images; GenEval's overall score is the mean of the six tasks.

Detectors: `WorldDetector` (the miniature world's pixel judges, colours read from pixels) and
`Mask2FormerDetector` (a transformers Mask2Former COCO instance-segmentation checkpoint from a path),
whose objects get their colour from `ClipColourNamer` (CLIP zero-shot over GenEval's ten colours).

The official code is the specification (djghosh13/geneval `evaluation/evaluate_images.py`; its detector is
mmdetection 2.x's `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`): instances come from mmdetection's
Mask2Former instance post-processing (`maskformer_fusion_head.instance_postprocess`, reimplemented in
`instances`), each with its own binary mask and a box from that mask, at the (1333, 800) keep-ratio test
scale; a colour is read from the object's mask pasted over a #999 grey background and cropped to its box.
What differs: the transformers port of the checkpoint instead of mmdetection's, PIL-bilinear input resize
(mmdetection: cv2 bilinear), and CLIP preprocessing by torch bicubic resize (open_clip: PIL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from safediff.common.config import GenEvalConfig
from safediff.common.errors import UserInputError
from safediff.evaluation.images import load_uint8

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")
# COCO class names that GenEval's object list (evaluation/data/object_names.txt) spells differently
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
GREY = 0x99  # GenEval's colour-crop background, #999


@dataclass(frozen=True)
class Detected:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, y down
    colour: str | None = None              # when the detector knows it; else the colour namer is asked
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # bool [H, W]: this instance


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Each mask's box [K, 4] = (x_min, y_min, x_max + 1, y_max + 1); all zeros for an empty mask
    (mmdetection's `mask2bbox`). `masks`: bool [K, H, W]."""
    boxes = torch.zeros(len(masks), 4)
    for k, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, max_per_image: int = 100
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask2Former instances as mmdetection makes them: (labels [K], scores [K], masks bool [K, H, W],
    boxes [K, 4]) from `class_logits` [Q, C + 1] (the last column: no object) and `mask_logits` [Q, H, W]
    at the image's resolution.

        p[q, c]   = softmax(class_logits[q])[c], the no-object column dropped
        K pairs   = the top max_per_image (query, class) pairs by p (a query may appear under two classes)
        mask      = mask_logits[q] > 0                 (sigmoid > 0.5), each instance its own mask
        score     = p[q, c] * mean(sigmoid(mask_logits[q]) over its mask)
        box       = the mask's bounding box

    Instances may overlap: nothing is painted into one label map, so a confident instance keeps its pixels.
    """
    probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    classes = probs.shape[1]
    top, index = probs.flatten().topk(min(max_per_image, probs.numel()), sorted=False)
    query, labels = index // classes, index % classes
    logits = mask_logits[query].float()
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return labels, top * mask_scores, masks, mask_boxes(masks)


class Detector(Protocol):
    def detect(self, image: torch.Tensor) -> list[Detected]:
        """uint8 [3, H, W] -> every detection, any confidence."""


class ColourNamer(Protocol):
    def name(self, image: torch.Tensor, objects: list[Detected], label: str) -> list[str]:
        """The colour of each object, one of COLOURS."""


def keep(detections: list[Detected], tag: str, cfg: GenEvalConfig) -> dict[str, list[Detected]]:
    """Detections by class above the task's confidence threshold, most confident first, capped per class."""
    threshold = cfg.counting_threshold if tag == "counting" else cfg.threshold
    by_class: dict[str, list[Detected]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > threshold and len(by_class.get(d.label, [])) < cfg.max_objects:
            by_class.setdefault(d.label, []).append(d)
    return by_class


def relative_position(a: Detected, b: Detected, threshold: float) -> set[str]:
    """Relations of a to b: the centre offset, shrunk on each axis by threshold * (sum of the two boxes'
    extents on that axis) and divided by the offset's length; a component beyond 0.5 names a relation."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # [object, corner, xy]
    centre_a, centre_b = boxes.mean(axis=1)
    extent_a, extent_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - threshold * (extent_a + extent_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def judge(image: torch.Tensor, objects: dict[str, list[Detected]], meta: dict, cfg: GenEvalConfig,
          namer: ColourNamer | None) -> tuple[bool, str]:
    """(correct, reasons) of one image against its metadata, by the rules in the module docstring."""
    correct, reasons, groups = True, [], []
    for req in meta.get("include", []):
        label, count = req["class"], req.get("count", 1)
        found = objects.get(label, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {label}>={count}, found {len(found)}")
        if matched and "color" in req:
            named = [d.colour for d in found] if all(d.colour for d in found) else namer.name(image, found, label)
            if named.count(req["color"]) < count:
                matched = False
                reasons.append(f"expected {req['color']} {label}>={count}, found {named}")
        if matched and "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {label} to be {relation}")
            elif not all(relation in relative_position(d, t, cfg.position_threshold)
                         for d in found for t in groups[target]):
                matched = False
                reasons.append(f"expected {label} {relation} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "; ".join(reasons)


class WorldDetector:
    """The miniature world's pixel judges as a detector: every object it finds, confidence 1."""

    def detect(self, image: torch.Tensor) -> list[Detected]:
        from safediff.world.judges import detect

        return [Detected(d.shape, 1.0, tuple(float(v) for v in d.box), d.colour) for d in detect(image)]


class ClipColourNamer:
    """GenEval's colour classifier: CLIP zero-shot over COLOURS with three templates (mean of their
    normalised text embeddings), on each object's box crop."""

    def __init__(self, clip):
        self.clip, self._classifiers = clip, {}

    def name(self, image: torch.Tensor, objects: list[Detected], label: str) -> list[str]:
        if label not in self._classifiers:
            weights = [torch.nn.functional.normalize(
                self.clip.encode_text([t.format(c=c, o=label) for t in COLOUR_TEMPLATES]).mean(0), dim=-1)
                for c in COLOURS]
            self._classifiers[label] = torch.stack(weights)
        crops = [colour_crop(image, d) for d in objects]
        embeds = torch.cat([self.clip.encode_images(c.unsqueeze(0)) for c in crops])
        return [COLOURS[i] for i in (embeds @ self._classifiers[label].T).argmax(-1).tolist()]


def colour_crop(image: torch.Tensor, obj: Detected) -> torch.Tensor:
    """What GenEval shows CLIP to name an object's colour: the object's own mask over a #999 grey background,
    cropped to its box (coordinates rounded as PIL's crop rounds them). uint8 [3, H, W] -> [3, h, w]."""
    if obj.mask is not None:
        image = torch.where(obj.mask.to(image.device)[None], image, torch.full_like(image, GREY))
    x0, y0, x1, y1 = (int(round(v)) for v in obj.box)
    return image[:, max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]


class Mask2FormerDetector:
    """A transformers Mask2Former instance-segmentation checkpoint (e.g. facebook's COCO Swin-S release) from a
    folder, post-processed as mmdetection does (`instances`); labels are the checkpoint's class names in
    GenEval's spelling. GenEval's published numbers used the mmdetection release of the same model, so
    scores through this port are comparable, not bit-identical."""

    def __init__(self, weights: Path | None, device: str = "cpu", test_scale: tuple[int, int] = (1333, 800),
                 max_per_image: int = 100):
        self.test_scale, self.max_per_image = test_scale, max_per_image
        if weights is None or not Path(weights).is_dir():
            raise UserInputError(f"evaluation.suite.geneval.weights: {weights} is not a Mask2Former checkpoint "
                                 "folder (config.json, weights, preprocessor_config.json)")
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.processor = AutoImageProcessor.from_pretrained(weights)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(weights).to(device).eval()
        self.labels = self.model.config.id2label

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[Detected]:
        """Every instance of `instances` (any score; `keep` applies the thresholds), masks at the image's size."""
        long_edge, short_edge = self.test_scale
        inputs = self.processor(images=image.permute(1, 2, 0).numpy(), return_tensors="pt",
                                size={"shortest_edge": short_edge, "longest_edge": long_edge}).to(self.model.device)
        outputs = self.model(**inputs)
        # as mmdetection: mask logits up to the network input, its padding cut off, then to the image's size
        valid = inputs["pixel_mask"][0]
        height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
        logits = F.interpolate(outputs.masks_queries_logits, size=inputs["pixel_values"].shape[-2:], mode="bilinear",
                               align_corners=False)[:, :, :height, :width]
        logits = F.interpolate(logits, size=tuple(image.shape[1:]), mode="bilinear", align_corners=False)[0]
        labels, scores, masks, boxes = instances(outputs.class_queries_logits[0], logits, self.max_per_image)
        found = []
        for label_id, score, mask, box in zip(labels.tolist(), scores.tolist(), masks.cpu(), boxes.tolist()):
            label = self.labels[label_id]
            found.append(Detected(COCO_TO_GENEVAL.get(label, label), score, tuple(box), mask=mask))
        return found


class GenEvalScorer:
    name = "geneval"

    def __init__(self, cfg: GenEvalConfig, device: str = "cpu"):
        self.cfg = cfg
        self.namer = None
        if cfg.detector == "world":
            self.detector: Detector = WorldDetector()
        else:
            from safediff.reward_server.clip_model import load_clip

            self.detector = Mask2FormerDetector(cfg.weights, device, cfg.test_scale, cfg.max_per_image)
            clip = load_clip(cfg.colour_clip, device, field="evaluation.suite.geneval.colour_clip")
            self.namer = ClipColourNamer(clip)

    def score(self, paths: list[Path], rows: list[dict]) -> list[dict]:
        out = []
        for path, row in zip(paths, rows):
            meta = row.get("meta") or {}
            if meta.get("tag") not in TASKS:
                out.append({})
                continue
            image = load_uint8(path)
            correct, reason = judge(image, keep(self.detector.detect(image), meta["tag"], self.cfg), meta,
                                    self.cfg, self.namer)
            out.append({"geneval_correct": correct, "geneval_reason": reason})
        return out
