"""The red-teaming table: the world trained by default and with red-teaming in the loop (the same 24 steps), over
seeds, then every searching attack against the base model and each adapter, with each run's held-out table.

    python -m bench.world_redteam --seeds 0 1 2 [--recipe redteam|ontop] [--out runs/redteam]
        [--device cuda --parallel 6]

Trains runs named {default,<recipe>}-s<seed> into <out>/train (each skipped when its adapter exists;
`--parallel N` runs N trainings at once against one Ray cluster), then runs `safediff attack` for every adapter into
<out>/attacks/<attack> (the base model and Ring-A-Bell's shared search are evaluated once), and writes
<out>/table.md (table-<recipe>.md for another recipe; also printed) and results.json (results-<recipe>.json): images
flagged per attack for the base model and each arm (mean over seeds, and every seed's value), the held-out unsafe
rates and benign accuracy of each arm, and the seconds each phase took. Red-teaming adds two adversarial sources to
the world's three: UnlearnDiff in the loop on the hazard training prompts, refreshed every 4 steps, 8 prompts each,
at the world's attack budget; and Ring-A-Bell's prompts for the same training prompts, searched once into
<out>/ringabell-train (model-agnostic: the text encoder never trains), with its own seeds. The recipes differ in
where the adversarial groups come from:
- `redteam`: each adversarial source at half a source's weight, so they take a quarter of the step's 8 groups from
  the ordinary sources;
- `ontop`: 12 groups a step, each adversarial source at weight 0.75, so the ordinary sources keep their 8 groups on
  average and the adversarial ones add 4; 3 optimiser steps a step instead of 2, so every minibatch holds 32
  samples as by default and an ordinary sample weighs as much in the gradient as it does there (1.5x the compute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safediff.common.config import load_config  # noqa: E402
from safediff.evaluation.attacks.run import ATTACKS, adversarial_prompts, model_label, run_attack  # noqa: E402

ADVERSARIAL = ("prompts.adversarial.targets=pkg:world/prompts/hazard_train.txt", "prompts.adversarial.every=4",
               "prompts.adversarial.prompts_per_refresh=8", "prompts.adversarial.unlearndiff.timesteps=10",
               "prompts.adversarial.unlearndiff.iterations=10")
# recipe -> (each adversarial source's weight, further overrides)
RECIPES = {"redteam": (0.5, ()),
           "ontop": (0.75, ("grpo.prompts_per_step=12", "grpo.updates_per_step=3"))}
RINGABELL_SEED = 1000  # the training source's searches: seeds apart from the held-out attack's (0 + row)
# On one GPU every actor of every parallel run shares the card (6 runs x 4 actors x 0.04 <= 1) and 1.75 CPUs a run.
CUDA = ("run.device=cuda", "run.dtype=float32", "cluster.gpus_per_rollout_actor=0.04",
        "cluster.gpus_per_reward_actor=0.04", "cluster.gpus_per_learner_worker=0.04",
        "cluster.gpus_per_attack_actor=0.04", "cluster.cpus_per_rollout_actor=0.5",
        "cluster.cpus_per_reward_actor=0.25", "cluster.cpus_per_learner_worker=0.5",
        "cluster.cpus_per_attack_actor=0.5")
HELD_OUT = ("unsafe_rate_glyph", "unsafe_rate_hazard", "benign_accuracy")


def ringabell_source(out: Path, device: tuple[str, ...], weight: float) -> str:
    """The red-teamed arm's prompt sources: the world's three and Ring-A-Bell's prompts for the hazard training
    prompts (searched once into <out>/ringabell-train, resumable), labelled unsafe, at `weight`."""
    cfg = load_config("world", ["evaluation.attack.targets={name: world_concept_hazard}",
                                f"evaluation.attack.seed={RINGABELL_SEED}", *device])
    found = adversarial_prompts(cfg, "ring-a-bell", out / "ringabell-train", progress=False)
    world = load_config("world").prompts.sources
    sources = [{"path": str(s.path), "unsafe": s.unsafe} for s in world] + \
        [{"path": str(found.resolve()), "unsafe": True, "weight": weight}]
    return "prompts.sources=" + json.dumps(sources)


def train_all(runs: dict[str, Path], seeds: dict[str, int], arms: dict[str, tuple[str, ...]],
              device: tuple[str, ...], parallel: int, address: str | None) -> None:
    """`safediff run --config world` for every run whose adapter is missing, `parallel` at a time."""
    todo = [name for name, folder in runs.items() if not (folder / "adapter" / "state.json").is_file()]
    active: list[tuple[str, subprocess.Popen]] = []
    while todo or active:
        while todo and len(active) < parallel:
            name = todo.pop(0)
            arm = name.split("-s")[0]
            command = [sys.executable, "-m", "safediff.cli", "run", "--config", "world", "--fresh",
                       *(["--address", address] if address else []), f"run.seed={seeds[name]}", f"run.name={name}",
                       f"run.output_dir={runs[name].parent}", *arms[arm], *device]
            runs[name].mkdir(parents=True, exist_ok=True)
            log = (runs[name].parent / f"{name}.log").open("w")
            active.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
            print(f"training {name}", flush=True)
        time.sleep(2)
        for name, proc in list(active):
            if proc.poll() is not None:
                active.remove((name, proc))
                if proc.returncode:
                    tail = (runs[name].parent / f"{name}.log").read_text()[-3000:]
                    raise RuntimeError(f"training {name} failed ({proc.returncode}):\n{tail}")
                print(f"trained {name}", flush=True)


def flagged(out: Path, label: str) -> float:
    return json.loads((out / label / "asr.json").read_text())["asr_images"]["rate"]


def mean_cell(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="redteam", help="the red-teamed arm (above)")
    parser.add_argument("--out", type=Path, default=Path("runs/redteam"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="trainings at once (one Ray cluster)")
    parser.add_argument("--attacks", nargs="+", default=[a for a in ATTACKS if a != "prompts"])
    parser.add_argument("overrides", nargs="*", help="extra world config overrides (training and attacks), key=value")
    args = parser.parse_args()
    device = (*(CUDA if args.device == "cuda" else ()), *args.overrides)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    weight, recipe = RECIPES[args.recipe]
    redteam = (*ADVERSARIAL, f"prompts.adversarial.weight={weight}", *recipe,
               ringabell_source(args.out, device, weight))
    arms = {args.recipe: redteam, "default": ()}  # the longer one first
    seconds["ringabell_source"] = time.perf_counter() - began
    runs = {f"{arm}-s{seed}": args.out / "train" / f"{arm}-s{seed}" for arm in arms for seed in args.seeds}
    seeds = {name: int(name.rsplit("-s", 1)[1]) for name in runs}
    began = time.perf_counter()
    address = None
    if args.parallel > 1:
        import ray

        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        address = ray.get_runtime_context().gcs_address
    train_all(runs, seeds, arms, device, args.parallel, address)
    seconds["train"] = time.perf_counter() - began
    if address:
        ray.shutdown()

    cfg = load_config("world", [f"run.output_dir={args.out}", *device])
    tables = {name: json.loads((folder / "eval" / "table.json").read_text()) for name, folder in runs.items()}
    held = {arm: {key: [tables[f"{arm}-s{s}"]["trained"][key] for s in args.seeds] for key in HELD_OUT} for arm in arms}
    held["base"] = {key: [tables[f"default-s{s}"]["base"][key] for s in args.seeds] for key in HELD_OUT}
    rates: dict[str, dict[str, list[float]]] = {}
    table = report(args, rates, held, seconds)
    for attack in args.attacks:
        began = time.perf_counter()
        out = args.out / "attacks" / attack
        rates[attack] = {}
        for name, folder in runs.items():
            adapter, arm = folder / "adapter", name.split("-s")[0]
            run_attack(cfg, attack, adapter, out, progress=False)
            rates[attack].setdefault(arm, []).append(flagged(out, model_label(adapter)))
            rates[attack].setdefault(f"{arm}-no-attack", []).append(flagged(out, model_label(adapter) + "-no-attack"))
        rates[attack]["base"] = [flagged(out, "base")]
        rates[attack]["base-no-attack"] = [flagged(out, "base-no-attack")]
        seconds[attack] = time.perf_counter() - began
        table = report(args, rates, held, seconds)
    print(table)


def report(args, rates: dict, held: dict, seconds: dict) -> str:
    """<out>/table[-<recipe>].md and results[-<recipe>].json with what is measured so far (after every phase); returns
    the table."""
    lines = [f"Images flagged by the hazard judge (held-out hazard targets); mean over seeds {args.seeds} "
             "(each seed's value; the base model's attacks are one search).", "",
             f"| attack | base | default training | red-teamed training ({args.recipe}) |", "|---|---:|---:|---:|"]
    if rates:
        plain = next(iter(rates.values()))
        lines.append(f"| no attack | {mean_cell(plain['base-no-attack'])} | {mean_cell(plain['default-no-attack'])} | "
                     f"{mean_cell(plain[f'{args.recipe}-no-attack'])} |")
    for attack, r in rates.items():
        lines.append(f"| {attack} | {mean_cell(r['base'])} | {mean_cell(r['default'])} | {mean_cell(r[args.recipe])} |")
    lines += ["", "| held-out (world eval, 8 images per prompt, each run's seed) | base | default training | "
              f"red-teamed training ({args.recipe}) |", "|---|---:|---:|---:|"]
    lines += [f"| {key} | {mean_cell(held['base'][key])} | {mean_cell(held['default'][key])} | "
              f"{mean_cell(held[args.recipe][key])} |" for key in HELD_OUT]
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    suffix = "" if args.recipe == "redteam" else f"-{args.recipe}"
    table = "\n".join(lines) + "\n"
    (args.out / f"table{suffix}.md").write_text(table)
    (args.out / f"results{suffix}.json").write_text(json.dumps({
        "attacks": rates, "held_out": held, "seconds": seconds, "seeds": args.seeds, "recipe": args.recipe,
        "device": args.device}, indent=1))
    return table


if __name__ == "__main__":
    main()
