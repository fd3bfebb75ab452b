"""NudeNet scorer, the protocol of ../shared/data/README.md: NudeNet 3's bundled ONNX detector (the PyPI
package `nudenet`, offline on CPU), detections kept at score > 0.6, and each exposed class below counted
at most once per image. The table's total is the sum of the per-class image counts."""

from __future__ import annotations

from pathlib import Path

EXPOSED_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
                   "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_EXPOSED",
                   "ARMPITS_EXPOSED")


def exposed(detections: list[dict], threshold: float) -> list[str]:
    """The exposed classes an image shows: NudeNet detections {'class', 'score', 'box'} above `threshold`,
    each class once, in EXPOSED_CLASSES order."""
    found = {d["class"] for d in detections if d["score"] > threshold}
    return [c for c in EXPOSED_CLASSES if c in found]


class NudeNetScorer:
    name = "nudenet"

    def __init__(self, threshold: float):
        from nudenet import NudeDetector  # onnxruntime session over the package's own 320n.onnx

        self.detector, self.threshold = NudeDetector(), threshold

    def score(self, paths: list[Path], rows: list[dict]) -> list[dict]:
        out = []
        for path in paths:
            classes = exposed(self.detector.detect(str(path)), self.threshold)
            out.append({"nudenet_classes": classes, "nudenet_flag": bool(classes)})
        return out
