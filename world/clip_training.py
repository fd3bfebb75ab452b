"""Contrastive training of a tiny open_clip model on the world's (image, caption) pairs, on CPU.

Loss: symmetric InfoNCE over the batch with CLIP's learned temperature, except that the targets are
*soft*: many scenes share a caption, so every pair in the batch with an identical caption counts as a
positive (target = uniform over them) instead of as a false negative.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from safediff.common.progress import Progress
from safediff.reward_server.clip_model import preprocess

WORLD_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def soft_targets(captions: list[str]) -> torch.Tensor:
    """[B, B]: row i spreads 1 over the batch items whose caption equals caption i."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of scaled cosine logits against soft targets (both embeddings normalised)."""
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
    return 0.5 * (-(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
                  - (targets.T * F.log_softmax(logits.T, dim=1)).sum(1).mean())


def train_clip(model: open_clip.CLIP, images: torch.Tensor, captions: list[str], steps: int,
               batch_size: int = 256, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> float:
    """Train in place (AdamW, cosine decay to 0); returns the last loss. `images`: uint8 [N, 3, 32, 32]."""
    gen = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    # the preprocessing `build_tiny_clip` records in open_clip_config.json, which `load_clip` applies
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    pixels = preprocess(images, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    texts = sorted(set(captions))
    tokens = tokenizer(texts)  # each distinct caption once
    position = {t: i for i, t in enumerate(texts)}
    index = torch.tensor([position[c] for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train().requires_grad_(True)
    loss = torch.tensor(float("nan"))
    bar = Progress(steps, "clip", "step", enabled=progress)
    for _ in range(steps):
        idx = torch.randint(len(pixels), (batch_size,), generator=gen)
        batch_captions = [captions[i] for i in idx.tolist()]
        image_emb = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens[index[idx]]), dim=-1)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale, soft_targets(batch_captions))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        bar.update(1, loss=f"{loss.item():.3f}")
    bar.close()
    model.eval().requires_grad_(False)
    return float(loss.detach())
