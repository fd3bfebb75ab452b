"""Checkpoints a run resumes from exactly.

<run dir>/checkpoints/step_<N>/ holds
    pytorch_lora_weights.safetensors (or unet/)  the policy weights, diffusers format
    trainer.safetensors                          per learner rank: optimiser state tensors, torch RNG
    trainer.json                                 step, policy version, prompt cursor, the rest of each
                                                 rank's optimiser state (JSON; never pickle)
    replay.safetensors                           with max_staleness k: the k previous policies, which
                                                 generated the groups still in flight at this step
    config.yaml, state.json                      the config that produced it; step/version/checksum
and <run dir>/checkpoints/manifest.json lists the complete checkpoints with the sha256 of every file.

A checkpoint is written into a temporary folder, renamed into place, and only then added to the manifest
(itself replaced by rename), so a crash at any moment leaves the previous manifest and checkpoints valid.
Loading verifies every sha256 and falls back to the previous complete checkpoint, saying so. Since all
sampling noise and training order derive from (seed, step, ...), restoring these files is enough for
a resumed run to end with the same adapter checksum as an uninterrupted one. DeepSpeed ZeRO keeps one
optimiser partition per rank, so a distributed run resumes with the same learner_workers and zero_stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from safediff.common.config import Config, dump_config, resume_differences
from safediff.common.errors import UserInputError, first_line
from safediff.common.trainable import Trainable, state_checksum, trainable_for

log = logging.getLogger(__name__)


class Layout(str, Enum):
    """Who wrote a checkpoint's optimiser state: the single-process loop's torch AdamW, or the DeepSpeed
    ZeRO engine at a stage (one partition per rank). A run resumes only under the layout that wrote it."""

    TORCH = "torch"
    ZERO0 = "zero0"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"

    @classmethod
    def zero(cls, stage: int) -> Layout:
        return cls(f"zero{stage}")

    def describe(self, ranks: int) -> str:
        if self is Layout.TORCH:
            return "the single-process loop (safediff train)"
        return f"{ranks} learner rank(s) at ZeRO stage {self.value.removeprefix('zero')} (safediff run)"


class CheckpointLog(Protocol):
    """Where checkpoints are recorded besides manifest.json (the run store, `safediff.runtime.run_store`)."""

    def add_checkpoint(self, path: Path, step: int, version: int, files: dict[str, str]) -> None: ...

    def event(self, kind: str, **fields: Any) -> None: ...


def encode_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """A nested optimiser state (dicts, lists, tuples, tensors, JSON scalars, and library objects such as
    DeepSpeed's loss scaler) -> (tensors by path, a JSON skeleton). Tensors go to safetensors; objects that
    are neither tensors nor JSON are marked `live` and taken back from the running optimiser on load, so
    nothing is ever unpickled."""
    if torch.is_tensor(obj):
        return {prefix: obj.detach().cpu().contiguous()}, {"tensor": prefix}
    if isinstance(obj, dict):
        tensors, items = {}, []
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"cannot checkpoint a state key of type {type(key).__name__} at {prefix}")
            sub_tensors, skeleton = encode_state(value, f"{prefix}.{key}" if prefix else str(key))
            tensors.update(sub_tensors)
            items.append([key, skeleton])
        return tensors, {"dict": items}
    if isinstance(obj, (list, tuple)):
        tensors, items = {}, []
        for i, value in enumerate(obj):
            sub_tensors, skeleton = encode_state(value, f"{prefix}.{i}" if prefix else str(i))
            tensors.update(sub_tensors)
            items.append(skeleton)
        return tensors, {"tuple" if isinstance(obj, tuple) else "list": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {}, {"value": obj}
    return {}, {"live": type(obj).__name__}


def decode_state(skeleton: Any, tensors: dict[str, torch.Tensor], live: Any = None, where: str = "") -> Any:
    """Inverse of `encode_state`; `live` is the running optimiser's own state_dict, read at the same path."""
    kind, body = next(iter(skeleton.items()))
    if kind == "tensor":
        return tensors[body]
    if kind == "value":
        return body
    if kind == "live":
        if live is None:
            raise ValueError(f"checkpoint holds a {body} at '{where}' that the running optimiser lacks")
        return live
    if kind == "dict":
        return {key: decode_state(value, tensors, live.get(key) if isinstance(live, dict) else None, f"{where}.{key}")
                for key, value in body}
    items = [decode_state(value, tensors, live[i] if isinstance(live, (list, tuple)) and i < len(live) else None,
                          f"{where}[{i}]") for i, value in enumerate(body)]
    return tuple(items) if kind == "tuple" else items


@dataclass
class TrainerState:
    """One trainer process's optimiser state (torch AdamW, or one DeepSpeed ZeRO rank's partition) and
    torch RNG, in the form the files hold."""

    tensors: dict[str, torch.Tensor]
    skeleton: Any
    rng: torch.Tensor

    @classmethod
    def capture(cls, optimizer_state: dict) -> TrainerState:
        tensors, skeleton = encode_state(optimizer_state)
        return cls(tensors, skeleton, torch.get_rng_state())

    def restore(self, live_optimizer_state: dict) -> dict:
        """Set this process's RNG and return the optimiser state_dict to load."""
        torch.set_rng_state(self.rng)
        return decode_state(self.skeleton, self.tensors, live_optimizer_state)


@dataclass
class Checkpoint:
    path: Path
    step: int                       # steps finished; training continues at this step
    version: int
    weights: dict[str, torch.Tensor]
    trainers: list[TrainerState]    # one per learner rank (one for the single-process loop)
    layout: Layout                  # who wrote `trainers`
    cursor: dict                    # PromptStream.state_dict()
    replay: dict[int, dict[str, torch.Tensor]]  # older policies still generating at `step` (max_staleness)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("step"), int) \
        and isinstance(entry.get("sha256"), dict)


def read_manifest(run_dir: Path) -> list[dict]:
    """The complete checkpoints, oldest first ([] when there is no manifest). The manifest is only ever replaced
    whole, so one that cannot be read as its entries was damaged from outside: a UserInputError naming it."""
    path = run_dir / "checkpoints" / "manifest.json"
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(_is_entry(e) for e in entries):
            raise ValueError("not a list of {path, step, sha256} entries")
    except ValueError as err:  # also JSON and UTF-8 decoding errors
        raise UserInputError(f"checkpoint manifest {path} is damaged ({first_line(err)}); restore it, or remove it to "
                             "start the run over") from None
    return entries


def set_aside(run_dir: Path) -> Path | None:
    """Start a run over without losing or resuming the previous one: its checkpoints folder (manifest included)
    moves to checkpoints.before-<UTC time>/, so a later resume of the new run can only find the new run's
    checkpoints. Returns where it went; None when there was none."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return None
    target = run_dir / f"checkpoints.before-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while target.exists():  # two fresh starts within a second
        target, n = target.with_name(f"{target.name.split('~')[0]}~{n}"), n + 1
    os.replace(root, target)
    return target


def export_weights(state: dict[str, torch.Tensor], cfg: Config, out_dir: Path, step: int, version: int,
                   store: CheckpointLog | None = None) -> str:
    """Weights (diffusers format) + the config that produced them + step/version/checksum, loadable by a
    stock pipeline; with `store`, the files' sha256 go to the run store's manifest. Returns the checksum."""
    trainable = trainable_for(cfg)
    trainable.save(state, out_dir)
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    checksum = state_checksum(state)
    (out_dir / "state.json").write_text(json.dumps(
        {"step": step, "policy_version": version, "checksum": checksum, "finetune": trainable.kind}))
    if store is not None:
        store.add_checkpoint(out_dir, step, version, _digests(out_dir))
    return checksum


def write_checkpoint(run_dir: Path, cfg: Config, step: int, version: int, weights: dict[str, torch.Tensor],
                     trainers: list[TrainerState], layout: Layout, cursor: dict, store: CheckpointLog | None = None,
                     replay: dict[int, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write step_<step> atomically and add it to the manifest (file and run store). `trainers`: one
    state per learner rank; `layout` names their format so a resume with another layout is refused."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_weights(weights, cfg, tmp, step, version)
    tensors = {}
    for rank, trainer in enumerate(trainers):
        tensors.update({f"rank{rank}/{k}": v for k, v in trainer.tensors.items()})
        tensors[f"rank{rank}/_rng"] = trainer.rng
    save_file(tensors, str(tmp / "trainer.safetensors"))
    if replay:
        save_file({f"v{v}/{k}": t.detach().cpu().contiguous() for v, state in replay.items() for k, t in state.items()},
                  str(tmp / "replay.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(
        {"step": step, "version": version, "cursor": cursor, "layout": layout.value,
         "ranks": [t.skeleton for t in trainers], "replay_versions": sorted(replay or {})}))
    files = _digests(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    entries = [e for e in read_manifest(run_dir) if e["step"] != step]
    entries.append({"path": final.name, "step": step, "version": version, "sha256": files})
    _write_json_atomic(root / "manifest.json", sorted(entries, key=lambda e: e["step"]))
    if store is not None:
        store.add_checkpoint(final, step, version, files)
    return final


def _by_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_latest(run_dir: Path, trainable: Trainable, store: CheckpointLog | None = None) -> Checkpoint | None:
    """The newest checkpoint whose files all match the manifest's sha256; None when there is none."""
    for entry in reversed(read_manifest(run_dir)):
        folder = run_dir / "checkpoints" / entry["path"]
        actual = _digests(folder) if folder.is_dir() else {}
        bad = sorted(name for name, digest in entry["sha256"].items() if actual.get(name) != digest)
        if bad:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", folder, ", ".join(bad))
            if store is not None:
                store.event("checkpoint_rejected", path=str(folder), files=bad)
            continue
        meta = json.loads((folder / "trainer.json").read_text())
        tensors = load_file(str(folder / "trainer.safetensors"))
        trainers = []
        for rank, skeleton in enumerate(meta["ranks"]):
            own = _by_prefix(tensors, f"rank{rank}/")
            trainers.append(TrainerState(own, skeleton, own.pop("_rng")))
        replay_tensors = load_file(str(folder / "replay.safetensors")) if meta["replay_versions"] else {}
        return Checkpoint(path=folder, step=meta["step"], version=meta["version"],
                          weights=trainable.load_saved(folder), trainers=trainers, layout=Layout(meta["layout"]),
                          cursor=meta["cursor"],
                          replay={v: _by_prefix(replay_tensors, f"v{v}/") for v in meta["replay_versions"]})
    return None


def resume_point(run_dir: Path, cfg: Config, layout: Layout, store: CheckpointLog | None = None) -> Checkpoint | None:
    """The checkpoint to continue this run from, after checking it fits: same numbers-relevant config
    (`safediff.common.config.RESUME_INVARIANT`) and same trainer layout. None (with a warning) when there is none."""
    checkpoint = load_latest(run_dir, trainable_for(cfg), store)
    if checkpoint is None:
        log.warning("no complete checkpoint in %s: starting from step 0", run_dir / "checkpoints")
        return None
    changed = resume_differences((checkpoint.path / "config.yaml").read_text(), cfg)
    if changed:
        raise UserInputError(f"cannot resume run '{cfg.run.name}' from {checkpoint.path}: its config differs in "
                             f"{'; '.join(changed)}. Use the checkpoint's config (only run.steps, run.save_every, "
                             f"cluster actor counts and store may change), or start over with --fresh or another "
                             f"run.name")
    found = (checkpoint.layout, len(checkpoint.trainers))
    expected = (layout, 1 if layout is Layout.TORCH else cfg.cluster.learner_workers)
    if found != expected:  # ZeRO partitions the optimiser state per rank
        raise UserInputError(f"cannot resume run '{cfg.run.name}' from {checkpoint.path}: its optimiser state was "
                             f"written by {found[0].describe(found[1])}, this job has "
                             f"{expected[0].describe(expected[1])}; match cluster.learner_workers and "
                             "cluster.zero_stage (or the command) to resume")
    if store is not None:
        store.event("resumed", step=checkpoint.step, path=str(checkpoint.path))
    log.info("resuming %s from %s (step %d)", cfg.run.name, checkpoint.path, checkpoint.step)
    return checkpoint
