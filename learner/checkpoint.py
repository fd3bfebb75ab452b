"""Checkpoints a run resumes from exactly.

<run dir>/checkpoints/step_<N>/ holds
    pytorch_lora_weights.safetensors (or unet/)  the policy weights, diffusers format
    trainer.safetensors                          optimiser state tensors and the torch RNG state
    trainer.json                                 step, policy version, prompt cursor, optimiser param groups
    config.yaml, state.json                      the config that produced it; step/version/checksum
and <run dir>/checkpoints/manifest.json lists the complete checkpoints with the sha256 of every file.

A checkpoint is written into a temporary folder, renamed into place, and only then added to the manifest
(itself replaced by rename), so a crash at any moment leaves the previous manifest and checkpoints valid.
Loading verifies every sha256 and falls back to the previous complete checkpoint, saying so. Since all
sampling noise and training order derive from (seed, step, ...), restoring these files is enough for
a resumed run to end with the same adapter checksum as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.config import Config, dump_config
from common.lora import save_trainable_state, state_checksum
from common.run_store import RunStore

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    path: Path
    step: int                       # steps finished; training continues at this step
    version: int
    weights: dict[str, torch.Tensor]
    optimizer: dict                 # a torch optimiser state_dict
    cursor: dict                    # PromptStream.state_dict()
    rng: torch.Tensor


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    """torch optimiser state_dict -> (tensors named 'opt.<param id>.<name>', JSON-able param groups)."""
    tensors = {f"opt.{pid}.{name}": value.detach().cpu().contiguous()
               for pid, entry in state_dict["state"].items() for name, value in entry.items()}
    return tensors, state_dict["param_groups"]


def optimizer_from_files(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": param_groups}


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


def read_manifest(run_dir: Path) -> list[dict]:
    path = run_dir / "checkpoints" / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else []


def export_weights(state: dict[str, torch.Tensor], cfg: Config, out_dir: Path, step: int, version: int,
                    unet_config: dict | None = None, store: RunStore | None = None) -> str:
    """Weights (diffusers format) + the config that produced them + step/version/checksum, loadable by a
    stock pipeline; with `store`, the files' sha256 go to the run store's manifest. Returns the checksum."""
    save_trainable_state(state, cfg.model.finetune, cfg.lora, out_dir, unet_config)
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    checksum = state_checksum(state)
    (out_dir / "state.json").write_text(json.dumps(
        {"step": step, "policy_version": version, "checksum": checksum, "finetune": cfg.model.finetune}))
    if store is not None:
        store.add_checkpoint(out_dir, step, version, _digests(out_dir))
    return checksum


def write_checkpoint(run_dir: Path, cfg: Config, step: int, version: int, weights: dict[str, torch.Tensor],
                     optimizer_state: dict, cursor: dict, unet_config: dict | None = None,
                     store: RunStore | None = None) -> Path:
    """Write step_<step> atomically and add it to the manifest (file and run store)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_weights(weights, cfg, tmp, step, version, unet_config)
    tensors, param_groups = optimizer_to_files(optimizer_state)
    save_file({**tensors, "rng.torch": torch.get_rng_state()}, str(tmp / "trainer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(
        {"step": step, "version": version, "cursor": cursor, "param_groups": param_groups}))
    files = _digests(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    entries = [e for e in read_manifest(run_dir) if e["step"] != step]
    entries.append({"path": final.name, "step": step, "version": version, "sha256": files})
    _write_json_atomic(root / "manifest.json", sorted(entries, key=lambda e: e["step"]))
    if store is not None:
        store.add_checkpoint(final, step, version, files)
    return final


def load_latest(run_dir: Path, finetune: str, store: RunStore | None = None) -> Checkpoint | None:
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
        return Checkpoint(path=folder, step=meta["step"], version=meta["version"],
                          weights=_load_weights(folder, finetune),
                          optimizer=optimizer_from_files(tensors, meta["param_groups"]),
                          cursor=meta["cursor"], rng=tensors["rng.torch"])
    return None


def _load_weights(folder: Path, finetune: str) -> dict[str, torch.Tensor]:
    """Back from the diffusers files to the peft-named trainable state (inverse of save_trainable_state)."""
    if finetune == "full":
        return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    saved = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    unet = {k.removeprefix("unet."): v for k, v in saved.items() if k.startswith("unet.")}
    return convert_unet_state_dict_to_peft(unet)
