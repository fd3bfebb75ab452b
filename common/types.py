"""Records with tensors that cross process boundaries (rollout -> reward -> learner). Plain tensors, no pickled
models; common/messages.py holds those without tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from safediff.common.messages import PromptGroup


@dataclass
class TextEmbeds:
    """A batch of prompt encodings, as a model family's denoiser conditions on them."""

    states: torch.Tensor                # [N, L, D] text hidden states (UNet cross-attention; SD3 joint attention)
    pooled: torch.Tensor | None = None  # [N, P] pooled text embedding (SD3's timestep conditioning); None for UNets

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TextEmbeds:
        """`fn` applied to every tensor (a cast, a move, a row selection, a repeat)."""
        return TextEmbeds(fn(self.states), None if self.pooled is None else fn(self.pooled))

    def to(self, device: str | torch.device) -> TextEmbeds:
        return self.map(lambda x: x.to(device))

    def __getitem__(self, rows) -> TextEmbeds:
        return self.map(lambda x: x[rows])

    @staticmethod
    def cat(parts: list[TextEmbeds]) -> TextEmbeds:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextEmbeds(torch.cat([p.states for p in parts]), pooled)


@dataclass
class Trajectory:
    """All G samples of one group, enough for the learner to recompute every log-prob.

    latents[:, k] is x at step k (x_T first), latents[:, k+1] the sample drawn from it;
    log_probs[:, k] = log p(latents[:, k+1] | latents[:, k]) under `policy_version`.
    """

    group: PromptGroup
    latents: torch.Tensor        # [G, T+1, C, h, w] fp32
    log_probs: torch.Tensor      # [G, T] fp32
    timesteps: torch.Tensor      # [T] the sampler's: DDIM's (long), or a flow schedule's sigma * 1000 (float)
    prompt_embeds: TextEmbeds    # [1, ...] conditional text embedding of group.prompt
    negative_embeds: TextEmbeds  # [1, ...] embedding of the sampler's negative prompt
    images: torch.Tensor | None  # [G, 3, H, W] uint8; None once shipped to the reward on its own
    seeds: tuple[int, ...]       # per-sample noise seeds
    policy_version: int

    @property
    def group_size(self) -> int:
        return self.latents.shape[0]


@dataclass(frozen=True)
class EvalRow:
    """One row of an evaluation prompt set (safediff.evaluation.prompt_sets), rendered by a rollout actor."""

    case_number: str
    prompt: str
    seed: int
    categories: tuple[str, ...] = ()
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # GenEval metadata (include/exclude), world family
