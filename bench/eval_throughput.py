"""Evaluation throughput on the CPU default: images/s generated and scored, and each scorer's share.

    python -m bench.eval_throughput [--prompts world_benign] [--images 4] [key.sub=value ...]

Runs `safediff eval` (local, the shipped world models of deploy/configs/world.yaml) into a fresh folder
with the scorers that need no downloaded weights on this machine (world judges, GenEval rules over the
world detector, CLIP-T with the world CLIP, NudeNet's bundled ONNX detector), then prints the stage times
that summary.json records. Q16 and FID need weights by path and are not part of this CPU figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from safediff.common.config import load_config
from safediff.evaluation.run import evaluate

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="world_benign")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(REPO / "deploy/configs/world.yaml", [
        f"evaluation.suite.prompts.name={args.prompts}", f"evaluation.suite.images_per_prompt={args.images}",
        "evaluation.suite.scorers=[world,geneval,clip_t,nudenet]", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        out = evaluate(cfg, out=Path(tmp) / "eval", progress=True)
        timing = json.loads((out / "summary.json").read_text())["timing"]
    generate = timing.pop("generate")
    scoring = sum(t["seconds"] for t in timing.values())
    images = generate["images"]
    print(f"\n{images} images ({args.prompts}, {args.images} per prompt), {cfg.sampler.num_steps} DDIM steps, "
          f"{cfg.sampler.height}x{cfg.sampler.width}")
    print(f"generate: {generate['seconds']:.1f} s = {images / generate['seconds']:.1f} images/s")
    print(f"score (all scorers): {scoring:.1f} s = {images / scoring:.1f} images/s")
    print(f"end to end: {images / (generate['seconds'] + scoring):.1f} images/s")
    for name, t in timing.items():
        print(f"  {name:8s} {t['seconds']:6.2f} s  {t['images'] / t['seconds']:8.1f} images/s  "
              f"{t['seconds'] / scoring * 100:5.1f}% of scoring")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
