"""What a person reads: <out>/report.md (the paper's table layout), summary.json, results.csv (one row per
image, every score joined on case_number), grids/<category>.png; and the comparison of two evaluations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from safediff.common.errors import UserInputError
from safediff.evaluation import jsonl
from safediff.evaluation.geneval import TASKS
from safediff.evaluation.images import load_uint8
from safediff.evaluation.lpips_score import LpipsDistance, paired_lpips
from safediff.evaluation.metrics import paired_differences
from safediff.evaluation.nudenet import EXPOSED_CLASSES
from safediff.evaluation.provenance import hashes

GRID_SIDE = 128  # grid cells are resized to this many pixels (nearest for small images)


FEW_PROMPTS = 20  # below this many prompts a bootstrap interval over prompts is marked unreliable


def _pct(entry: dict) -> str:
    few = " (few prompts)" if entry.get("prompts", FEW_PROMPTS) < FEW_PROMPTS else ""
    return f"{entry['rate'] * 100:.1f} [{entry['ci_low'] * 100:.1f}, {entry['ci_high'] * 100:.1f}]{few}"


def _few_prompts_note(table: dict) -> list[str]:
    few = [c for c, e in table.items() if e.get("prompts", FEW_PROMPTS) < FEW_PROMPTS]
    return [f"Intervals marked (few prompts) rest on fewer than {FEW_PROMPTS} prompts ({', '.join(few)}): a "
            "bootstrap over so few prompts understates the uncertainty.", ""] if few else []


def _rate_table(title: str, note: str, table: dict) -> list[str]:
    if all("expected_max" in e for e in table.values()):  # SLD's expected maximum inappropriateness
        lines = [f"### {title}", "", note + " Max. exp.: SLD's expected maximum over 25 prompts (mean ± std of "
                 "10,000 draws).", "", "| category | prompts | rate % [95% CI] | max. exp. % |", "|---|---:|---:|---:|"]
        lines += [f"| {c} | {e['prompts']} | {_pct(e)} | {e['expected_max']['mean'] * 100:.1f} ± "
                  f"{e['expected_max']['std'] * 100:.1f} |" for c, e in table.items()]
    else:
        lines = [f"### {title}", "", note, "", "| category | prompts | rate % [95% CI] |", "|---|---:|---:|"]
        lines += [f"| {c} | {e['prompts']} | {_pct(e)} |" for c, e in table.items()]
    return lines + [""] + _few_prompts_note(table)


def _provenance(sources: dict) -> list[str]:
    """Each scorer's files (sha256 prefix) and the library versions, one line each."""
    lines = ["### Provenance", "", f"- generation: {sources.get('scheduler')}"]
    for name, entry in sources.get("scorers", {}).items():
        files = ", ".join(f"`{Path(h['path']).name}` {h['sha256'][:12]}" for h in hashes(entry)) or "no weight files"
        lines.append(f"- {name}: {files}")
    versions = ", ".join(f"{k} {v}" for k, v in sources.get("libraries", {}).items() if v)
    return lines + [f"- libraries: {versions}", ""]


def markdown(summary: dict, identity: dict, disabled: dict[str, str], sources: dict | None = None) -> str:
    lines = [f"# Evaluation: {identity['set']} ({identity['label']})", "",
             f"- model: `{identity['model']}`; adapter: `{identity.get('adapter') or 'none (base model)'}`"
             + (f" (checksum {identity['checksum'][:12]}, step {identity.get('step')})" if identity.get("checksum")
                else ""),
             f"- {summary['prompts']} prompts x {identity['images_per_prompt']} images = {summary['images']} images; "
             f"{identity.get('scheduler', 'DDIMScheduler')} {identity['num_steps']} steps"
             + (f", eta {identity['eta']}" if identity.get("scheduler", "DDIMScheduler") == "DDIMScheduler" else "")
             + ("; image j of a row: the j-th draw of one generator seeded row seed"
                if identity.get("seeding") == "one_generator" else "; image j of a row uses seed row seed + j")
             + (f" (every row seed {identity['fixed_seed']})" if identity.get("fixed_seed") is not None else "")
             + (f"; protocol {identity['protocol']}" if identity.get("protocol") else ""), ""]
    for field, change in (identity.get("overridden") or {}).items():
        lines.append(f"- **differs from protocol {identity['protocol']}**: {field} = {change['used']!r} "
                     f"(protocol: {change['protocol']!r})")
    for name, reason in disabled.items():
        lines.append(f"- **{name} disabled**: {reason}")
    if disabled:
        lines.append("")
    if "inappropriate_q16" in summary:
        lines += _rate_table("Inappropriate rate, Q16 only", "The SafeDiffusion-R1 tables' protocol.",
                             summary["inappropriate_q16"])
    if "inappropriate_q16_or_nudenet" in summary:
        lines += _rate_table("Inappropriate rate, Q16 or NudeNet", "The I2P / SLD protocol.",
                             summary["inappropriate_q16_or_nudenet"])
    if "nudenet_classes" in summary:
        counts = summary["nudenet_classes"]
        lines += ["### NudeNet exposed classes (images with the class, score > 0.6)", "",
                  "| " + " | ".join(c.removesuffix("_EXPOSED") for c in EXPOSED_CLASSES) + " | total |",
                  "|" + "---:|" * (len(EXPOSED_CLASSES) + 1),
                  "| " + " | ".join(str(counts[c]) for c in EXPOSED_CLASSES) + f" | {counts['total']} |", "",
                  f"Images with any exposed class: {_pct(summary['nudenet_rate'])} %", ""]
    if summary.get("geneval"):
        g = summary["geneval"]
        tasks = [t for t in TASKS if t in g]
        few = " (few prompts)" if g["prompts"] < FEW_PROMPTS else ""
        lines += ["### GenEval (share of correct images per task; overall = mean of tasks)", "",
                  "| " + " | ".join(tasks) + " | overall [95% CI] |", "|" + "---:|" * (len(tasks) + 1),
                  "| " + " | ".join(f"{g[t]:.4f}" for t in tasks)
                  + f" | {g['overall']:.4f} [{g['overall_ci_low']:.4f}, {g['overall_ci_high']:.4f}]{few} |", "",
                  f"Correct images: {g['correct_images'] * 100:.1f} %; correct prompts (at least one correct "
                  f"image): {g['correct_prompts'] * 100:.1f} % of {g['prompts']} prompts.", ""]
    if summary.get("world_unsafe"):
        lines += _rate_table("Miniature world: unsafe rate per family", "Pixel judges (world/judges.py).",
                             summary["world_unsafe"])
    if "clip_t" in summary:
        c = summary["clip_t"]
        lines += [f"### CLIP-T: {c['rate']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]", ""]
    if "fid" in summary:
        f = summary["fid"]
        lines += [f"### FID: {f['fid']:.2f}; KID: {f['kid']:.5f} ({f['fid_generated_images']} generated vs "
                  f"{f['fid_real_images']} real; clean-fid, clean mode)", ""]
    if sources:
        lines += _provenance(sources)
    lines += ["Grids: `grids/<category>.png`; per-image scores: `results.csv`; numbers: `summary.json`."]
    return "\n".join(lines) + "\n"


def write_results_csv(records: list[dict], path: Path) -> None:
    skip = {"meta"}
    fields = list(dict.fromkeys(k for r in records for k in r if k not in skip))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                             for k, v in r.items() if k not in skip})


def write_grids(records: list[dict], out: Path, per_category: int) -> list[Path]:
    """grids/<category>.png: the first `per_category` images of each category's prompts."""
    by_category: dict[str, list[dict]] = {}
    for r in records:
        for c in r.get("categories") or ["all"]:
            by_category.setdefault(c, []).append(r)
    (out / "grids").mkdir(exist_ok=True)
    paths = []
    for category, rows in by_category.items():
        images = [load_uint8(out / "images" / r["image"]).float().unsqueeze(0) / 255 for r in rows[:per_category]]
        cells = torch.cat([torch.nn.functional.interpolate(i, size=(GRID_SIDE, GRID_SIDE), mode="nearest")
                           for i in images])
        path = out / "grids" / f"{''.join(ch if ch.isalnum() else '_' for ch in category)}.png"
        save_image(make_grid(cells, nrow=min(8, len(cells)), padding=2, pad_value=1.0), path)
        paths.append(path)
    return paths


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def compare(first: Path, second: Path, out: Path, resamples: int = 1000, lpips: LpipsDistance | None = None) -> str:
    """comparison.md / .json: every number of the two summaries side by side with second - first, for the
    per-image metrics the paired difference with its 95% interval over prompts (`metrics.paired_differences`),
    and with `lpips` the LPIPS between the two evaluations' images of each prompt and seed."""
    for d in (first, second):
        if not (Path(d) / "summary.json").is_file():
            raise UserInputError(f"{d}: no summary.json (not a finished `safediff eval` folder)")
    a, b = (json.loads((Path(d) / "summary.json").read_text()) for d in (first, second))
    if a["identity"]["set"] != b["identity"]["set"]:
        raise UserInputError(f"{first} evaluates {a['identity']['set']!r} and {second} {b['identity']['set']!r}: "
                             "compare evaluations of one prompt set")
    fa, fb = flatten(a["metrics"]), flatten(b["metrics"])
    skip = (".ci_low", ".ci_high", "_ci_low", "_ci_high", ".prompts", ".sample")
    keys = [k for k in fa if k in fb and not k.endswith(skip)]
    rows = [{"metric": k, "first": fa[k], "second": fb[k], "delta": fb[k] - fa[k]} for k in keys]
    lines = [f"# Comparison: {a['identity']['label']} -> {b['identity']['label']} ({a['identity']['set']})", "",
             f"first: `{first}`; second: `{second}`", "",
             f"| metric | {a['identity']['label']} | {b['identity']['label']} | delta |", "|---|---:|---:|---:|"]
    lines += [f"| {r['metric']} | {r['first']:.4f} | {r['second']:.4f} | {r['delta']:+.4f} |" for r in rows]
    paired, distance = {}, None
    have_records = all((Path(d) / "records.jsonl").is_file() for d in (first, second))
    if lpips is not None and not have_records:
        raise UserInputError(f"{first} vs {second}: LPIPS pairs images through records.jsonl, which one of them "
                             "lacks (written by `safediff eval` since it pairs records)")
    if have_records:
        records = [jsonl.read(Path(d) / "records.jsonl") for d in (first, second)]
        try:
            paired = paired_differences(*records, resamples)
        except ValueError as err:
            raise UserInputError(f"{first} vs {second}: {err}") from None
        if lpips is not None:
            distance = paired_lpips(Path(first), Path(second), *records, lpips, resamples)
    if paired:
        lines += ["", "Paired differences (second - first), each prompt its own control (same prompts and seeds); "
                  "95% interval from a bootstrap over prompts:", "",
                  "| metric | prompts | delta [95% CI] |", "|---|---:|---:|"]
        lines += [f"| {name} | {p['prompts']} | {p['delta']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
                  f"{' (few prompts)' if p['prompts'] < FEW_PROMPTS else ''} |" for name, p in paired.items()]
    if distance:
        lines += ["", f"LPIPS ({distance['net']}, {distance['resize']} resize): "
                  f"{distance['lpips']:.4f} [{distance['ci_low']:.4f}, {distance['ci_high']:.4f}] over "
                  f"{distance['prompts']} prompts ({distance['images']} image pairs)"
                  f"{' (few prompts)' if distance['prompts'] < FEW_PROMPTS else ''}"]
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps({"first": str(first), "second": str(second), "rows": rows,
                                                     "paired": paired, "lpips": distance}, indent=1))
    return text
