"""Checkpoints and exact resume of the single-process loop."""

import json
import signal
import subprocess
import sys
import time

import pytest

from safediff.common.checkpoint import read_manifest
from safediff.reward_server.steering import RewardOutput
from safediff.runtime.local import train

STEPS = ("run.steps=4", "run.save_every=1")


def brightness(images, prompts, unsafe=None, groups=None):
    return RewardOutput(rewards=images.float().mean(dim=(1, 2, 3)) / 255)


class CrashAt:
    """The brightness reward, raising at call `n` (= step n: one reward call per step)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, images, prompts, unsafe=None, groups=None):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("simulated crash")
        return brightness(images, prompts)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory, tiny_config):
    tmp = tmp_path_factory.mktemp("full")
    prompts = tmp / "p.txt"
    prompts.write_text("a bright image\na dark image\nan image\n")
    return train(tiny_config(tiny_dir, tmp, prompts, *STEPS, "run.name=full"), brightness, progress=False), prompts


@pytest.mark.slow
def test_a_run_killed_after_step_k_resumes_to_the_same_adapter(tiny_dir, tmp_path, uninterrupted, tiny_config):
    reference, prompts = uninterrupted
    cfg = tiny_config(tiny_dir, tmp_path, prompts, *STEPS, "run.name=crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, CrashAt(2), progress=False)  # steps 0, 1 done and checkpointed; dies in step 2
    assert [e["step"] for e in read_manifest(tmp_path / "runs" / "crash")] == [1, 2]
    resumed = train(cfg, brightness, progress=False, resume=True)
    assert resumed.checksum == reference.checksum
    assert [m["step"] for m in resumed.metrics] == [0, 1, 2, 3]
    assert [m["reward_mean"] for m in resumed.metrics] == [m["reward_mean"] for m in reference.metrics]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_dir, tmp_path, uninterrupted, caplog,
                                                                    tiny_config):
    reference, prompts = uninterrupted
    cfg = tiny_config(tiny_dir, tmp_path, prompts, *STEPS, "run.name=damaged")
    with pytest.raises(RuntimeError):
        train(cfg, CrashAt(3), progress=False)
    newest = tmp_path / "runs" / "damaged" / "checkpoints" / "step_3" / "trainer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + b"corrupt!")
    resumed = train(cfg, brightness, progress=False, resume=True)
    assert "step_3 is damaged (trainer.safetensors); falling back" in caplog.text
    assert resumed.checksum == reference.checksum


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_cli_resumes_from_it(tiny_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("an image\na picture\n")
    base = [sys.executable, "-m", "safediff.cli", "train", "--config", "cpu_demo",
            f"model.pretrained={tiny_dir / 'sd'}", f"reward.clip.model=local-dir:{tiny_dir / 'clip'}",
            f"prompts.sources=[{{path: {prompts}}}]", f"run.output_dir={tmp_path / 'runs'}", "run.steps=5",
            "run.save_every=100", "sampler.num_steps=4", "grpo.train_timesteps=4"]
    straight = subprocess.run([*base, "run.name=straight"], capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen([*base, "run.name=stopped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted: stopped by signal" in err
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert done < 5 and [e["step"] for e in read_manifest(run_dir)] == [done]  # checkpoint even off-schedule
    resumed = subprocess.run([*base, "run.name=stopped", "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = lambda name: json.loads((tmp_path / "runs" / name / "adapter" / "state.json").read_text())  # noqa: E731
    assert state("stopped")["checksum"] == state("straight")["checksum"]
