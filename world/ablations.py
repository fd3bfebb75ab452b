"""The paper's ablations on the miniature world, one command, one table.

    python -m safediff.world.ablations --config deploy/configs/world.yaml [--steps N] [--only main,alpha0] [--jobs 2]
                              [key=value ...]

Each variant is the world config plus a few overrides, trained with the single-process loop (same
method, no cluster) into runs/ablations/<variant>, then scored like `world.report` (held-out prompts,
same noise). The base model is scored once. Writes runs/ablations/ablations.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from safediff.common.config import load_config
from safediff.common.policy import Policy
from safediff.reward_server.clip_model import load_clip
from safediff.runtime.local import train
from safediff.world.report import format_cell, score

VARIANTS: dict[str, tuple[str, ...]] = {
    "main": (),                                                   # the world config: alpha 3, unsafe_only, pooled
    "alpha0": ("reward.alpha=0",),                                # no steering: plain prompt alignment
    "alpha0.5": ("reward.alpha=0.5",),                            # the reference's alpha
    "alpha1": ("reward.alpha=1",),
    "steer_all": ("reward.steer=all",),                           # the reference steers every prompt
    "unsafe_anchor_only": ("reward.safe_anchors=[]",),
    "negative_only": ("reward.prompt_weight=0", "reward.steer=all"),  # z = v_safe: nothing for prompt fidelity
    "no_benign_prompts": ("prompts.sources=[{path: world/prompts/glyph_train.txt, unsafe: true}, "
                          "{path: world/prompts/hazard_train.txt, unsafe: true}]",),
}
COLUMNS = ("unsafe_rate_glyph", "unsafe_rate_hazard", "benign_accuracy", "clip_alignment")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("deploy/configs/world.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--steps", type=int, default=None, help="override run.steps for every variant")
    parser.add_argument("--images", type=int, default=8, help="images per held-out prompt")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, each in its own process "
                        "with 1/jobs of this process's torch threads (the world's small models use 2 cores "
                        "poorly: two 24-step variants as 2 jobs on 2 cores took 14.6 min, about 10 min each one after "
                        "the other)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for every variant")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    common = [f"run.output_dir={args.out}", "evaluation.world=false", *args.overrides] + (
        [f"run.steps={args.steps}"] if args.steps else [])

    base_cfg = load_config(args.config, common)
    rows = {"base": score(Policy.from_config(base_cfg), base_cfg, args.images, load_clip(base_cfg.reward.clip),
                          progress=True)[0]}
    threads = max(1, torch.get_num_threads() // args.jobs)  # this process's share (OMP_NUM_THREADS), split
    jobs = [(args.config, [*common, f"run.name={name}", *VARIANTS[name]], args.images, threads) for name in names]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, *job): name for name, job in zip(names, jobs)}
        for future in as_completed(futures):
            rows[futures[future]] = future.result()
            # after every variant, in the order asked: a long sweep keeps what it finished
            write_tables({k: rows[k] for k in ["base", *names] if k in rows}, args.out)
    print((args.out / "ablations.md").read_text())
    return 0


def run_variant(config: Path, overrides: list[str], images: int, threads: int, clip: bool = True) -> dict[str, float]:
    """Train one variant with the single-process loop and score its final adapter (in a worker process); without
    `clip` the CLIP alignment column is left out (the judges' columns are the same). `train_s`: training's wall
    time."""
    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    result = train(cfg, resume=False)
    train_s = time.perf_counter() - start
    policy = Policy.from_config(cfg)
    policy.load_state(policy.trainable.load_saved(result.run_dir / "adapter"), result.final_version)
    row = score(policy, cfg, images, load_clip(cfg.reward.clip) if clip else None, progress=False)[0]
    return {**row, "train_s": train_s}


def write_tables(rows: dict[str, dict[str, float]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| variant | overrides | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        overrides = "; ".join(VARIANTS.get(name, ("(no training)",))) or "(the world config)"
        cells = [format_cell(row, c) if c in row else "n/a" for c in COLUMNS]
        lines.append(f"| {name} | `{overrides}` | " + " | ".join(cells) + " |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    (out / "ablations.json").write_text(json.dumps(rows, indent=1))
    with (out / "ablations.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", *COLUMNS])
        writer.writerows([name, *(row.get(c) for c in COLUMNS)] for name, row in rows.items())


if __name__ == "__main__":
    raise SystemExit(main())
