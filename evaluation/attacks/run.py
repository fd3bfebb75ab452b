"""`safediff attack --attack NAME [--adapter DIR | --run NAME]`: adversarial prompts (searched once, resumable),
then a `safediff eval` of them on the base model and on the adapter, and their attack success rates.

    <out>/attack.json        the attack's settings; running again with other settings is refused
    <out>/prompts.jsonl      one adversarial prompt per target row, appended as each is found, with its search
                             record (source prompt, loss, curve); a rerun searches only the rows still missing
    <out>/<model>/           the evaluation folder of the adversarial prompts on that model (`base`, or the
                             adapter's `<run>-<folder>`), with asr.json
    <out>/report.md          ASR per model with 95% intervals, and adapter - base paired over prompts

<out> defaults to <run.output_dir>/attacks/<attack>-<concept>. Our adapters train the UNet only, so a text-encoder
attack (ring-a-bell) finds the same prompts whichever model it is judged on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from safediff.common.config import Config, PromptSetConfig, resolve_device_dtype
from safediff.common.errors import UserInputError
from safediff.common.types import EvalRow
from safediff.evaluation import jsonl
from safediff.evaluation.metrics import attack_success, paired_success
from safediff.evaluation.prompt_sets import load_prompt_set
from safediff.evaluation.report import FEW_PROMPTS
from safediff.evaluation.run import evaluate

log = logging.getLogger(__name__)
ATTACKS = ("prompts", "ring-a-bell")
JUDGE_SCORER = {"nudenet": {"nudenet"}, "q16": {"q16"}, "q16_or_nudenet": {"q16", "nudenet"}, "world": {"world"}}


def settings(cfg: Config, name: str) -> dict:
    """What defines the adversarial prompts (attack.json)."""
    attack = cfg.evaluation.attack
    out = {"attack": name, "concept": attack.concept, "targets": attack.targets.model_dump(mode="json"),
           "seed": attack.seed, "model": cfg.model.pretrained}
    if name == "ring-a-bell":
        out["ringabell"] = attack.ringabell.model_dump(mode="json")
    return out


def _check(cfg: Config, name: str, out: Path) -> None:
    if name not in ATTACKS:
        raise UserInputError(f"--attack {name}: unknown attack; known: {', '.join(ATTACKS)}")
    judge, scorers = cfg.evaluation.attack.judge, set(cfg.evaluation.suite.scorers)
    if not JUDGE_SCORER[judge] <= scorers:
        raise UserInputError(f"evaluation.attack.judge: {judge} needs the scorers {sorted(JUDGE_SCORER[judge])} in "
                             f"evaluation.suite.scorers (it has {sorted(scorers)})")
    path, wanted = out / "attack.json", settings(cfg, name)
    if path.is_file() and json.loads(path.read_text()) != wanted:
        saved = json.loads(path.read_text())
        differ = [k for k in wanted if saved.get(k) != wanted[k]]
        raise UserInputError(f"{out} holds an attack made with other settings ({', '.join(differ)}); choose another "
                             "--out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=1))


def _row_record(row: EvalRow, prompt: str, concept: str, **extra) -> dict:
    """A prompts.jsonl line: readable as a prompt set (I2P column names) and keeping the target's settings."""
    record = {"case_number": row.case_number, "prompt": prompt, "evaluation_seed": row.seed,
              "categories": sorted({*row.categories, concept}), "source_prompt": row.prompt, **extra}
    for key, value in (("evaluation_guidance", row.guidance), ("sd_image_width", row.width),
                       ("sd_image_height", row.height)):
        if value is not None:
            record[key] = value
    return record


def _ring_a_bell(cfg: Config):
    from safediff.common.models import load_bundle
    from safediff.evaluation.attacks.ringabell import RingABell

    device, _ = resolve_device_dtype(cfg.run)
    bundle = load_bundle(cfg.model.pretrained, cfg.model.revision)
    attack = RingABell(bundle.tokenizer, bundle.text_encoder.to(device=device, dtype=bundle.text_encoder.dtype),
                       cfg.evaluation.attack.ringabell)
    rab = cfg.evaluation.attack.ringabell
    concept, neutral = (load_prompt_set(s) for s in (rab.concept, rab.neutral))
    try:
        attack.fit_concept([r.prompt for r in concept], [r.prompt for r in neutral])
    except ValueError as err:
        raise UserInputError(f"evaluation.attack.ringabell: {err}") from None
    return attack


def adversarial_prompts(cfg: Config, name: str, out: Path, progress: bool = True) -> Path:
    """<out>/prompts.jsonl complete for every target row (rows already there are kept); returns its path."""
    attack_cfg = cfg.evaluation.attack
    targets = load_prompt_set(attack_cfg.targets, cfg.evaluation.suite.seed)
    path = out / "prompts.jsonl"
    done = {r["case_number"] for r in jsonl.read(path)}
    todo = [(i, r) for i, r in enumerate(targets) if r.case_number not in done]
    if name == "prompts":
        jsonl.append(path, [_row_record(r, r.prompt, attack_cfg.concept) for _, r in todo])
    elif todo:
        attack = _ring_a_bell(cfg)
        for i, row in tqdm(todo, desc=f"{name} search", unit="prompt", disable=not progress):
            found = attack.attack(row.prompt, seed=attack_cfg.seed + i)
            jsonl.append(path, [_row_record(row, found.pop("prompt"), attack_cfg.concept, **found)])
    return path


def model_label(adapter: Path | None) -> str:
    return "base" if adapter is None else f"{Path(adapter).resolve().parent.name}-{Path(adapter).name}"


def run_attack(cfg: Config, name: str, adapter: Path | None = None, out: Path | None = None,
               progress: bool = True) -> Path:
    """Adversarial prompts, their evaluation on the base model (and on `adapter`), ASR; returns <out>."""
    attack_cfg = cfg.evaluation.attack
    out = Path(out) if out else cfg.run.output_dir / "attacks" / f"{name}-{attack_cfg.concept}"
    _check(cfg, name, out)
    prompts = adversarial_prompts(cfg, name, out, progress)
    # only the judge's scorers: other scorers may need what adversarial prompts lack (GenEval's metadata)
    suite = cfg.evaluation.suite.model_copy(update={"prompts": PromptSetConfig(path=prompts),
                                                    "scorers": tuple(sorted(JUDGE_SCORER[attack_cfg.judge]))})
    eval_cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"suite": suite})})
    for model in [None] + ([adapter] if adapter is not None else []):
        folder = evaluate(eval_cfg, model, out / model_label(model), progress=progress)
        records = jsonl.read(folder / "records.jsonl")
        result = attack_success(records, attack_cfg.judge, attack_cfg.concept, suite.bootstrap)
        (folder / "asr.json").write_text(json.dumps({**result, "model": model_label(model)}, indent=1))
    (out / "report.md").write_text(report(out, name, suite.bootstrap))
    return out


def report(out: Path, name: str, resamples: int) -> str:
    """report.md over every model evaluated in <out>: ASR with intervals, and each adapter - base, paired."""
    meta = json.loads((out / "attack.json").read_text())
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/asr.json"))}
    lines = [f"# Attack {name} on {meta['concept']}", "",
             f"Adversarial prompts: `prompts.jsonl` ({len(jsonl.read(out / 'prompts.jsonl'))}); judge: "
             f"{next(iter(results.values()))['judge'] if results else '-'}. ASR = share of attacked prompts with an "
             "image the judge flags; images = share of images flagged; 95% bootstrap intervals over prompts.", "",
             "| model | prompts | ASR (prompts) | ASR (images) |", "|---|---:|---:|---:|"]
    for label, r in results.items():
        p, i = r["asr_prompts"], r["asr_images"]
        few = " (few prompts)" if r["prompts"] < FEW_PROMPTS else ""
        lines.append(f"| {label} | {r['prompts']} | {p['rate']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]{few} | "
                     f"{i['rate']:.3f} [{i['ci_low']:.3f}, {i['ci_high']:.3f}] |")
    base = out / "base" / "records.jsonl"
    for label in (k for k in results if k != "base"):
        judge, concept = results[label]["judge"], results[label]["concept"]
        d = paired_success(jsonl.read(base), jsonl.read(out / label / "records.jsonl"), judge, concept, resamples)
        lines += ["", f"{label} - base, paired over the {d['prompts']} prompts: {d['delta']:+.3f} "
                      f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"]
    lines += ["", "Each model's images, grids and scores: `<model>/report.md`; `safediff eval-compare <out>/base "
              "<out>/<model>` compares them metric by metric."]
    return "\n".join(lines) + "\n"
