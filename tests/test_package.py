"""The installable package: one `safediff` import package whose wheel carries every asset the built-in configs
name, and which works from outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from safediff.common.assets import AssetError, builtin_configs, config_path, resolve
from safediff.common.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _pkg_refs(tree) -> set[str]:
    """Every `pkg:` path a config names (also inside `local-dir:pkg:...`)."""
    if isinstance(tree, dict):
        return set().union(*(_pkg_refs(v) for v in tree.values()), set())
    if isinstance(tree, list):
        return set().union(*(_pkg_refs(v) for v in tree), set())
    text = str(tree).removeprefix("local-dir:")
    return {text.removeprefix("pkg:")} if text.startswith("pkg:") else set()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (what `pip install .` installs)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "build",
                                                                "*.egg-info", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    [built] = (tmp / "dist").glob("safediff-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_one_package_and_every_asset_the_builtin_configs_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"safediff", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                                                + ".dist-info"}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    refs = set()
    for name in builtin_configs():
        refs |= _pkg_refs(load_config(name).model_dump(mode="json"))
    assert {"world/weights/sd", "world/weights/clip", "deploy/prompts/coprov2_captions.txt"} <= refs
    for ref in sorted(refs):
        local = Path(resolve(f"pkg:{ref}"))
        expected = [str(p.relative_to(local.parent)) for p in ([local] if local.is_file() else local.rglob("*"))
                    if p.is_file()]
        for file in expected:
            assert f"safediff/{Path(ref).parent / file}".replace("/./", "/") in names, (ref, file)
    for folder in ("evaluation/data", "deploy/configs", "world/prompts"):
        shipped = [p for p in (REPO / folder).iterdir() if p.is_file()]
        assert shipped and all(f"safediff/{folder}/{p.name}" in names for p in shipped), folder


@pytest.mark.slow
def test_the_installed_wheel_runs_from_an_empty_directory(wheel, tmp_path):
    """Installed without the source tree on the path: the world config by name, its models and prompts load."""
    site, cwd = tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "import safediff, common"], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "No module named 'common'" in proc.stderr  # no generic top-level packages
    script = (
        "import safediff\n"
        "from safediff.common.config import load_config\n"
        "from safediff.common.policy import Policy\n"
        "from safediff.common.prompts import PromptStream\n"
        "from safediff.reward_server.clip_model import load_clip\n"
        "cfg = load_config('world')\n"
        "Policy.from_config(cfg); load_clip(cfg.reward.clip)\n"
        "print(len(PromptStream(cfg.prompts.sources, 0).next_groups(0, 4)), safediff.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "4" and proc.stdout.split()[1].startswith(str(site))
    proc = subprocess.run([sys.executable, "-m", "safediff.cli", "config", "--config", "world"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "pretrained: pkg:world/weights/sd" in proc.stdout, proc.stderr[-2000:]


def test_configs_by_name_and_pkg_paths_fail_clearly(tmp_path):
    assert config_path("world") == config_path("world.yaml") == REPO / "deploy" / "configs" / "world.yaml"
    mine = tmp_path / "world.yaml"
    mine.write_text("run: {name: mine}\n")
    assert config_path(mine) == mine  # a file that exists is read as given, even under a built-in's name
    with pytest.raises(ConfigError, match="not a built-in config.*world"):
        load_config("wrold")
    with pytest.raises(AssetError, match="pkg:world/weights/nope"):
        resolve("pkg:world/weights/nope")
    with pytest.raises(AssetError):
        resolve("pkg:../README.md")
    assert resolve("runs/tiny/sd") == "runs/tiny/sd" and resolve("CompVis/stable-diffusion-v1-4").startswith("CompVis")
