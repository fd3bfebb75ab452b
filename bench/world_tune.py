"""Tuning on the world over seeds: candidate settings x seeds, trained with the single-process loop.

    python -m bench.world_tune [key.sub=value ...] --seeds 0 1 2 --jobs 2 [--images 8] [--out runs/tune] \
        --setting default --setting lr1e-2 optim.lr=1e-2

Each `--setting NAME [key.sub=value ...]` is the world config plus the common overrides (which come before the
flags: a `--setting` takes every word after it) and its own. Every (setting, seed) is trained like a
`safediff.world.ablations` variant: the single-process loop, the same method as the Ray runtime's synchronous
default, at about half its wall time per run on 2 cores when two run at a time. Its final adapter is scored on the
held-out sets, without CLIP (the judges only), against the base model scored with the same seed's noise, and its
training's wall time kept (runs share the cores, so compare it only within one invocation). After
each run <out>/tune.md and <out>/results.json are rewritten: per setting and seed the unsafe rates' relative change
and the benign accuracy's change in points, their mean ± standard error over seeds, and how many of the project's
five targets the mean meets; a rerun skips the (name, seed) runs already there. Tuning reads only the held-out
lists and the training prompts; the project's numbers are also checked on prompts it has never seen.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from bench.world_seeds import REPO, changes, mean_cells, targets
from safediff.common.config import load_config
from safediff.common.policy import Policy
from safediff.world.ablations import run_variant
from safediff.world.report import score


def report(settings: dict[str, list[str]], results: dict[str, dict], seeds: list[int]) -> str:
    lines = ["| setting | overrides | " + " | ".join(f"seed {s}: glyph, hazard, benign" for s in seeds)
             + " | mean glyph | mean hazard | mean benign (pts) | targets met | training (min per run) |",
             "|---|---|" + "---|" * len(seeds) + "---:|---:|---:|---|---:|"]
    for name, overrides in settings.items():
        per_seed = [changes({"base": results[f"base@{s}"], "run": results[f"{name}@{s}"]}, "run")
                    if f"{name}@{s}" in results else None for s in seeds]
        cells = [f"{c['glyph']:+.0%}, {c['hazard']:+.0%}, {c['benign_pts']:+.1f}" if c else "..." for c in per_seed]
        done = [c for c in per_seed if c]
        minutes = [results[f"{name}@{s}"]["train_s"] / 60 for s in seeds if "train_s" in results.get(f"{name}@{s}", {})]
        summary = mean_cells(done) + [f"{sum(targets(done).values())}/5"] if done else ["..."] * 4
        summary.append(f"{sum(minutes) / len(minutes):.1f}" if minutes else "...")
        lines.append(f"| {name} | `{' '.join(overrides) or '(the config)'}` | " + " | ".join(cells + summary) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "deploy" / "configs" / "world.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"),
                        help="a candidate: its name, then its config overrides")
    parser.add_argument("--images", type=int, default=8, help="images per held-out prompt")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, each with 1/jobs of the threads")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for every setting")
    args = parser.parse_args()
    settings = {name: overrides for name, *overrides in args.setting}
    if len(settings) != len(args.setting):
        parser.error("two --setting share a name")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    common = [f"run.output_dir={args.out.resolve()}", "evaluation.world=false", "evaluation.every=0", *args.overrides]

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))
        (args.out / "tune.md").write_text(report(settings, results, args.seeds) + "\n")

    for seed in args.seeds:  # the base model under each seed's evaluation noise
        if f"base@{seed}" not in results:
            cfg = load_config(args.config, [*common, f"run.seed={seed}"])
            results[f"base@{seed}"] = score(Policy.from_config(cfg), cfg, args.images, None, progress=True)[0]
            save()
    threads = max(1, torch.get_num_threads() // args.jobs)
    jobs = {f"{name}@{seed}": [*common, *overrides, f"run.seed={seed}", f"run.name={name}-seed{seed}"]
            for seed in args.seeds for name, overrides in settings.items() if f"{name}@{seed}" not in results}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, args.config, overrides, args.images, threads, False): key
                   for key, overrides in jobs.items()}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            save()
            print(report(settings, results, args.seeds), flush=True)
    if not jobs:  # every run already measured: the table of these settings, from results.json
        save()
        print(report(settings, results, args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
