"""`safediff eval`: generate (or resume), score (or resume), report.

    images   <out>/images/*.png + manifest.jsonl     evaluation/generate.py (Ray rollout actors or local)
    scores   <out>/scores/<scorer>.jsonl              evaluation/scorers.py
    report   <out>/report.md, summary.json, results.csv, grids/   evaluation/report.py

summary.json also records this call's seconds per stage ("timing": generate and each scorer, with the
number of images each handled; a resumed call counts only its own work).

<out>/identity.json records what the images were generated with (model, adapter checksum, sampler
settings, prompt set); resuming into a folder generated differently is refused, naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from safediff.actors.render import SCHEDULERS
from safediff.common.config import Config, resolve_device_dtype
from safediff.common.errors import UserInputError
from safediff.common.progress import Progress, track
from safediff.common.trainable import trainable_for
from safediff.common.types import EvalRow
from safediff.evaluation import jsonl, protocols, provenance
from safediff.evaluation.generate import ImageStore, load_adapter, local_renderer
from safediff.evaluation.metrics import join, summarise
from safediff.evaluation.prompt_sets import load_prompt_set
from safediff.evaluation.report import markdown, write_grids, write_results_csv
from safediff.evaluation.scorers import build_scorers, run_scorers

log = logging.getLogger(__name__)
RETRIES = 3


def identity_of(cfg: Config, adapter: Path | None, info: dict, protocol: str | None = None) -> dict:
    suite, sampler = cfg.evaluation.suite, cfg.sampler
    label = "base" if adapter is None else f"{Path(adapter).resolve().parent.name}/{Path(adapter).name}"
    return {"set": suite.prompts.name or str(suite.prompts.path), "label": label, "model": cfg.model.pretrained,
            "adapter": str(adapter) if adapter else None, "checksum": info.get("checksum"), "step": info.get("step"),
            "images_per_prompt": suite.images_per_prompt, "seed": suite.seed, "fixed_seed": suite.fixed_seed,
            "seeding": suite.seeding, "row_settings": suite.row_settings, "scheduler": SCHEDULERS[suite.scheduler],
            "eta": suite.eta, "num_steps": suite.num_steps or sampler.num_steps, "guidance": suite.guidance,
            "guidance_scale": sampler.guidance_scale, "height": sampler.height, "width": sampler.width,
            "negative_prompt": sampler.negative_prompt, "protocol": protocol,
            "textual_inversion": provenance.sha256(suite.textual_inversion) if suite.textual_inversion else None,
            "overridden": protocols.overridden(cfg, protocol) if protocol else {}}


def check_identity(out: Path, identity: dict) -> None:
    path = out / "identity.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [f"{k}: {saved.get(k)!r} -> {identity[k]!r}" for k in identity if k != "label"
                  and saved.get(k) != identity[k]]
        if differ:
            raise UserInputError(f"{out} holds images generated differently ({'; '.join(differ)}); "
                                 "choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1))


def default_out(cfg: Config, identity: dict) -> Path:
    """<run.output_dir>/eval/<set>-<label>, e.g. runs/eval/i2p-base or runs/eval/i2p-myrun-adapter."""
    name = f"{Path(identity['set']).stem}-{identity['label']}"
    return cfg.run.output_dir / "eval" / "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def evaluate(cfg: Config, adapter: Path | None = None, out: Path | None = None, address: str | None = None,
             progress: bool = True, protocol: str | None = None, local: bool = False) -> Path:
    """Images, scores and report for cfg.evaluation.suite; returns the output folder. Images are rendered on the
    Ray cluster at `address` (or $RAY_ADDRESS) when there is one, unless `local` (in this process)."""
    suite = cfg.evaluation.suite
    rows = load_prompt_set(suite.prompts, suite.seed)
    if suite.fixed_seed is not None:
        rows = [dataclasses.replace(r, seed=suite.fixed_seed) for r in rows]
    state, info = load_adapter(adapter, trainable_for(cfg)) if adapter is not None else (None, {})
    identity = identity_of(cfg, adapter, info, protocol)
    out = Path(out) if out is not None else default_out(cfg, identity)
    device, _ = resolve_device_dtype(cfg.run)
    scorers, disabled, loading = build_scorers(suite, device)  # before any generation: a bad scorer costs nothing
    check_identity(out, identity)
    store = ImageStore(out)
    todo = store.todo(rows, suite.images_per_prompt)
    log.info("%s: %d rows, %d chunks to render", out, len(rows), len(todo))
    start = time.perf_counter()
    if todo:
        on_ray = not local and bool(address or os.environ.get("RAY_ADDRESS"))
        if on_ray and suite.textual_inversion is not None:
            raise UserInputError("evaluation.suite.textual_inversion: rendered in-process only (the rollout "
                                 "actors' text encoders stay as trained); unset RAY_ADDRESS / --address")
        if on_ray:
            render_on_ray(cfg, state, info, todo, store, address, progress)
        else:
            render = local_renderer(cfg, state, info)
            for chunk in track(todo, "generate", "chunk", enabled=progress):
                store.write(chunk, render(chunk), suite.images_per_prompt, cfg.sampler, suite)
    timing = {"generate": {"seconds": time.perf_counter() - start,
                           "images": sum(len(c) for c in todo) * suite.images_per_prompt}}
    wanted = {(r.case_number, j) for r in rows for j in range(suite.images_per_prompt)}
    images = [r for r in store.rows() if (r["case_number"], r["j"]) in wanted]
    scoring = run_scorers(scorers, out, images, progress)
    timing.update({name: {**loading[name], **scoring.get(name, {})} for name in scorers})
    report(out, images, identity, disabled, suite.bootstrap, suite.grid_images, timing,
           provenance.record(suite, list(scorers), scheduler=SCHEDULERS[suite.scheduler]))
    return out


def report(out: Path, images: list[dict], identity: dict, disabled: dict[str, str], resamples: int,
           grid_images: int, timing: dict[str, dict], sources: dict | None = None) -> None:
    """Join the score files on case_number and write report.md, summary.json, results.csv, records.jsonl (the
    joined per-image records, which `eval-compare` pairs) and grids."""
    names = sorted(p.stem for p in (out / "scores").glob("*.jsonl"))
    keys = {(r["case_number"], r["j"]) for r in images}
    scores = {n: [s for s in jsonl.read(out / "scores" / f"{n}.jsonl") if (s["case_number"], s["j"]) in keys]
              for n in names}
    records = join(images, scores)
    metrics = summarise(records, resamples)
    if (out / "scores" / "fid.json").is_file() and "fid" not in disabled:
        metrics["fid"] = json.loads((out / "scores" / "fid.json").read_text())
    (out / "summary.json").write_text(json.dumps({"identity": identity, "disabled": disabled, "metrics": metrics,
                                                  "timing": timing, "provenance": sources or {}}, indent=1))
    write_results_csv(records, out / "results.csv")
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_grids(records, out, grid_images)
    (out / "report.md").write_text(markdown(metrics, identity, disabled, sources or {}))


def render_on_ray(cfg: Config, state: dict | None, info: dict, todo: list[list[EvalRow]], store: ImageStore,
                  address: str | None, progress: bool) -> None:
    """Chunks over `cluster.rollout_actors` rollout actors (two in flight each), written as they return. A
    chunk whose actor died is re-sent after the restarted actor got the adapter again (it refuses to render
    with an older policy, so a restart cannot silently render base-model images)."""
    import ray

    from safediff.common.weight_sync import publish
    from safediff.runtime.cluster import start_ray
    from safediff.runtime.groups import RolloutGroup

    start_ray(cfg, address)
    suite = cfg.evaluation.suite
    actors = RolloutGroup.create(cfg)
    update, version = None, 0
    try:
        if state is not None:
            version = int(info.get("policy_version", 1))
            update = publish(state, version, trainable_for(cfg).expected_modules(state))
            ray.get(actors.load_adapter(update))
        queue, pending, tries = list(todo), {}, {}
        bar = Progress(len(todo), "generate (ray)", "chunk", enabled=progress)

        def submit(actor) -> None:
            chunk = queue.pop(0)
            pending[actor.render.remote(chunk, version)] = (actor, chunk)

        for actor in list(actors) * 2:
            if queue:
                submit(actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, chunk = pending.pop(ref)
            try:
                rendered = ray.get(ref)
            except Exception as err:  # actor died (restarted by Ray) or is behind: re-sync, then retry the chunk
                tries[id(chunk)] = tries.get(id(chunk), 0) + 1
                if tries[id(chunk)] > RETRIES:
                    raise
                log.warning("chunk of %d rows failed on an actor (%s); retrying", len(chunk), err)
                if update is not None:
                    ray.get(actor.resync.remote(update))
                queue.insert(0, chunk)
            else:
                store.write(chunk, rendered, suite.images_per_prompt, cfg.sampler, suite)
                bar.update(1)
            if queue:
                submit(actor)
        bar.close()
    finally:
        actors.kill()
