"""The CUDA path on one GPU, in one command (< 10 minutes): SD-shaped random model, bf16, SDPA
attention, an NCCL learner group of 1, the full Ray runtime.

    python -m bench.gpu_check            # on a machine with a GPU
    python -m bench.gpu_check --tiny     # the same script on CPU with tiny models (checks the wiring)

Builds an SD v1.x-shaped bundle and an open_clip ViT-H-14 with random weights (the real weights are not
needed for throughput), runs `deploy/configs/gpu1.yaml` (1 rollout, 1 reward, 1 learner sharing the
GPU) for a few steps at 512 px, and prints rollout images/s, learner steps/s and sync ms with the
card's name, step 0's first-update max |log ratio| (rollout vs learner log-probs in the run's dtype), the learner's
time per phase, and the model FLOPs utilisation (MFU) of the rollout and the learner against torch.mm's measured
peak in the run's dtype (FLOPs counted as bench/roofline.py counts them). Writes the same as JSON to
$OUT/gpu_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import open_clip  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from bench.fixtures import REPO, learner_phases, tiny_models  # noqa: E402
from bench.roofline import matmul_peak, model_flops  # noqa: E402
from safediff.common.config import load_config  # noqa: E402
from safediff.common.models import build_sd_shaped_bundle  # noqa: E402
from safediff.common.policy import Policy  # noqa: E402
from safediff.reward_server.clip_model import build_tiny_clip  # noqa: E402
from safediff.runtime.controller import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (wiring check)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/safediff-gpu-check"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.tiny:
        models = tiny_models()
        sd, clip = models / "sd", models / "clip"
        shape = ["sampler.height=32", "sampler.width=32", "run.device=cpu", "cluster.gpus_per_rollout_actor=0",
                 "cluster.gpus_per_reward_actor=0", "cluster.gpus_per_learner_worker=0"]
    else:
        sd, clip = args.work / "sd", args.work / "clip"
        if not (sd / "model_index.json").is_file():
            build_sd_shaped_bundle(sd)
        if not (clip / "open_clip_config.json").is_file():
            build_tiny_clip(clip, model_cfg=open_clip.get_model_config("ViT-H-14"))
        shape = []
    built = time.perf_counter() - t0
    cfg = load_config(REPO / "deploy/configs/gpu1.yaml", [
        f"model.pretrained={sd}", f"reward.clip.model=local-dir:{clip}", "reward.clip.weights=null",
        f"run.steps={args.steps}", "run.save_every=1000", f"run.output_dir={args.work / 'runs'}",
        "sampler.num_steps=20", "grpo.train_timesteps=19", "grpo.prompts_per_step=2", "grpo.updates_per_step=2",
        "cluster.cpus_per_rollout_actor=2", "cluster.cpus_per_reward_actor=1", "cluster.cpus_per_learner_worker=2",
        *shape])
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False,
             _node_ip_address="127.0.0.1")
    records = run(cfg, progress=True).metrics
    ray.shutdown()
    steady = records[1:] or records
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    peak, image_flops, pair_flops = utilisation_figures(cfg, args.tiny)
    images_per_s = cfg.grpo.group_size / mean("time_generate_mean")
    pairs = cfg.grpo.prompts_per_step * cfg.grpo.group_size * cfg.grpo.trained_per_sample
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu",
        "resolution": cfg.sampler.height, "ddim_steps": cfg.sampler.num_steps, "group_size": cfg.grpo.group_size,
        "rollout_images_per_s_per_actor": images_per_s,
        "learner_steps_per_s": 1 / mean("time_train"),
        # model FLOPs utilisation against torch.mm's measured peak in the run's dtype (bench/roofline.py)
        "matmul_peak_tflops": peak / 1e12,
        "rollout_mfu": images_per_s * image_flops / peak,
        "learner_mfu": pairs * pair_flops / mean("time_train") / peak,
        # the most GPU memory each role's tensors held (torch.cuda.max_memory_allocated; absent on CPU)
        "rollout_memory_max_mib": steady[-1].get("rollout_memory_max_mib"),
        "learner_memory_max_mib": steady[-1].get("learner_memory_max_mib"),
        "learner_time_per_phase_s": {phase: mean(f"learner_{phase}_s") for phase in learner_phases(steady[-1])},
        "sync_ms": 1000 * mean("time_publish") + mean("sync_load_ms"),
        "sync_bytes": steady[-1]["sync_bytes"], "pipeline_images_per_s": steady[-1]["images_per_s"],
        # step 0 is on-policy whatever max_staleness is: its first minibatch recomputes exactly what the rollout
        # recorded, so this is the rollout-vs-learner log-prob mismatch of the run's dtype (alarm above 1e-3)
        "first_update_max_abs_log_ratio": records[0].get("first_update_max_abs_log_ratio"),
        "build_s": built, "total_s": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(result, indent=1))


def utilisation_figures(cfg, tiny: bool) -> tuple[float, float, float]:
    """(matmul peak FLOP/s in the run's dtype on the run's device, FLOPs per rollout image, FLOPs per trained
    (sample, timestep) pair), the latter two counted on the policy with one sample (bench/roofline.py)."""
    policy = Policy.from_config(cfg)
    dtype = torch.float32 if tiny else torch.bfloat16
    sizes = (512, 1024) if tiny else (2048, 4096, 8192)
    peak = matmul_peak(dtype, policy.device, sizes)
    x = torch.randn(1, *policy.bundle.latent_shape(cfg.sampler.height, cfg.sampler.width), device=policy.device)
    states = policy.bundle.encode_prompts(["a photo"]).states.to(policy.device)
    flops = model_flops(policy, cfg.sampler.num_steps, x, states)
    return peak, flops.per_image, flops.per_pair


if __name__ == "__main__":
    main()
