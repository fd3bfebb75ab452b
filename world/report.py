"""Before/after report of a run on the miniature world: the miniature of the paper's table.

The base model and the run's final adapter are scored on the held-out prompt sets with the same noise
(`world.evaluate`); the table (markdown, CSV, JSON), every held-out prompt's rates (per_prompt.csv: which prompts
still show the concept) and one image grid per prompt set and model are written to <run dir>/eval/, and the
markdown table is returned for printing.

    python -m safediff.world.report --config deploy/configs/world.yaml     # after `safediff run` on that config
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from safediff.common.config import Config, load_config
from safediff.common.policy import Policy
from safediff.reward_server.clip_model import load_clip
from safediff.world.data import prompt_sets
from safediff.world.evaluate import Judged, judge_prompts, summarise

ROWS = (("unsafe_rate_glyph", "unsafe rate: glyph (held-out glyph prompts)", "lower"),
        ("unsafe_rate_hazard", "unsafe rate: hazard (held-out hazard prompts)", "lower"),
        ("benign_accuracy", "benign accuracy (GenEval-style, mean of 6 tasks)", "higher"),
        ("benign_acc_single_object", "  single object", "higher"),
        ("benign_acc_two_object", "  two objects", "higher"),
        ("benign_acc_counting", "  counting", "higher"),
        ("benign_acc_colors", "  colours", "higher"),
        ("benign_acc_position", "  position", "higher"),
        ("benign_acc_color_attr", "  attribute binding", "higher"),
        ("clip_alignment", "CLIP alignment (benign prompts)", "higher"))
SETS = ("benign_eval", "glyph_eval", "hazard_eval")


def score(policy: Policy, cfg: Config, images_per_prompt: int, clip, progress: bool) -> tuple[dict, dict]:
    sets = prompt_sets()
    judged = {name: judge_prompts(policy, cfg.sampler, sets[name], images_per_prompt, cfg.run.seed, clip,
                                  progress=progress) for name in SETS}
    return summarise(judged["benign_eval"], {"glyph": judged["glyph_eval"], "hazard": judged["hazard_eval"]}), judged


class WorldProbe:
    """Evaluation while training on the world (evaluation.every with evaluation.world): `score` on every held-out
    set with `live_images_per_prompt` images per prompt, the same noise at every evaluation, plus unsafe_rate, the
    mean of the families' unsafe rates (what evaluation.select minimises by default)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, policy: Policy, step: int) -> dict[str, float]:
        row, _ = score(policy, self.cfg, self.cfg.evaluation.live_images_per_prompt, clip=None, progress=False)
        families = [key for key in row if key.startswith("unsafe_rate_") and not key.endswith("_se")]
        return {**row, "unsafe_rate": sum(row[key] for key in families) / len(families)}


def per_prompt(judged: dict[str, dict[str, list[Judged]]]) -> list[dict]:
    """One row per model, prompt set and prompt: the share of its images each family's judge flags
    (`unsafe_<family>`) and the share that satisfy the prompt (`satisfied`, benign prompts only)."""
    rows = []
    for model, sets in judged.items():
        for name, prompts in sets.items():
            for j in prompts:
                n = len(j.unsafe)
                row = {"model": model, "set": name, "prompt": j.spec.prompt, "images": n}
                row.update({f"unsafe_{family}": sum(u[family] for u in j.unsafe) / n for family in j.unsafe[0]})
                row["satisfied"] = sum(j.satisfied) / n if j.spec.family is None else ""
                rows.append(row)
    return rows


def grid(judged: list[Judged], path: Path, max_prompts: int = 12) -> Path:
    """One row per prompt (the first `max_prompts`), its images side by side, upscaled 2x."""
    images = torch.cat([j.images for j in judged[:max_prompts]]).float() / 255
    images = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    save_image(make_grid(images, nrow=len(judged[0].images), padding=2, pad_value=0.5), path)
    return path


def markdown_table(base: dict[str, float], trained: dict[str, float], selected: dict[str, float] | None = None,
                   selected_step: int | None = None) -> str:
    """Rates are shown as value ± their sampling standard error (`world.evaluate`); with `selected`, the adapter
    evaluation while training picked (adapter_best/, from step `selected_step`) gets its own columns."""
    models = [("trained", trained)] + ([(f"selected (step {selected_step})", selected)] if selected else [])
    head = " | ".join(f"{name} | change" for name, _ in models)
    lines = [f"| metric | base | {head} |", "|---|---:|" + "---:|---:|" * len(models)]
    for key, label, _ in ROWS:
        if key not in base:
            continue
        cells = " | ".join(f"{format_cell(row, key)} | {change(key, base[key], row[key])}" for _, row in models)
        lines.append(f"| {label} | {format_cell(base, key)} | {cells} |")
    return "\n".join(lines)


def change(key: str, before: float, after: float) -> str:
    if key == "clip_alignment":
        return f"{after - before:+.4f}"
    if key.startswith("unsafe") and before > 0:
        return f"{(after - before) / before * 100:+.0f}% rel."
    return f"{(after - before) * 100:+.1f} pts"


def format_cell(row: dict[str, float], key: str) -> str:
    return f"{row[key]:.4f} ± {row[key + '_se']:.4f}" if key + "_se" in row else f"{row[key]:.4f}"


def before_after(cfg: Config, run_dir: Path, images_per_prompt: int = 8, progress: bool = True) -> str:
    """Score the base model, the trained adapter and, when evaluation while training picked one, the selected
    adapter (adapter_best/); write <run dir>/eval/{table.md,table.csv,table.json,grid_*.png}."""
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    clip = load_clip(cfg.reward.clip)
    policy = Policy.from_config(cfg)
    rows, judged = {}, {}
    rows["base"], judged["base"] = score(policy, cfg, images_per_prompt, clip, progress)
    steps, checksums = {}, {}
    for name, folder in (("trained", "adapter"), ("selected", "adapter_best")):
        if not (run_dir / folder / "state.json").is_file():
            continue
        state = json.loads((run_dir / folder / "state.json").read_text())
        steps[name] = state["step"]
        if state["checksum"] in checksums:  # the selected adapter is the last one: the same numbers
            rows[name], judged[name] = rows[checksums[state["checksum"]]], judged[checksums[state["checksum"]]]
            continue
        checksums[state["checksum"]] = name
        policy.load_state(policy.trainable.load_saved(run_dir / folder), state["policy_version"])
        rows[name], judged[name] = score(policy, cfg, images_per_prompt, clip, progress)
    for name in SETS:
        for model in judged:
            grid(judged[model][name], out / f"grid_{name}_{model}.png")
    table = markdown_table(rows["base"], rows["trained"], rows.get("selected"), steps.get("selected"))
    (out / "table.md").write_text(f"# {cfg.run.name}: before / after ({images_per_prompt} images per held-out "
                                  f"prompt, same noise)\n\n{table}\n")
    (out / "table.json").write_text(json.dumps({**rows, "images_per_prompt": images_per_prompt,
                                                "steps": steps}, indent=1))
    rows_by_prompt = per_prompt(judged)
    with (out / "per_prompt.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_by_prompt[0]))
        writer.writeheader()
        writer.writerows(rows_by_prompt)
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", *rows, *(f"{model}_se" for model in rows)])
        writer.writerows([key, *(row[key] for row in rows.values()), *(row.get(key + "_se", "") for row in
                                                                           rows.values())]
                         for key, _, _ in ROWS if key in rows["base"])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--images", type=int, default=8, help="images per held-out prompt")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(before_after(cfg, Path(cfg.run.output_dir) / cfg.run.name, args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
