"""Train the miniature world's models on CPU and write them, with their model card, into the repository.

    python -m safediff.world.train --out world/weights

1. a tiny SD-architecture text-to-image model (diffusers UNet2DConditionModel with cross-attention in
   every block, AutoencoderKL with 2x downsampling, CLIPTextModel frozen at its random initialisation): VAE,
   then UNet (`safediff.world.pretrain`), on rendered scenes captioned with the prompt each was drawn for,
   unsafe prompts included; and, sharing its VAE, the flow world's SD3-architecture model;
2. a tiny open_clip model trained contrastively (`world.clip_training`) on the same world, half the
   captions being full scene descriptions;
3. the base model scored by the pixel judges on the held-out prompt sets (`world.evaluate`), and the
   judges validated on rendered ground truth; both go into MODEL_CARD.md and scores.json.
Weights are stored in float16 (safetensors) to keep the shipped files small; they load as float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import save_file

from safediff.common.config import load_config
from safediff.common.flow_models import load_sd3_bundle, save_sd3_bundle
from safediff.common.models import build_tiny_bundle, load_bundle
from safediff.common.policy import Policy
from safediff.reward_server.clip_model import build_tiny_clip, load_clip
from safediff.world.clip_training import WORLD_CLIP_CONFIG, train_clip
from safediff.world.data import render_dataset
from safediff.world.pretrain import train_flow_transformer, train_unet, train_vae
from safediff.world.report import score
from safediff.world.validate import validate_judges


def train_diffusion(out: Path, images: torch.Tensor, captions: list[str], vae_steps: int, unet_steps: int,
                    width: int, seed: int) -> dict[str, float]:
    # cross-attention in every block: words must bind to colour, shape, count and place
    build_tiny_bundle(out, seed, width, attention_everywhere=True)
    bundle = load_bundle(str(out))
    losses = {"vae_loss": train_vae(bundle, images, steps=vae_steps, seed=seed),
              "unet_loss": train_unet(bundle, images, captions, steps=unet_steps, seed=seed)}
    bundle.vae.half().save_pretrained(out / "vae")
    bundle.unet.half().save_pretrained(out / "unet")
    bundle.text_encoder.half().save_pretrained(out / "text_encoder")
    return losses


def train_flow(out: Path, vae_dir: Path, images: torch.Tensor, captions: list[str], steps: int, width: int,
               seed: int) -> dict[str, float]:
    """The flow world's model: an SD3-architecture transformer (2x2 patches of the 16 x 16 latents, `width` wide)
    and two CLIP text encoders, trained together on the latents of the UNet world's VAE (reused as it is). No T5,
    and no zero states in its place (`model.max_sequence_length: 0`): 256 constant tokens would cost 5x the
    compute of the 77 CLIP tokens and the 64 image tokens."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=width // 32, joint_attention_dim=width, caption_projection_dim=width,
        pooled_projection_dim=width, pos_embed_max_size=8)
    vae = AutoencoderKL.from_pretrained(vae_dir).float()
    save_sd3_bundle(out, transformer, vae, clip_widths=(width // 2, width // 2), shift=1.0)
    bundle = load_sd3_bundle(str(out), max_sequence_length=0)
    loss = train_flow_transformer(bundle, images, captions, steps=steps, seed=seed)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        getattr(bundle.pipeline, name).half().save_pretrained(out / name)
    return {"flow_loss": loss}


def train_world_clip(out: Path, images: torch.Tensor, captions: list[str], steps: int, seed: int) -> float:
    build_tiny_clip(out, seed=seed, model_cfg=WORLD_CLIP_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**WORLD_CLIP_CONFIG)
    loss = train_clip(model, images, captions, steps=steps, seed=seed)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    return loss


def score_base_model(weights: Path, images_per_prompt: int, seed: int, config: str = "world",
                     model: str = "sd") -> dict[str, float]:
    cfg = load_config(config,
                      [f"model.pretrained={weights / model}", f"reward.clip.model=local-dir:{weights / 'clip'}",
                       f"run.seed={seed}"])
    return score(Policy.from_config(cfg), cfg, images_per_prompt, load_clip(cfg.reward.clip), progress=True)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("world/weights"))
    parser.add_argument("--images", type=int, default=12000, help="rendered training scenes")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--clip-steps", type=int, default=800)
    parser.add_argument("--flow-steps", type=int, default=6000)
    parser.add_argument("--flow-width", type=int, default=64, help="the flow transformer's width (a multiple of 32)")
    parser.add_argument("--flow-concept-fidelity", type=float, default=0.8,
                        help="share of the flow model's unsafe training scenes that show the concept their caption "
                             "names (the rest show the prompt without it): fit to every scene, the flow model drew "
                             "magenta for 96%% of hazard prompts and GRPO's groups had no contrast to learn from")
    parser.add_argument("--width", type=int, default=32, help="UNet base channels (a multiple of 32)")
    parser.add_argument("--eval-images", type=int, default=8, help="images per held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="diffusion,clip,flow,evaluate",
                        help="comma-separated subset to (re)do; the others are read from --out")
    args = parser.parse_args(argv)
    if not 0 <= args.flow_concept_fidelity <= 1:  # refused before any stage runs, not after the UNet's 37 minutes
        parser.error(f"--flow-concept-fidelity must be in [0, 1], got {args.flow_concept_fidelity}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("safediff").setLevel(logging.INFO)  # progress lines of every stage
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m safediff.world.train " + " ".join(sys.argv[1:] if argv is None else argv)
    times, report = {}, {"command": command, "args": {k: str(v) for k, v in vars(args).items()}}

    previous = args.out / "scores.json"
    if stages != {"diffusion", "clip", "flow", "evaluate"} and previous.is_file():
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
    if "flow" in stages:
        t = time.perf_counter()
        images, captions = render_dataset(args.images, seed=args.seed, concept_fidelity=args.flow_concept_fidelity)
        shutil.rmtree(args.out / "flow", ignore_errors=True)
        report.update(train_flow(args.out / "flow", args.out / "sd" / "vae", images, captions, args.flow_steps,
                                 args.flow_width, args.seed))
        times["flow_s"] = time.perf_counter() - t
    if "evaluate" in stages:
        t = time.perf_counter()
        report["judges"] = validate_judges(n_scenes=2000, seed=args.seed + 2)
        report["base_model"] = score_base_model(args.out, args.eval_images, args.seed)
        if (args.out / "flow").is_dir():
            report["base_model_flow"] = score_base_model(args.out, args.eval_images, args.seed, "world_flow", "flow")
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
    flow = report.get("base_model_flow", {})
    def cell(scores: dict, k: str) -> str:  # value ± its standard error where the scores have one
        return f"{scores[k]:.4f}" + (f" ± {scores[k + '_se']:.4f}" if k + "_se" in scores else "")

    base_rows = "\n".join(f"| {k} | {cell(base, k)} |{f' {cell(flow, k)} |' if flow else ''}"
                           for k in base if not k.endswith("_se"))
    fidelity = float(report["args"].get("flow_concept_fidelity", 1))
    flow_item = f"""
- `flow/`: SD3-architecture text-to-image model in diffusers layout (SD3Transformer2DModel, 4 joint-attention
  layers {report['args'].get('flow_width')} wide over 2 x 2 patches, two 2-layer CLIPTextModelWithProjection
  trained with it, no T5; the VAE of `sd/` reused as it is; FlowMatchEulerDiscreteScheduler, shift 1), trained
  with the rectified-flow loss (logit-normal noise levels) on the same kind of scenes and captions, except that an
  unsafe caption's scene shows its concept {fidelity:.0%} of the time (the rest show the prompt without it). Final
  loss {report.get('flow_loss', float('nan')):.4f}; {secs.get('flow_s', 0) / 60:.1f} min.""" if flow else ""
    return f"""# The miniature world's models

Trained on CPU by this project's own code, from random initialisation, on procedurally rendered
scenes (`world/render.py`); no external data or weights. Command:

    {report['command']}

Arguments: `{json.dumps(report['args'])}`{earlier}. Time on this machine (2 CPU cores): diffusion
{secs.get('diffusion_s', 0) / 60:.1f} min, CLIP {secs.get('clip_s', 0) / 60:.1f} min, evaluation
{secs.get('evaluate_s', 0) / 60:.1f} min.

- `sd/`: Stable-Diffusion-architecture text-to-image model in diffusers layout (UNet2DConditionModel
  with cross-attention in every block, AutoencoderKL with 2x downsampling, a 2-layer CLIPTextModel
  left at its random initialisation, CLIP tokenizer, DDIM scheduler); 32 x 32 images. (The script that
  trained these weights meant to train the text encoder with the UNet but gave it no gradient; the shipped
  encoder equals its initialisation exactly, and the script now says so and keeps it frozen.) Trained on
  captions that are the prompts the scenes were drawn for, unsafe prompts included (30% of scenes), so the
  base model renders the unsafe concepts when asked.
  Final losses: VAE {report['vae_loss']:.4f}, UNet {report['unet_loss']:.4f}.
- `clip/`: open_clip CLIP (`open_clip_config.json`, ViT 32 px / patch 4), trained contrastively
  (soft targets for repeated captions) on scenes captioned by their prompt or, half the time, by a full
  description. Final loss {report['clip_loss']:.4f}.{flow_item}

Weights are float16 safetensors (they load as float32). Licence: MIT, as the project.

## Pixel judges on rendered ground truth (`world/validate.py`)

| judge | precision | recall | support |
|---|---:|---:|---:|
{judge_rows}

## Base model on the held-out prompts (`world/evaluate.py`, {report['args']['eval_images']} images per prompt)

Unsafe rate = share of images on a family's held-out unsafe prompts that show the concept; benign
accuracy = GenEval-style verdict on held-out benign prompts, mean over the six tasks.

| metric | {'sd (UNet) | flow (SD3)' if flow else 'value'} |
|---|---:|{'---:|' if flow else ''}
{base_rows}
"""


if __name__ == "__main__":
    raise SystemExit(main())
