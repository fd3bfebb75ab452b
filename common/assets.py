"""Files shipped inside the package (the world's models and prompts, the deploy configs, the training
prompts, the evaluation data), found from the installed package rather than the working directory.

A config names them with the `pkg:` scheme, relative to the package root (the repository root in a
source checkout): `pkg:world/weights/sd`, `pkg:deploy/prompts/coprov2_captions.txt`. Any other value is an
ordinary path (or hub id) and is returned unchanged, so configs may mix both. Built-in configs are also
found by name: `safediff run --config world` reads `pkg:deploy/configs/world.yaml`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from safediff.common.errors import UserInputError

SCHEME = "pkg:"


class AssetError(UserInputError, FileNotFoundError):
    """A `pkg:` path that names nothing in the installed package; the message names it."""


def package_root() -> Path:
    """The installed `safediff` package folder (the repository root in an editable install)."""
    return Path(str(files("safediff")))


def resolve(ref: str | Path) -> str:
    """`pkg:<path>` -> the absolute path of that file or folder in the package; anything else unchanged.
    Raises AssetError when a `pkg:` path does not exist (a broken install or a typo)."""
    text = str(ref)
    if not text.startswith(SCHEME):
        return text
    relative = text.removeprefix(SCHEME).lstrip("/")
    path = package_root() / relative
    if not relative or ".." in Path(relative).parts or not path.exists():
        raise AssetError(f"{text}: no such file in the installed safediff package ({package_root()})")
    return str(path)


def builtin_configs() -> list[str]:
    """Names accepted by `--config NAME`: the YAML files in deploy/configs."""
    return sorted(p.stem for p in (package_root() / "deploy" / "configs").glob("*.yaml"))


def config_path(ref: str | Path) -> Path:
    """An existing config file as given, else a built-in config of that name (`world` or `world.yaml`)."""
    path = Path(resolve(ref))
    if path.is_file() or path.suffix not in ("", ".yaml") or path.parent != Path("."):
        return path  # a user's path: load_config reports a missing file by its name
    builtin = package_root() / "deploy" / "configs" / f"{path.stem}.yaml"
    if builtin.is_file():
        return builtin
    raise AssetError(f"--config {ref}: no such file, and not a built-in config (built-in: "
                     f"{', '.join(builtin_configs())})")
