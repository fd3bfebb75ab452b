"""`safediff attack --attack NAME [--adapter DIR | --run NAME]`: adversarial prompts (searched once, resumable),
then a `safediff eval` of them on the base model and on the adapter, and their attack success rates.

    <out>/attack.json        the attack's settings; running again with other settings is refused
    <out>/prompts.jsonl      one adversarial prompt per target row, appended as each is found, with its search
                             record (source prompt, loss, curve); a rerun searches only the rows still missing
    <out>/<model>/           the evaluation folder of the adversarial prompts on that model (`base`, or the
                             adapter's `<run>-<folder>`), with asr.json
    <out>/<model>-no-attack/ the same for the target prompts as they are (the row an attack is measured against;
                             not for `prompts`, whose targets are the attack)
    <out>/report.md          ASR per model with 95% intervals, and adapter - base paired over prompts

<out> defaults to <run.output_dir>/attacks/<attack>-<concept>. Our adapters train the denoiser only, so a
text-encoder attack (ring-a-bell; every model family) finds the same prompts whichever model it is judged on. An
attack on the model itself (inversion; unlearndiff, but not on FLUX.1) searches once per model instead, in
<out>/<model>-search/ (prompts.jsonl; inversion also inversion.safetensors and inversion.json with its loss
curve), from the base model's pictures of the concept: <out>/reference/ (an evaluation folder of
`inversion.reference`, judged too, so one can see the pictures show the concept) for inversion, the base model's
first image of each target prompt (in <out>/base-no-attack/) for unlearndiff.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safediff.common.config import Config, PromptSetConfig, resolve_device_dtype
from safediff.common.errors import UserInputError
from safediff.common.progress import track
from safediff.common.types import EvalRow
from safediff.evaluation import jsonl
from safediff.evaluation.metrics import attack_success, paired_success
from safediff.evaluation.prompt_sets import load_prompt_set
from safediff.evaluation.report import FEW_PROMPTS
from safediff.evaluation.run import evaluate

ATTACKS = ("prompts", "ring-a-bell", "inversion", "unlearndiff")
PER_MODEL = {"inversion", "unlearndiff"}   # attacks that search against each judged model
JUDGE_SCORER = {"nudenet": {"nudenet"}, "q16": {"q16"}, "q16_or_nudenet": {"q16", "nudenet"}, "world": {"world"}}


def settings(cfg: Config, name: str) -> dict:
    """What defines the adversarial prompts (attack.json)."""
    attack = cfg.evaluation.attack
    out = {"attack": name, "concept": attack.concept, "targets": attack.targets.model_dump(mode="json"),
           "seed": attack.seed, "model": cfg.model.pretrained}
    if name == "ring-a-bell":
        out["ringabell"] = attack.ringabell.model_dump(mode="json")
    if name in ("inversion", "unlearndiff"):
        out[name] = getattr(attack, name).model_dump(mode="json")
    return out


def _check(cfg: Config, name: str, out: Path) -> None:
    if name not in ATTACKS:
        raise UserInputError(f"--attack {name}: unknown attack; known: {', '.join(ATTACKS)}")
    if cfg.model.family == "flux" and name == "unlearndiff":
        raise UserInputError("--attack unlearndiff: model.family=flux conditions on T5, whose vocabulary is not "
                             "CLIP's; the token search needs one vocabulary shared by every text encoder (SD 1.x/2.x, "
                             "SD3 without T5)")
    judge, scorers = cfg.evaluation.attack.judge, set(cfg.evaluation.suite.scorers)
    if not JUDGE_SCORER[judge] <= scorers:
        raise UserInputError(f"evaluation.attack.judge: {judge} needs the scorers {sorted(JUDGE_SCORER[judge])} in "
                             f"evaluation.suite.scorers (it has {sorted(scorers)})")
    path, wanted = out / "attack.json", settings(cfg, name)
    saved = json.loads(path.read_text()) if path.is_file() else wanted
    if saved != wanted:
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
    """Ring-A-Bell on the model's CLIP text encoder (for SD3 and FLUX.1, their CLIP-L: redteam/ringabell.py)."""
    from safediff.common.models import load_clip_text_encoder
    from safediff.redteam.ringabell import RingABell

    device, _ = resolve_device_dtype(cfg.run)
    rab = cfg.evaluation.attack.ringabell
    tokenizer, text_encoder = load_clip_text_encoder(cfg.model.pretrained, cfg.model.revision,
                                                     with_projection=cfg.model.family == "sd3")
    attack = RingABell(tokenizer, text_encoder.to(device), rab)
    concept, neutral = (load_prompt_set(getattr(rab, k), where=f"evaluation.attack.ringabell.{k}")
                        for k in ("concept", "neutral"))
    try:
        attack.fit_concept([r.prompt for r in concept], [r.prompt for r in neutral])
    except ValueError as err:
        raise UserInputError(f"evaluation.attack.ringabell: {err}") from None
    return attack


def search_rows(cfg: Config, path: Path, make_search, desc: str, progress: bool) -> Path:
    """`path` (prompts.jsonl) complete for every target row: rows already there are kept, the others appended one
    by one as found, so an interrupted search resumes. `make_search()` is called only when rows are missing and
    returns search(index, row) -> {"prompt": ..., and the search's record}."""
    attack_cfg = cfg.evaluation.attack
    targets = load_prompt_set(attack_cfg.targets, cfg.evaluation.suite.seed, "evaluation.attack.targets")
    done = {r["case_number"] for r in jsonl.read(path)}
    todo = [(i, r) for i, r in enumerate(targets) if r.case_number not in done]
    if todo:
        search = make_search()
        path.parent.mkdir(parents=True, exist_ok=True)
        for i, row in track(todo, desc, "prompt", enabled=progress):
            found = search(i, row)
            jsonl.append(path, [_row_record(row, found.pop("prompt"), attack_cfg.concept, **found)])
    return path


def adversarial_prompts(cfg: Config, name: str, out: Path, progress: bool = True) -> Path:
    """<out>/prompts.jsonl of an attack that serves every model: the targets themselves (`prompts`) or
    Ring-A-Bell's search (seeded seed + row index)."""
    if name == "prompts":
        return search_rows(cfg, out / "prompts.jsonl", lambda: (lambda i, row: {"prompt": row.prompt}), name, False)

    def make_search():
        attack = _ring_a_bell(cfg)
        return lambda i, row: attack.attack(row.prompt, seed=cfg.evaluation.attack.seed + i)
    return search_rows(cfg, out / "prompts.jsonl", make_search, f"{name} search", progress)


def model_label(adapter: Path | None) -> str:
    return "base" if adapter is None else f"{Path(adapter).resolve().parent.name}-{Path(adapter).name}"


def _evaluation_config(cfg: Config, prompts: PromptSetConfig, **suite_fields) -> Config:
    """cfg with the evaluation suite on `prompts` (and `suite_fields`) and only the judge's scorers: other scorers
    may need what adversarial prompts lack (GenEval's metadata)."""
    update = {"prompts": prompts, "scorers": tuple(sorted(JUDGE_SCORER[cfg.evaluation.attack.judge])), **suite_fields}
    suite = cfg.evaluation.suite.model_copy(update=update)
    return cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"suite": suite})})


def concept_pictures(cfg: Config, out: Path, progress: bool) -> torch.Tensor:
    """uint8 [N, 3, H, W] pictures of the concept at the model's size: `inversion.image_dir`, else the base
    model's images of `inversion.reference` (evaluated into <out>/reference)."""
    from safediff.evaluation.fid import image_files
    from safediff.redteam.inversion import images_needed

    inv, sampler = cfg.evaluation.attack.inversion, cfg.sampler
    if inv.image_dir is not None:
        if not Path(inv.image_dir).is_dir() or not image_files(inv.image_dir):
            raise UserInputError(f"evaluation.attack.inversion.image_dir: {inv.image_dir} holds no PNG/JPEG images")
        files = image_files(inv.image_dir)[:inv.images]
    else:
        rows = load_prompt_set(inv.reference, cfg.evaluation.suite.seed, "evaluation.attack.inversion.reference")
        ref = _evaluation_config(cfg, inv.reference, images_per_prompt=images_needed(inv, len(rows)))
        folder = evaluate(ref, None, out / "reference", progress=progress)
        files = [folder / "images" / r["image"] for r in jsonl.read(folder / "records.jsonl")][:inv.images]
    size = (sampler.width, sampler.height)
    pictures = [np.asarray(Image.open(f).convert("RGB").resize(size, Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()


def invert(cfg: Config, adapter: Path | None, out: Path, progress: bool) -> tuple[Path, Path]:
    """The inversion attack against one model: (<search>/prompts.jsonl, <search>/inversion.safetensors),
    reused when already complete."""
    from safediff.common.trainable import trainable_for
    from safediff.evaluation.generate import load_adapter, policy_with
    from safediff.redteam.inversion import ConceptInversion

    attack_cfg, inv = cfg.evaluation.attack, cfg.evaluation.attack.inversion
    search = out / f"{model_label(adapter)}-search"
    prompts, weights = search / "prompts.jsonl", search / "inversion.safetensors"
    if prompts.is_file() and weights.is_file():
        return prompts, weights
    pictures = concept_pictures(cfg, out, progress)
    state, info = load_adapter(adapter, trainable_for(cfg)) if adapter is not None else (None, {})
    attack = ConceptInversion(policy_with(cfg, state, info).bundle, inv, cfg.sampler.guidance_scale)
    inverted = attack.fit(pictures, seed=attack_cfg.seed, progress=progress)
    attack.save(inverted, weights)
    (search / "inversion.json").write_text(json.dumps({"pictures": len(pictures), "curve": inverted.curve}))
    targets = load_prompt_set(attack_cfg.targets, cfg.evaluation.suite.seed, "evaluation.attack.targets")
    prompts.write_text("".join(json.dumps(_row_record(r, inv.prompt.format(inv.token), attack_cfg.concept)) + "\n"
                               for r in targets))
    return prompts, weights


def unlearn(cfg: Config, adapter: Path | None, out: Path, progress: bool) -> Path:
    """The unlearndiff attack against one model: <search>/prompts.jsonl (resumable, `search_rows`). Each
    target's reference picture is the base model's first image of it (<out>/base-no-attack, which `run_attack`
    evaluates first)."""
    from safediff.common.trainable import trainable_for
    from safediff.evaluation.generate import load_adapter, policy_with
    from safediff.evaluation.images import load_uint8
    from safediff.redteam.unlearndiff import UnlearnDiff

    def make_search():
        pictures = {r["case_number"]: out / "base-no-attack" / "images" / r["image"]
                    for r in jsonl.read(out / "base-no-attack" / "records.jsonl") if r["j"] == 0}
        state, info = load_adapter(adapter, trainable_for(cfg)) if adapter is not None else (None, {})
        attack = UnlearnDiff(policy_with(cfg, state, info).bundle, cfg.evaluation.attack.unlearndiff,
                             cfg.sampler.guidance_scale)
        return lambda i, row: attack.attack(row.prompt, load_uint8(pictures[row.case_number]),
                                            seed=cfg.evaluation.attack.seed + i)
    return search_rows(cfg, out / f"{model_label(adapter)}-search" / "prompts.jsonl", make_search,
                       "unlearndiff search", progress)


def judge(cfg: Config, prompts: PromptSetConfig, model: Path | None, folder: Path, progress: bool,
          textual_inversion: Path | None = None) -> dict:
    """`safediff eval` of `prompts` on `model` into `folder`, and its attack success rates (folder/asr.json)."""
    attack_cfg = cfg.evaluation.attack
    eval_cfg = _evaluation_config(cfg, prompts, textual_inversion=textual_inversion)
    evaluate(eval_cfg, model, folder, progress=progress)
    result = {**attack_success(jsonl.read(folder / "records.jsonl"), attack_cfg.judge, attack_cfg.concept,
                               eval_cfg.evaluation.suite.bootstrap), "model": model_label(model)}
    (folder / "asr.json").write_text(json.dumps(result, indent=1))
    return result


def run_attack(cfg: Config, name: str, adapter: Path | None = None, out: Path | None = None,
               progress: bool = True) -> Path:
    """Adversarial prompts, their evaluation on the base model (and on `adapter`), ASR; returns <out>."""
    attack_cfg = cfg.evaluation.attack
    out = Path(out) if out else cfg.run.output_dir / "attacks" / f"{name}-{attack_cfg.concept}"
    _check(cfg, name, out)
    shared = None if name in PER_MODEL else adversarial_prompts(cfg, name, out, progress)
    for model in [None] + ([adapter] if adapter is not None else []):
        label = model_label(model)
        if name != "prompts":
            judge(cfg, attack_cfg.targets, model, out / f"{label}-no-attack", progress)
        prompts, inversion = shared, None
        if name == "inversion":
            prompts, inversion = invert(cfg, model, out, progress)
        elif name == "unlearndiff":
            prompts = unlearn(cfg, model, out, progress)
        judge(cfg, PromptSetConfig(path=prompts), model, out / label, progress, inversion)
    (out / "report.md").write_text(report(out, name, cfg.evaluation.suite.bootstrap))
    return out


def _rates(r: dict | None) -> str:
    if r is None:
        return "| - | -"
    p, i = r["asr_prompts"], r["asr_images"]
    few = " (few prompts)" if r["prompts"] < FEW_PROMPTS else ""
    return (f"| {p['rate']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]{few} "
            f"| {i['rate']:.3f} [{i['ci_low']:.3f}, {i['ci_high']:.3f}]")


def report(out: Path, name: str, resamples: int) -> str:
    """report.md over every model evaluated in <out>: ASR with intervals without and with the attack, and each
    adapter - base, paired over prompts."""
    meta = json.loads((out / "attack.json").read_text())
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/asr.json"))}
    models = [k for k in results if not k.endswith("-no-attack")]
    models = sorted(models, key=lambda k: k != "base")
    judge_name = results[models[0]]["judge"] if models else "-"
    lines = [f"# Attack {name} on {meta['concept']}", "",
             f"Adversarial prompts: `{'<model>-search/' if name in PER_MODEL else ''}prompts.jsonl`; judge: "
             f"{judge_name}. ASR = share of attacked prompts with an image the judge flags (prompts), share of images "
             "flagged (images); 95% bootstrap intervals over prompts. 'No attack' = the target prompts as they are.",
             "", "| model | prompts | no attack: prompts | images | attack: prompts | images |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in models:
        lines.append(f"| {label} | {results[label]['prompts']} {_rates(results.get(label + '-no-attack'))} "
                     f"{_rates(results[label])} |")
    for label in (k for k in models if k != "base"):
        concept = results[label]["concept"]
        d = paired_success(jsonl.read(out / "base" / "records.jsonl"), jsonl.read(out / label / "records.jsonl"),
                           judge_name, concept, resamples)
        lines += ["", f"{label} - base under the attack, paired over the {d['prompts']} prompts: {d['delta']:+.3f} "
                      f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"]
    lines += ["", "Each model's images, grids and scores: `<model>/report.md`; `safediff eval-compare <out>/base "
              "<out>/<model>` compares them metric by metric."]
    return "\n".join(lines) + "\n"
