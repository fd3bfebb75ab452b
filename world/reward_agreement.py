"""How far the reward's CLIP agrees with the pixel judge on benign prompts, per GenEval task.

    python -m safediff.world.reward_agreement --config deploy/configs/world.yaml [--images 8]

Benign prompts are scored against their own text (`reward.steer: unsafe_only`), so GRPO can only improve a
task if, among a prompt's images, those the judge accepts score higher cos(E_I, E_T(p)). For each task this
prints the judge's accuracy on the base model's images and the AUC of the cosine for accepted against
rejected images: over all images, and within a prompt (the comparison GRPO's group advantage makes),
averaged over prompts that have both kinds. AUC 0.5 = the reward cannot tell them apart.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from safediff.common.config import load_config
from safediff.common.policy import Policy
from safediff.reward_server.clip_model import load_clip
from safediff.world.data import prompt_sets
from safediff.world.evaluate import judge_prompts
from safediff.world.scenes import BENIGN_TASKS


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U / (n+ n-))."""
    if not positive or not negative:
        return float("nan")
    p, n = torch.tensor(positive, dtype=torch.float64)[:, None], torch.tensor(negative, dtype=torch.float64)[None]
    return float((p > n).double().mean() + 0.5 * (p == n).double().mean())


def agreement(judged) -> dict[str, dict[str, float]]:
    """Per task: n images, judge accuracy, AUC over all images, mean within-prompt AUC and its prompt count."""
    pooled: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    within: dict[str, list[float]] = defaultdict(list)
    for j in judged:
        ok = [c for s, c in zip(j.satisfied, j.clip_cos) if s]
        bad = [c for s, c in zip(j.satisfied, j.clip_cos) if not s]
        pooled[j.spec.tag][0].extend(ok)
        pooled[j.spec.tag][1].extend(bad)
        if ok and bad:
            within[j.spec.tag].append(auc(ok, bad))
    out = {}
    for task in BENIGN_TASKS:
        ok, bad = pooled[task]
        if ok or bad:
            w = within[task]
            out[task] = {"images": len(ok) + len(bad), "accuracy": len(ok) / (len(ok) + len(bad)),
                         "auc": auc(ok, bad), "auc_within_prompt": sum(w) / len(w) if w else float("nan"),
                         "prompts_with_both": len(w)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("deploy/configs/world.yaml"))
    parser.add_argument("--images", type=int, default=8, help="images per prompt")
    parser.add_argument("--set", default="benign_train", choices=["benign_train", "benign_eval"])
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    judged = judge_prompts(Policy.from_config(cfg), cfg.sampler, prompt_sets()[args.set], args.images, cfg.run.seed,
                           load_clip(cfg.reward.clip))
    print(f"| task ({args.set}, base model, {args.images} images per prompt) | images | judge accuracy | AUC | "
          "AUC within a prompt (prompts) |\n|---|---:|---:|---:|---:|")
    for task, row in agreement(judged).items():
        print(f"| {task} | {row['images']} | {row['accuracy']:.2f} | {row['auc']:.2f} | "
              f"{row['auc_within_prompt']:.2f} ({row['prompts_with_both']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
