"""How close the rollout and the learner come to this machine's matmul peak, and the rollout against the stock
diffusers pipeline, measured in one process and one run:

    python -m bench.roofline [--config world] [--repeats 3] [key.sub=value ...]

peak      the best rate of torch.mm on square float32 matrices of 512 to 2048 (the dtype the CPU runs in), with the
          threads of the learner (cluster.cpus_per_learner_worker)
FLOPs     counted by torch's FlopCounterMode (its own formulas for matmuls, convolutions and attention; attention is
          counted through the math kernel, which it decomposes into matmuls): one UNet forward per sample, one
          forward + backward per sample with the adapter trainable (the learner's; backward computes input
          gradients and the LoRA weights' only), one VAE decode per image
rollout   `Rollout.generate` of one step's groups (log-probs recorded, images decoded) against the stock
          `StableDiffusionPipeline` over the same modules with `DDIMScheduler` at the same eta, steps, guidance, size
          and batch (output_type "pt", decoded), timed in turns: seconds per image, the ratio, and the utilisation
          images/s x (steps x 2 CFG halves x forward + decode) / peak
learner   one GRPO update of the step's samples (single process, no Ray), its utilisation
          (sample, timestep) pairs/s x 2 CFG halves x forward+backward / peak, and its time per phase

The unet family only (the world, SD-shaped models).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.fixtures import best_in_turns, best_of, cpu_name, learner_phases
from safediff.actors.render import pipeline
from safediff.actors.rollout import Rollout
from safediff.common.config import load_config
from safediff.common.policy import Policy
from safediff.common.process import configure_process
from safediff.common.prompts import PromptStream
from safediff.learner.update import GRPOUpdate, TorchOptimizer, TrainBatch


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 3) -> float:
    """FLOP/s: the best rate of torch.mm over square matrices of `sizes` (2 n^3 FLOPs each; 8 products per timing,
    synchronised on CUDA)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))

        def work(a=a, b=b):
            for _ in range(8):
                torch.mm(a, b)
            sync()

        best = max(best, 8 * 2 * n**3 / best_of(repeats, work))
    return best


def counted(work) -> int:
    """FLOPs of `work()`, attention through the math kernel so that its matmuls are counted."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


class ModelFlops(NamedTuple):
    forward: float           # one UNet forward, per sample
    forward_backward: float  # the same with the learner's backward (input gradients and the LoRA weights')
    decode: float            # one VAE decode, per image
    per_image: float         # a rollout image: num_steps x 2 CFG halves x forward + decode
    per_pair: float          # a trained (sample, timestep) pair: 2 CFG halves x forward_backward


def model_flops(policy: Policy, num_steps: int, x: torch.Tensor, states: torch.Tensor) -> ModelFlops:
    """FLOPs of the policy's UNet and VAE, counted on latents x [B, C, h, w] conditioned on text states [B, L, D]
    with the adapter trainable, per sample."""
    unet, rows = policy.bundle.unet, x.shape[0]
    t = torch.full((rows,), int(policy.bundle.scheduler.config.num_train_timesteps) - 1, device=x.device)
    with torch.no_grad(), policy.autocast():
        forward = counted(lambda: unet(x, t, states).sample) / rows
    with policy.autocast():
        both = counted(lambda: unet(x, t, states).sample.float().square().mean().backward()) / rows
    for p in policy.trainable_parameters():
        p.grad = None
    decode = counted(lambda: policy.bundle.decode_images(x)) / rows
    return ModelFlops(forward, both, decode, num_steps * 2 * forward + decode, 2 * both)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="world")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.model.family != "unet":
        parser.error("bench.roofline measures the unet family (SD-shaped models)")
    configure_process(cfg, cfg.cluster.cpus_per_learner_worker)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}")
    peak = matmul_peak()
    print(f"matmul peak (float32): {peak / 1e9:.1f} GFLOP/s")

    policy = Policy.from_config(cfg)
    s, g = cfg.sampler, cfg.grpo
    groups = PromptStream.from_config(cfg.prompts, cfg.run.seed).next_groups(0, g.prompts_per_step)
    rollout = Rollout(policy, s, g.group_size, cfg.run.seed)
    trajectories = rollout.generate(groups)
    images = len(groups) * g.group_size
    advantages = torch.randn(len(groups), g.group_size, generator=torch.Generator().manual_seed(0))
    batch = TrainBatch.from_trajectories(trajectories, advantages)

    rows = g.micro_batch_size
    flops = model_flops(policy, s.num_steps, batch.latents[:rows, 0], batch.cond.states[:rows])
    per_image = flops.per_image
    print(f"FLOPs: UNet forward {flops.forward / 1e9:.2f} G per sample, forward+backward "
          f"{flops.forward_backward / 1e9:.2f} G, VAE decode {flops.decode / 1e9:.2f} G per image; an image "
          f"{per_image / 1e9:.1f} G ({s.num_steps} steps x 2)")

    stock = pipeline(policy, "ddim").pipe
    negative = [s.negative_prompt] * len(groups)

    def stock_call():
        with torch.no_grad(), policy.autocast():
            stock([gr.prompt for gr in groups], negative_prompt=negative, num_inference_steps=s.num_steps,
                  guidance_scale=s.guidance_scale, eta=s.eta, height=s.height, width=s.width,
                  num_images_per_prompt=g.group_size, generator=torch.Generator().manual_seed(0), output_type="pt")

    ours, theirs = (seconds / images for seconds in best_in_turns(args.repeats, lambda: rollout.generate(groups),
                                                                  stock_call))
    print(f"rollout, {images} images in one call: ours {ours:.3f} s per image (log-probs recorded), stock "
          f"StableDiffusionPipeline {theirs:.3f} s ({ours / theirs:.2f}x); utilisation "
          f"{per_image / ours / peak:.1%} of the matmul peak (stock {per_image / theirs / peak:.1%})")

    trained = g.trained_per_sample
    start_state, metrics = policy.state(), {}

    def update():
        policy.load_state(start_state, 0)
        optimizer = TorchOptimizer(policy.trainable_parameters(), cfg.optim)
        metrics.update(GRPOUpdate(policy, g, s, cfg.run.seed, optimizer).update(batch, step=0))

    seconds = best_of(args.repeats, update)
    pairs = len(batch) * trained
    phases = learner_phases(metrics)
    largest = max(phases, key=phases.get)
    print(f"learner, {len(batch)} samples x {trained} timesteps: {seconds:.1f} s, {pairs / seconds:.1f} pairs/s; "
          f"utilisation {pairs * flops.per_pair / seconds / peak:.1%} of the matmul peak; largest phase "
          f"{largest} ({phases[largest] / sum(phases.values()):.0%}): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
