"""Shared fixtures: tiny models built once per session through the project's own builders."""

from __future__ import annotations

import contextlib
import os
import time

# Set before any library import reads them (see the developers' guide for why each matters).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from safediff.common.config import load_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny SD-architecture bundle (`sd/`) and tiny open_clip (`clip/`)."""
    from safediff.common.models import build_tiny_bundle
    from safediff.reward_server.clip_model import build_tiny_clip

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_bundle(root / "sd", seed=0)
    build_tiny_clip(root / "clip", seed=0)
    return root


def flat_colour_data(n: int = 512, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Flat-colour images with uniformly random RGB and a caption by brightness."""
    colours = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    images = (colours[:, :, None, None].expand(n, 3, size, size) * 255).round().to(torch.uint8)
    captions = ["a bright image" if b > 0.5 else "a dark image" for b in colours.mean(1).tolist()]
    return images, captions


@pytest.fixture(scope="session")
def colour_model(tmp_path_factory) -> Path:
    """A tiny bundle pre-trained (~25 s on 2 cores) on flat colours at 16 px, so brightness varies across
    samples and responds to the policy (a random VAE maps every latent to nearly the same image)."""
    from safediff.common.models import build_tiny_bundle, load_bundle
    from safediff.world.pretrain import train_unet, train_vae

    root = tmp_path_factory.mktemp("colour") / "sd"
    build_tiny_bundle(root, seed=0)
    bundle = load_bundle(str(root))
    images, captions = flat_colour_data()
    train_vae(bundle, images, steps=200, progress=False)
    train_unet(bundle, images, captions, steps=300, progress=False)
    bundle.vae.save_pretrained(root / "vae")
    bundle.unet.save_pretrained(root / "unet")
    return root


@pytest.fixture(scope="session")
def colour_sd3(tmp_path_factory) -> Path:
    """The SD3 family's colour model: a tiny SD3-architecture pipeline whose VAE and transformer (with its text
    encoders) are pre-trained on flat colours at 16 px, as `colour_model` is for the UNet family; its prompts are
    encoded without T5 states (`model.max_sequence_length=0`)."""
    from safediff.common.flow_models import build_tiny_sd3_bundle, load_sd3_bundle
    from safediff.world.pretrain import train_flow_transformer, train_vae

    root = build_tiny_sd3_bundle(tmp_path_factory.mktemp("colour_sd3") / "sd3", seed=0)
    bundle = load_sd3_bundle(str(root), max_sequence_length=0)
    images, captions = flat_colour_data()
    train_vae(bundle, images, steps=200, progress=False)
    train_flow_transformer(bundle, images, captions, steps=300, progress=False)
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        getattr(bundle.pipeline, name).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster on 127.0.0.1 for one test module (mark the module with usefixtures)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _without_a_weight(pipeline_dir: Path, out: Path) -> Path:
    """A copy of a flow pipeline directory whose transformer lacks one attention weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(pipeline_dir, out)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop(next(k for k in state if k.endswith("attn.to_q.weight")))
    save_file(state, str(weights))
    return out


@pytest.fixture(scope="session")
def without_a_weight():
    """`without_a_weight(pipeline_dir, out)`: a copy of a flow pipeline whose transformer lacks one weight."""
    return _without_a_weight


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a bright image\na dark image\nan image\na picture of colour\n")
    return path


def _tiny_config(tiny_dir: Path, tmp_path: Path, prompt_file: Path, *overrides: str, model: Path | None = None):
    """The CPU demo config pointed at the test's models, prompts and output dir, sampling 4 steps (the demo's 10
    cost time and test nothing more; a test's own overrides come after and win)."""
    return load_config("cpu_demo", [
        f"model.pretrained={model or tiny_dir / 'sd'}",
        f"reward.clip.model=local-dir:{tiny_dir / 'clip'}",
        f"prompts.sources=[{{path: {prompt_file}}}]",
        f"run.output_dir={tmp_path / 'runs'}",
        "sampler.num_steps=4", "grpo.train_timesteps=4",
        *overrides,
    ])


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(tiny_dir, tmp_path, prompt_file, *overrides, model=None)`: the CPU demo config pointed at a
    test's tiny models, prompts and output dir."""
    return _tiny_config


def _world_config(tmp_path: Path, *overrides: str):
    """The shipped world config with a short sampler and 2 evaluation images per prompt, writing under tmp_path."""
    return load_config("world", [f"run.output_dir={tmp_path / 'runs'}", "evaluation.suite.images_per_prompt=2",
                                 "sampler.num_steps=6", "grpo.train_timesteps=6", *overrides])


@pytest.fixture(scope="session")
def world_config():
    """`world_config(tmp_path, *overrides)`: the shipped world config, shortened for tests."""
    return _world_config


def _random_adapter(tmp_path: Path, cfg) -> Path:
    """A LoRA adapter written by the project's exporter, with random non-zero weights."""
    from safediff.common.checkpoint import export_weights
    from safediff.common.policy import Policy

    policy = Policy.from_config(cfg)
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in policy.state().items()}
    folder = tmp_path / "runs" / "trained" / "adapter"
    folder.mkdir(parents=True)
    export_weights(state, cfg, folder, step=5, version=5)
    return folder


@pytest.fixture(scope="session")
def random_adapter():
    """`random_adapter(tmp_path, cfg)`: a random non-zero LoRA adapter for `cfg`, exported as a run would."""
    return _random_adapter


def _before_step(monkeypatch: pytest.MonkeyPatch):
    from safediff.runtime.pipeline import RolloutPipeline

    def install(step: int, action) -> None:
        launch, fired = RolloutPipeline._launch, []

        def launch_after(self, s):
            if s == step and not fired:
                fired.append(s)
                action(self)
            return launch(self, s)
        monkeypatch.setattr(RolloutPipeline, "_launch", launch_after)
    return install


@pytest.fixture
def before_step(monkeypatch):
    """`before_step(step, action)`: call `action(pipeline)` in the driver just before step `step`'s groups are drawn
    and sent (`RolloutPipeline._launch`), so a fault lands at the same point of the run however slow the machine.
    Once: a run resumed in the same test launches that step again without it. May be called for several steps."""
    return _before_step(monkeypatch)


@contextlib.contextmanager
def _steps_hooked():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _before_step(monkeypatch)


@pytest.fixture(scope="session")
def steps_hooked():
    """`with steps_hooked() as before_step:` the `before_step` of a fixture of wider scope, undone at the block's
    end (a module fixture's run must not leave its faults to the module's other runs)."""
    return _steps_hooked


@pytest.fixture
def restarts_awaited(monkeypatch):
    """The run's end waits for restarted rollout actors as long as a loaded machine needs, not `cluster.hang_min_s`
    (for tests whose actors all come back)."""
    from safediff.runtime.pipeline import RolloutPipeline

    finish = RolloutPipeline.finish

    def finish_once_back(self):
        self.actors.rollouts.wait_back(300, every=True)
        return finish(self)
    monkeypatch.setattr(RolloutPipeline, "finish", finish_once_back)


def _wait_for(condition, what: str, timeout_s: float = 300.0) -> None:
    """Poll `condition()` every 50 ms until it holds; an assertion naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def wait_for():
    """`wait_for(condition, what, timeout_s=300)`: wait until `condition()` holds, or fail naming `what`."""
    return _wait_for


def _kill_for_good(actor) -> None:
    """ray.kill(actor) (no restart), returning once a call to it fails: the kill has landed."""
    import ray

    def dead() -> bool:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=300)
            return False
        except ray.exceptions.RayActorError:
            return True

    ray.kill(actor, no_restart=True)
    _wait_for(dead, f"the death of {actor} after ray.kill")


@pytest.fixture(scope="session")
def kill_for_good():
    """`kill_for_good(actor)`: ray.kill it (no restart) and wait until it is dead."""
    return _kill_for_good
