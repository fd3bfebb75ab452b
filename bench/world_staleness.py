"""Staleness x objective x seed on the world: what asynchrony costs, and whether the decoupled objective buys it back.

    python -m bench.world_staleness --seeds 0 1 2 [--settings s0_standard s1_standard s1_decoupled ...]
                                    [--out runs/staleness] [--report-only] [key.sub=value ...]

Each setting is the main job (`bench.world_seeds`: Ray runtime, 24 steps, then the before/after table on held-out
prompts) with `cluster.max_staleness` and `grpo.objective` set (`s1_decoupled_masked` also drops the stale terms whose
behaviour policy lies outside the clip range of the proximal one: `grpo.behaviour_max_log_ratio`; `s1_decoupled_tight`
bounds it at a tenth of that; `s1_decoupled_kl` also steers the learning rate by each step's approx_kl:
`grpo.target_kl`), into <out>/<setting>/seed-<S>; runs already there are kept, so a rerun continues. Asynchronous
settings give the rollout actor 1 CPU and the learner 2 (on a 2-core machine they overlap; synchronous steps give each
phase both cores).
Evaluation while training is off (`evaluation.every=0`): it does not change training, and it would share the cores with
it. Writes <out>/table.md and prints it: per seed the relative change of each family's unsafe rate and the benign
accuracy's change in points, each setting's mean ± standard error over the seeds it has, and per asynchronous setting
whether its mean is within one standard error (of the synchronous mean) of the synchronous setting, or better, on all
three metrics (the target of staleness 1 decoupled).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.world_seeds import FAMILIES, REPO, mean_se, run_seed

METRICS = (*FAMILIES, "benign_pts")
ASYNC = ("cluster.cpus_per_rollout_actor=1", "cluster.cpus_per_learner_worker=2")
SETTINGS = {
    "s0_standard": ("cluster.max_staleness=0", "grpo.objective=standard"),
    "s1_standard": ("cluster.max_staleness=1", "grpo.objective=standard", *ASYNC),
    "s1_decoupled": ("cluster.max_staleness=1", "grpo.objective=decoupled", *ASYNC),
    "s1_decoupled_masked": ("cluster.max_staleness=1", "grpo.objective=decoupled",
                            "grpo.behaviour_max_log_ratio=1e-2", *ASYNC),  # the world's clip range
    "s1_decoupled_tight": ("cluster.max_staleness=1", "grpo.objective=decoupled",
                           "grpo.behaviour_max_log_ratio=1e-3", *ASYNC),  # a tenth of the clip range
    "s1_decoupled_kl": ("cluster.max_staleness=1", "grpo.objective=decoupled", "grpo.behaviour_max_log_ratio=1e-2",
                        "grpo.target_kl=1e-3", *ASYNC),  # and the learning rate steered by the step's approx_kl
    "s2_decoupled": ("cluster.max_staleness=2", "grpo.objective=decoupled", *ASYNC),
}
SYNC = "s0_standard"


def load(out: Path, setting: str) -> dict[int, dict]:
    path = out / setting / "results.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def better_or_within_one_se(run: list[dict], sync: list[dict]) -> dict[str, bool]:
    """Per metric: the setting's mean is no worse than the synchronous mean minus one standard error of that mean
    (unsafe changes: lower is better; benign points: higher is better)."""
    out = {}
    for key in METRICS:
        mean, (ref, se) = mean_se([r[key] for r in run])[0], mean_se([r[key] for r in sync])
        out[key] = mean <= ref + se if key in FAMILIES else mean >= ref - se
    return out


def cell(change: dict) -> str:
    return f"{change['glyph']:+.0%}, {change['hazard']:+.0%}, {change['benign_pts']:+.1f}"


def report(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    lines = ["Cells: glyph, hazard (relative change of the held-out unsafe rate), benign accuracy (points); "
             "each seed against its own base.", "",
             f"| setting | {' | '.join(f'seed {s}' for s in seeds)} | mean glyph | mean hazard | mean benign | "
             f"s/step |", "|---|" + "---|" * len(seeds) + "---:|---:|---:|---:|"]
    for setting, per_seed in results.items():
        runs = [per_seed[s]["trained"] for s in seeds if s in per_seed]
        if not runs:
            continue
        means = []
        for key in METRICS:
            mean, se = mean_se([r[key] for r in runs])
            text = f"{mean:+.1f}" if key == "benign_pts" else f"{mean:+.0%}"
            se_text = "" if len(runs) < 2 else (f" ± {se:.1f}" if key == "benign_pts" else f" ± {se:.0%}")
            means.append(text + se_text)
        step = sum(per_seed[s]["s_per_step"] for s in seeds if s in per_seed) / len(runs)
        cells = [cell(per_seed[s]["trained"]) if s in per_seed else "-" for s in seeds]
        lines.append(f"| {setting} | {' | '.join(cells)} | {' | '.join(means)} | {step:.0f} |")
    sync = [results.get(SYNC, {})[s]["trained"] for s in seeds if s in results.get(SYNC, {})]
    if len(sync) >= 2:
        lines.append("")
        for setting, per_seed in results.items():
            runs = [per_seed[s]["trained"] for s in seeds if s in per_seed]
            if setting != SYNC and runs:
                checks = better_or_within_one_se(runs, sync)
                verdict = ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in checks.items())
                lines.append(f"- {setting} within one standard error of {SYNC} or better ({len(runs)} seeds): "
                             f"{verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "staleness")
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs already there")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    out = args.out.resolve()
    results = {setting: load(out, setting) for setting in args.settings}
    for seed in [] if args.report_only else args.seeds:
        for setting in args.settings:  # seed by seed: a stopped table has every setting on the same seeds
            if seed in results[setting]:
                continue
            folder = out / setting
            folder.mkdir(parents=True, exist_ok=True)
            results[setting][seed] = run_seed(seed, folder, [*SETTINGS[setting], "evaluation.every=0",
                                                              *args.overrides])
            (folder / "results.json").write_text(json.dumps(results[setting], indent=1))
            (out / "table.md").write_text(report(results, args.seeds) + "\n")
    table = report(results, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
