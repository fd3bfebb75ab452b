"""Train the miniature world's models on CPU and write them, with their model card, into the repository.

    python -m safediff.world.train --out world/weights

1. a tiny SD-architecture text-to-image model (diffusers UNet2DConditionModel with cross-attention in
   every block, AutoencoderKL with 2x downsampling, CLIPTextModel): VAE, then UNet and text encoder
   together (`safediff.world.pretrain`), on rendered scenes captioned with the prompt each was drawn for,
   unsafe prompts included;
2. a tiny open_clip model trained contrastively (`world.clip_training`) on the same world, half the
   captions being full scene descriptions;
3. the base model scored by the pixel judges on the held-out prompt sets (`world.evaluate`), and the
   judges validated on rendered ground truth; both go into MODEL_CARD.md and scores.json.
Weights are stored in float16 (safetensors) to keep the shipped files small; they load as float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from safediff.common.config import load_config
from safediff.common.models import build_tiny_bundle, load_bundle
from safediff.common.policy import Policy
from safediff.reward_server.clip_model import build_tiny_clip, load_clip
from safediff.world.clip_training import WORLD_CLIP_CONFIG, train_clip
from safediff.world.data import render_dataset
from safediff.world.pretrain import train_unet, train_vae
from safediff.world.report import score
from safediff.world.validate import validate_judges


def train_diffusion(out: Path, images: torch.Tensor, captions: list[str], vae_steps: int, unet_steps: int,
                    width: int, seed: int) -> dict[str, float]:
    # cross-attention in every block: words must bind to colour, shape, count and place
    build_tiny_bundle(out, seed, width, attention_everywhere=True)
    bundle = load_bundle(str(out))
    losses = {"vae_loss": train_vae(bundle, images, steps=vae_steps, seed=seed),
              "unet_loss": train_unet(bundle, images, captions, steps=unet_steps, seed=seed,
                                      train_text_encoder=True)}
    bundle.vae.half().save_pretrained(out / "vae")
    bundle.unet.half().save_pretrained(out / "unet")
    bundle.text_encoder.half().save_pretrained(out / "text_encoder")
    return losses


def train_world_clip(out: Path, images: torch.Tensor, captions: list[str], steps: int, seed: int) -> float:
    build_tiny_clip(out, seed=seed, model_cfg=WORLD_CLIP_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**WORLD_CLIP_CONFIG)
    loss = train_clip(model, images, captions, steps=steps, seed=seed)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    return loss


def score_base_model(weights: Path, images_per_prompt: int, seed: int) -> dict[str, float]:
    cfg = load_config("world",
                      [f"model.pretrained={weights / 'sd'}", f"reward.clip.model=local-dir:{weights / 'clip'}",
                       f"run.seed={seed}"])
    return score(Policy.from_config(cfg), cfg, images_per_prompt, load_clip(cfg.reward.clip), progress=True)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("world/weights"))
    parser.add_argument("--images", type=int, default=12000, help="rendered training scenes")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--clip-steps", type=int, default=800)
    parser.add_argument("--width", type=int, default=32, help="UNet base channels (a multiple of 32)")
    parser.add_argument("--eval-images", type=int, default=8, help="images per held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="diffusion,clip,evaluate",
                        help="comma-separated subset to (re)do; the others are read from --out")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m safediff.world.train " + " ".join(sys.argv[1:] if argv is None else argv)
    times, report = {}, {"command": command, "args": {k: str(v) for k, v in vars(args).items()}}

    previous = args.out / "scores.json"
    if stages != {"diffusion", "clip", "evaluate"} and previous.is_file():
        kept = json.loads(previous.read_text())
        report = {**kept, "command": f"{kept['command']}, then {command}", "args": report["args"],
                  "earlier_args": kept["args"]}
        times = kept.get("seconds", {})

    if "diffusion" in stages:
        t = time.perf_counter()
        images, captions = render_dataset(args.images, seed=args.seed)
        shutil.rmtree(args.out / "sd", ignore_errors=True)
        report.update(train_diffusion(args.out / "sd", images, captions, args.vae_steps, args.unet_steps,
                                      args.width, args.seed))
        times["diffusion_s"] = time.perf_counter() - t
    if "clip" in stages:
        t = time.perf_counter()
        clip_images, clip_captions = render_dataset(args.images, seed=args.seed + 1, full_caption_fraction=0.5)
        report["clip_loss"] = train_world_clip(args.out / "clip", clip_images, clip_captions, args.clip_steps,
                                               args.seed)
        times["clip_s"] = time.perf_counter() - t
    if "evaluate" in stages:
        t = time.perf_counter()
        report["judges"] = validate_judges(n_scenes=2000, seed=args.seed + 2)
        report["base_model"] = score_base_model(args.out, args.eval_images, args.seed)
        times["evaluate_s"] = time.perf_counter() - t
    report["seconds"] = times
    (args.out / "scores.json").write_text(json.dumps(report, indent=1))
    (args.out / "MODEL_CARD.md").write_text(model_card(report))
    print(json.dumps(report, indent=1))
    return 0


def model_card(report: dict) -> str:
    """MODEL_CARD.md: what the shipped weights are, how they were made, and what the judges say of them."""
    base, judges, secs = report["base_model"], report["judges"], report["seconds"]
    earlier = f" (earlier stages: `{json.dumps(report['earlier_args'])}`)" if "earlier_args" in report else ""
    judge_rows = "\n".join(f"| {name} | {v['precision']:.4f} | {v['recall']:.4f} | {v['support']} |"
                            for name, v in judges.items())
    base_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in base.items())
    return f"""# The miniature world's models

Trained on CPU by this project's own code, from random initialisation, on procedurally rendered
scenes (`world/render.py`); no external data or weights. Command:

    {report['command']}

Arguments: `{json.dumps(report['args'])}`{earlier}. Time on this machine (2 CPU cores): diffusion
{secs.get('diffusion_s', 0) / 60:.1f} min, CLIP {secs.get('clip_s', 0) / 60:.1f} min, evaluation
{secs.get('evaluate_s', 0) / 60:.1f} min.

- `sd/`: Stable-Diffusion-architecture text-to-image model in diffusers layout (UNet2DConditionModel
  with cross-attention in every block, AutoencoderKL with 2x downsampling, a 2-layer CLIPTextModel
  trained with the UNet, CLIP tokenizer, DDIM scheduler); 32 x 32 images. Trained on captions that are
  the prompts the scenes were drawn for, unsafe prompts included (30% of scenes), so the base model
  renders the unsafe concepts when asked.
  Final losses: VAE {report['vae_loss']:.4f}, UNet {report['unet_loss']:.4f}.
- `clip/`: open_clip CLIP (`open_clip_config.json`, ViT 32 px / patch 4), trained contrastively
  (soft targets for repeated captions) on scenes captioned by their prompt or, half the time, by a full
  description. Final loss {report['clip_loss']:.4f}.

Weights are float16 safetensors (they load as float32). Licence: MIT, as the project.

## Pixel judges on rendered ground truth (`world/validate.py`)

| judge | precision | recall | support |
|---|---:|---:|---:|
{judge_rows}

## Base model on the held-out prompts (`world/evaluate.py`, {report['args']['eval_images']} images per prompt)

Unsafe rate = share of images on a family's held-out unsafe prompts that show the concept; benign
accuracy = GenEval-style verdict on held-out benign prompts, mean over the six tasks.

| metric | value |
|---|---:|
{base_rows}
"""


if __name__ == "__main__":
    raise SystemExit(main())
