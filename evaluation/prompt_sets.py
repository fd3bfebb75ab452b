"""Evaluation prompt sets: rows with their own case number, seed and (when the protocol fixes them)
guidance and image size.

Built-in sets are the files in evaluation/data (sources and licences in its README) and the miniature
world's held-out prompts; a user's CSV / JSONL / TXT file is read with the same column names as I2P
unless `columns` maps them. A row the protocol cannot use (a seed that is not an integer, a repeated
case number) is an error naming the file and the line: an evaluation must not silently score fewer rows
than it says. An empty prompt is kept (I2P has one: case 2260, sampled unconditionally) with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safediff.common.assets import resolve
from safediff.common.config import PromptSetConfig
from safediff.common.errors import UserInputError
from safediff.common.types import EvalRow

log = logging.getLogger(__name__)
DATA = Path(__file__).parent / "data"

# Our field -> the column it is read from when `columns` does not say (the I2P file's names).
DEFAULT_COLUMNS = {"prompt": "prompt", "case_number": "case_number", "seed": "evaluation_seed",
                   "guidance": "evaluation_guidance", "width": "sd_image_width", "height": "sd_image_height",
                   "categories": "categories"}


class PromptSetError(UserInputError, ValueError):
    """A prompt set that cannot be evaluated; the message names the file and the rows."""


@dataclass(frozen=True)
class Builtin:
    file: str
    categories: tuple[str, ...] = ()    # for sets whose rows carry none
    ringabell: bool = False             # prompt = the row's concept fields joined


# What each set is, so none is taken for what it is not: I2P and its subsets are prompts that *name* unsafe
# content (UnlearnDiff attacks them as its targets; they are not adversarial); the Ring-A-Bell concept sets are the
# paired prompts its concept vector is computed from; `ringabell_violence_attack` is an attack set (Ring-A-Bell's
# published adversarial prompts, searched against SD v1.4's text encoder, used transferred).
BUILTIN: dict[str, Builtin] = {
    "i2p": Builtin("i2p_4703.csv"),
    "i2p_nudity": Builtin("unlearndiff_nudity_142.csv"),
    "i2p_violence": Builtin("unlearndiff_violence_756.csv"),
    "i2p_illegal": Builtin("unlearndiff_illegal_727.csv"),
    "ringabell_concept_nudity": Builtin("ringabell_nudity_prompts_50.csv", ("sexual",), ringabell=True),
    "ringabell_concept_no_nudity": Builtin("ringabell_no_nudity_prompts_50.csv", ("neutral",)),
    "ringabell_violence_attack": Builtin("ringabell_violence_adv_250.csv", ("violence",)),
    "coco": Builtin("coco_3k_val.csv", ("coco",)),
    "geneval": Builtin("evaluation_metadata.jsonl"),
}
RENAMED = {"unlearndiff_violence": "i2p_violence", "unlearndiff_illegal": "i2p_illegal",
           "ringabell_nudity": "ringabell_concept_nudity", "ringabell_no_nudity": "ringabell_concept_no_nudity",
           "ringabell_violence": "ringabell_violence_attack"}
# the world's concept-vector pairs: name -> (concept or neutral, family)
WORLD_PAIRS = {f"world_{kind}_{family}": (kind, family) for family in ("glyph", "hazard")
               for kind in ("concept", "neutral")}
WORLD_SETS = ("world_glyph", "world_hazard", "world_benign", *WORLD_PAIRS)
SET_NAMES = (*BUILTIN, *WORLD_SETS)


def load_prompt_set(cfg: PromptSetConfig, default_seed: int = 0,
                    where: str = "evaluation.suite.prompts") -> list[EvalRow]:
    """The rows of a set, in file order (first `cfg.limit`); a row without a seed gets default_seed + index. `where`:
    the config field the set came from, named in errors."""
    if cfg.name is not None:
        if cfg.name in WORLD_PAIRS:
            rows = world_concept_rows(*WORLD_PAIRS[cfg.name], default_seed)
        elif cfg.name in WORLD_SETS:
            rows = world_rows(cfg.name.removeprefix("world_"), default_seed)
        elif cfg.name in BUILTIN:
            spec = BUILTIN[cfg.name]
            rows = read_rows(DATA / spec.file, cfg.columns, default_seed, spec.categories, spec.ringabell, where)
        elif cfg.name in RENAMED:
            raise PromptSetError(f"{where}.name: the set {cfg.name!r} is now called "
                                 f"{RENAMED[cfg.name]!r} (named for what it is)")
        else:
            raise PromptSetError(f"{where}.name: unknown set {cfg.name!r}; "
                                 f"built-in sets: {', '.join(SET_NAMES)}")
    else:
        rows = read_rows(cfg.path, cfg.columns, default_seed, where=where)
    return rows[:cfg.limit] if cfg.limit else rows


def read_rows(path: Path, columns: dict[str, str], default_seed: int, categories: tuple[str, ...] = (),
              ringabell: bool = False, where: str = "evaluation.suite.prompts") -> list[EvalRow]:
    records = _records(Path(resolve(path)))
    names = {f: columns.get(f, default) for f, default in DEFAULT_COLUMNS.items()}
    if not ringabell and records and names["prompt"] not in records[0][1]:
        raise PromptSetError(f"{path}: no column {names['prompt']!r} for the prompt (map it with "
                             f"{where}.columns.prompt)")
    rows, problems, seen = [], [], {}
    for index, (line, record) in enumerate(records):
        try:
            row = _row(record, names, index, default_seed, categories, ringabell)
        except (ValueError, TypeError) as err:
            problems.append(f"line {line}: {err}")
            continue
        if row.case_number in seen:
            problems.append(f"line {line}: case_number {row.case_number!r} repeats line {seen[row.case_number]}")
        seen[row.case_number] = line
        rows.append(row)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} rows in all)" if len(problems) > 5 else "")
        raise PromptSetError(f"{path}: {shown}")
    if not rows:
        raise PromptSetError(f"{path}: no rows")
    empty = [r.case_number for r in rows if not r.prompt]
    if empty:
        log.warning("%s: %d rows with an empty prompt (case numbers %s) are sampled unconditionally",
                    path, len(empty), ", ".join(empty[:5]))
    return rows


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a .csv (header line 1), .jsonl or .txt file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSetError(f"prompt set {path}: cannot read ({err})") from err
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # not splitlines: prompts hold \x1e etc.
        return [(reader.line_num, record) for record in reader]
    if path.suffix == ".jsonl":
        out = []
        for line, raw in enumerate(text.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise PromptSetError(f"{path}: line {line}: not JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise PromptSetError(f"{path}: line {line}: each line must be a JSON object")
            out.append((line, record))
        return out
    if path.suffix == ".txt":
        return [(line, {"prompt": raw.strip()}) for line, raw in enumerate(text.split("\n"), start=1)
                if raw.strip()]
    raise PromptSetError(f"prompt set {path}: unsupported file type {path.suffix!r} (use .csv, .jsonl or .txt)")


def _row(record: dict[str, Any], names: dict[str, str], index: int, default_seed: int,
         categories: tuple[str, ...], ringabell: bool) -> EvalRow:
    def get(f: str) -> Any:
        value = record.get(names[f])
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    if ringabell:
        prompt = " ".join(str(record[k]).strip() for k in ("nudity", "people", "clothes", "location")
                          if record.get(k) and str(record[k]).strip() != "None")
    else:
        prompt = str(get("prompt") or "").strip()
    seed = get("seed")
    cats = get("categories")
    found = tuple(c.strip() for c in cats.split(",") if c.strip()) if isinstance(cats, str) else tuple(cats or ())
    meta = {k: record[k] for k in ("tag", "include", "exclude") if k in record}
    if "tag" in meta and not found:
        found = (meta["tag"],)  # GenEval: the task is the category
    case = get("case_number")
    return EvalRow(
        case_number=str(case if case is not None else index).strip(), prompt=prompt,
        seed=_integer(seed, "seed") if seed is not None else default_seed + index,
        categories=found or categories,
        guidance=float(get("guidance")) if get("guidance") is not None else None,
        width=_integer(get("width"), "width") if get("width") is not None else None,
        height=_integer(get("height"), "height") if get("height") is not None else None,
        meta=meta)


def _integer(value: Any, what: str) -> int:
    number = float(value)
    if number != int(number) or number < 0:
        raise ValueError(f"{what} {value!r} is not a non-negative integer")
    return int(number)


def world_rows(family: str, default_seed: int) -> list[EvalRow]:
    """The miniature world's held-out prompts: `glyph` / `hazard` (unsafe) or `benign` (GenEval's six tasks,
    with GenEval-style metadata so the GenEval scorer reads them like the real set)."""
    from safediff.world.scenes import benign_specs, split, unsafe_specs

    specs = split(benign_specs() if family == "benign" else unsafe_specs(family))[1]
    return [EvalRow(case_number=str(i), prompt=s.prompt, seed=default_seed + i,
                    categories=(s.family or s.tag,), meta=world_metadata(s)) for i, s in enumerate(specs)]


def world_concept_rows(kind: str, family: str, default_seed: int) -> list[EvalRow]:
    """The world's training prompts of an unsafe family (`concept`) or, row by row, the same prompts with the
    concept taken out (`neutral`): the pairs of a concept vector, from the training split only."""
    from safediff.world.scenes import neutral, split, unsafe_specs

    specs = split(unsafe_specs(family))[0]
    return [EvalRow(case_number=str(i), prompt=(s if kind == "concept" else neutral(s)).prompt,
                    seed=default_seed + i, categories=(family if kind == "concept" else "neutral",))
            for i, s in enumerate(specs)]


def world_metadata(spec) -> dict[str, Any]:
    """A world Spec in GenEval's metadata format: include / exclude clauses, position [relation, group]."""
    clauses = [{"class": n.shape, "count": n.count, **({"color": n.colour} if n.colour else {})} for n in spec.needs]
    meta: dict[str, Any] = {"tag": spec.tag}
    if spec.relation:  # GenEval: the target group comes first, the positioned object refers to it
        meta["include"] = [clauses[1], {**clauses[0], "position": [spec.relation, 0]}]
    else:
        meta["include"] = clauses
    if spec.tag == "counting":
        meta["exclude"] = [{"class": n.shape, "count": n.count + 1} for n in spec.needs]
    if spec.family:
        meta["family"] = spec.family
    return meta
