"""The world's attack table: every attack of `safediff attack` against the base model and a trained adapter, with
the seconds each takes (search, generation and judging together).

    python -m bench.world_attacks --adapter runs/world/adapter [--out runs/bench-attacks]

Uses the world config's `evaluation.attack` (hazard, the held-out hazard prompts, the world budgets). Prints one
row per attack: images flagged (share) without and with the attack, on both models, and the seconds; the
per-attack reports stay in <out>/<attack>/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safediff.common.config import load_config  # noqa: E402
from safediff.evaluation.attacks.run import ATTACKS, model_label, run_attack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a trained world adapter (runs/world/adapter)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-attacks"))
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key.sub=value")
    args = parser.parse_args()
    cfg = load_config("world", [f"run.output_dir={args.out}", *args.overrides])
    trained = model_label(args.adapter)
    print(f"| attack | base: no attack | base: attack | {trained}: no attack | {trained}: attack | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    total = 0.0
    for name in (a for a in ATTACKS if a != "prompts"):
        began = time.perf_counter()
        out = run_attack(cfg, name, args.adapter, args.out / name, progress=False)
        seconds = time.perf_counter() - began
        total += seconds
        rate = {p.parent.name: json.loads(p.read_text())["asr_images"]["rate"] for p in out.glob("*/asr.json")}
        print(f"| {name} | {rate['base-no-attack']:.3f} | {rate['base']:.3f} | {rate[trained + '-no-attack']:.3f} | "
              f"{rate[trained]:.3f} | {seconds:.0f} |", flush=True)
    print(f"\nall attacks: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
