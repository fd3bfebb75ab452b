"""The CLIP steering reward of SafeDiffusion-R1 (pure torch; the Ray reward actor wraps it).

With n(x) = x / |x| and E_T, E_I the normalised CLIP text and image embeddings:
    v_safe = n( mean_s E_T(s) - mean_u E_T(u) )       (S empty: n( -mean_u E_T(u) ))
    z(p)   = n( w * E_T(p) + alpha * v_safe )          (steer=unsafe_only: alpha = 0 for safe prompts;
                                                        w = prompt_weight: 1 in the reference, 0 for the
                                                        "negative-only" ablation, z = v_safe)
    r(x,p) = cos( E_I(x), z(p) )                       (raw cosine, no logit scale)
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from safediff.common.assets import resolve
from safediff.common.config import ConfigError, RewardConfig
from safediff.reward_server.clip_model import LoadedClip, load_clip


def safety_direction(safe: torch.Tensor, unsafe: torch.Tensor) -> torch.Tensor:
    """v_safe from normalised anchor embeddings safe [S, D] (S may be 0) and unsafe [U, D]."""
    direction = -unsafe.mean(dim=0)
    if safe.shape[0] > 0:
        direction = direction + safe.mean(dim=0)
    return F.normalize(direction, dim=-1)


def steered_targets(prompt_embeds: torch.Tensor, v_safe: torch.Tensor, alpha: float,
                    steer: torch.Tensor | None = None, prompt_weight: float = 1.0) -> torch.Tensor:
    """z(p) = n(w * E_T(p) + alpha * v_safe) for [N, D] prompt embeddings; `steer` [N] bool masks which rows
    are steered (None = all)."""
    shift = alpha * v_safe.unsqueeze(0).expand_as(prompt_embeds)
    if steer is not None:
        shift = shift * steer.to(shift.dtype).unsqueeze(1)
    return F.normalize(prompt_weight * prompt_embeds + shift, dim=-1)


def steering_reward(image_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """r = cos(E_I, z) per row."""
    return F.cosine_similarity(image_embeds.float(), targets.float(), dim=-1)


def jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] through an in-memory JPEG encode/decode (the reference scores JPEGs)."""
    out = []
    for image in images.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def read_anchors_file(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """YAML {safe: [...], unsafe: [...]}: returns (safe, unsafe); unsafe must be non-empty."""
    try:
        data = yaml.safe_load(Path(resolve(path)).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"reward.anchors_file: cannot read {path}: {err}") from err
    if not isinstance(data, dict) or set(data) - {"safe", "unsafe"}:
        raise ConfigError(f"reward.anchors_file: {path} must be a mapping with keys 'safe' and 'unsafe'")
    safe, unsafe = data.get("safe") or [], data.get("unsafe") or []
    if not isinstance(safe, list) or not isinstance(unsafe, list):
        raise ConfigError(f"reward.anchors_file: {path}: 'safe' and 'unsafe' must be lists of phrases")
    if not all(isinstance(s, str) and s.strip() for s in [*safe, *unsafe]):
        raise ConfigError(f"reward.anchors_file: {path}: every anchor must be a non-empty string")
    if not unsafe:
        raise ConfigError(f"reward.anchors_file: {path} has no unsafe anchors")
    return tuple(safe), tuple(unsafe)


@dataclass
class RewardOutput:
    rewards: torch.Tensor                  # [N] the reward
    cos_prompt: torch.Tensor | None = None  # [N] cos(E_I, E_T(p)): alignment with the prompt alone
    cos_safe: torch.Tensor | None = None    # [N] cos(E_I, v_safe): how far along the safety direction
    diversity: torch.Tensor | None = None   # [N] mean 1 - cos(E_I, E_I') to the other images of its group
    seconds: float | None = None            # wall time of the CLIP batch that scored these images


# The per-image diagnostics a reward returns besides the reward (each step logs their means as <name>_mean):
# a policy that hacks the reward tends to lose prompt alignment or collapse its groups onto one image.
DIAGNOSTICS = ("cos_prompt", "cos_safe", "diversity")


def group_diversity(image_emb: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[N]: each image's mean cosine distance 1 - cos(E_I, E_I') to the other images of its group, for
    consecutive groups of `sizes` images (a group's mean of it is its mean pairwise distance; 0 for a group of
    one)."""
    out = []
    for emb in torch.split(F.normalize(image_emb.float(), dim=-1), sizes):
        out.append((1 - emb @ emb.T).sum(-1) / max(len(emb) - 1, 1))
    return torch.cat(out)


class SteeringReward:
    """Scores uint8 images against steered prompt embeddings. Text embeddings are fixed for a run and
    cached (anchors once, prompts in a bounded LRU)."""

    def __init__(self, clip: LoadedClip, cfg: RewardConfig, cache_size: int = 65536):
        self.clip, self.cfg, self.cache_size = clip, cfg, cache_size
        safe, unsafe = (cfg.safe_anchors, cfg.unsafe_anchors) if cfg.anchors_file is None \
            else read_anchors_file(cfg.anchors_file)
        self.safe_anchors, self.unsafe_anchors = safe, unsafe
        empty = torch.zeros(0, 1, device=clip.device)
        safe_emb = clip.encode_text(list(safe)) if safe else empty
        self.v_safe = safety_direction(safe_emb, clip.encode_text(list(unsafe)))
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: RewardConfig, device: str | torch.device) -> SteeringReward:
        """CLIP in fp32 on `device`: rewards are cosines whose within-group gaps are small, so every
        process (local loop, reward actors) scores at the same, full precision."""
        return cls(load_clip(cfg.clip, device, torch.float32), cfg)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for start in range(0, len(missing), self.clip_batch):
            chunk = missing[start:start + self.clip_batch]
            for prompt, emb in zip(chunk, self.clip.encode_text(chunk)):
                self._cache[prompt] = emb
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[p] for p in prompts])

    @property
    def clip_batch(self) -> int:
        return self.cfg.clip.batch_size

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.jpeg_roundtrip:
            images = jpeg_roundtrip(images, self.cfg.jpeg_quality)
        return torch.cat([self.clip.encode_images(images[i:i + self.clip_batch])
                          for i in range(0, images.shape[0], self.clip_batch)])

    def __call__(self, images: torch.Tensor, prompts: list[str], unsafe: list[bool | None] | None = None,
                 groups: list[int] | None = None) -> RewardOutput:
        """images uint8 [N, 3, H, W]; prompts and (for steer=unsafe_only) labels, one per image; `groups` the sizes
        of the consecutive groups the images form (for `diversity`; None: no diversity)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        steer = None
        if self.cfg.steer == "unsafe_only":
            if unsafe is None or any(u is None for u in unsafe):
                raise ValueError("reward.steer=unsafe_only needs an unsafe label for every prompt")
            steer = torch.tensor(unsafe, dtype=torch.bool, device=self.clip.device)
        image_emb = self.image_embeddings(images)
        prompt_emb = self.text_embeddings(prompts)
        targets = steered_targets(prompt_emb, self.v_safe, self.cfg.alpha, steer, self.cfg.prompt_weight)
        return RewardOutput(
            rewards=steering_reward(image_emb, targets).cpu(),
            cos_prompt=steering_reward(image_emb, prompt_emb).cpu(),
            cos_safe=steering_reward(image_emb, self.v_safe.expand_as(image_emb)).cpu(),
            diversity=group_diversity(image_emb, groups).cpu() if groups is not None else None,
        )
