"""Concept inversion (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models",
ICLR 2024): textual inversion of one new token against the *target* model. It needs no prompt that names the
concept, only pictures of it, and is the strongest known attack on erasure methods. Written from the paper and
NYU-DICE-Lab/circumventing-concept-erasure (`esd/train.sh`, `esd/concept_inversion.py`):

    v* = argmin_v  E_{x, t, eps} L_denoise(z(x), t, eps; E(caption(v)))

with z(x) the VAE latent of a picture x of the concept, E the model's text encoding with v as the embeddings of a
new token, caption a template holding the token, and L_denoise the family's own training loss with the adapter
applied (common/family.py `denoising_loss`): for SD 1.x/2.x the epsilon (or velocity) regression at t uniform over
the training timesteps, as the paper; for SD3 and FLUX.1 the rectified-flow regression at logit-normal noise levels,
as they were trained (the paper attacks SD 1.4 only; this is the same attack on a flow model's objective). A model
with several text encoders gets the token in each (SD3: CLIP-L, CLIP-G, T5 when present; FLUX.1: CLIP-L and T5),
every encoder's row initialised from the same word and fitted jointly. Only those rows move. The attack then prompts
the same model with `prompt` holding the token; the embeddings are saved as common/text_tokens.py describes, so a
stock pipeline reproduces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from safediff.common.config import InversionConfig
from safediff.common.errors import UserInputError
from safediff.common.models import encode_images
from safediff.common.progress import Progress
from safediff.common.text_tokens import add_token, save_token_embeddings, text_encoders


@dataclass
class Inverted:
    embeddings: dict[str, torch.Tensor]   # {text encoder key: [D]} the new token's input embedding in each
    curve: list[float]                    # mean loss per step


class ConceptInversion:
    """Fits one new token of `bundle`'s text encoders to pictures of a concept (module docstring). Adds the token
    to the bundle's tokenizers and text encoders (use a bundle of its own). `guidance_scale` is the guidance input of
    a transformer that has one (FLUX.1-dev), as it samples; other models ignore it."""

    def __init__(self, bundle, cfg: InversionConfig, guidance_scale: float = 1.0):
        self.bundle, self.cfg, self.guidance_scale = bundle, cfg, guidance_scale
        self.encoders = text_encoders(bundle)
        self.token_ids: dict[str, int] = {}
        for key, (tokenizer, encoder) in self.encoders.items():
            start = tokenizer.encode(cfg.initializer, add_special_tokens=False)
            if len(start) != 1:
                where = f" for {key}" if key else ""
                raise UserInputError(f"evaluation.attack.inversion.initializer: {cfg.initializer!r} is {len(start)} "
                                     f"tokens{where}; give a word that is one token")
            try:
                self.token_ids[key] = add_token(tokenizer, encoder, cfg.token)
            except ValueError as err:
                raise UserInputError(f"evaluation.attack.inversion.token: {err}") from None
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[self.token_ids[key]] = table[start[0]]
        for module in (bundle.denoiser, bundle.vae, *(encoder for _, encoder in self.encoders.values())):
            module.requires_grad_(False)
        for table in self.tables().values():
            table.requires_grad_(True)

    def tables(self) -> dict[str, torch.Tensor]:
        """{key: [V, D]} the input embedding table of each text encoder."""
        return {key: encoder.get_input_embeddings().weight for key, (_, encoder) in self.encoders.items()}

    def loss(self, latents: torch.Tensor, texts: list[str], gen: torch.Generator) -> torch.Tensor:
        """The family's denoising loss of `latents` [B, C, h, w] captioned `texts` (B of them)."""
        cond = self.bundle.encode_prompts(texts, grad=torch.is_grad_enabled())
        return self.bundle.denoising_loss(latents, cond, gen, self.guidance_scale)

    @torch.no_grad()
    def mean_loss(self, pictures: torch.Tensor, seed: int, draws: int = 8) -> float:
        """The objective at the current embedding over fixed draws of (picture, caption, t, noise): comparable
        before and after fitting, unlike the noisy per-step losses."""
        gen = torch.Generator().manual_seed(seed)
        latents, total = encode_images(self.bundle.vae, pictures), 0.0
        for d in range(draws):
            text = self.cfg.templates[d % len(self.cfg.templates)].format(self.cfg.token)
            total += float(self.loss(latents, [text] * len(latents), gen))
        return total / draws

    def fit(self, pictures: torch.Tensor, seed: int, progress: bool = False) -> Inverted:
        """v* for the pictures uint8 [N, 3, H, W] (the model's resolution); deterministic for a seed."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed)
        latents = encode_images(self.bundle.vae, pictures)
        tables = self.tables()
        # Adam without decay: rows whose gradient is always zero never move (their moments stay zero)
        optimiser = torch.optim.Adam(list(tables.values()), lr=cfg.lr * cfg.batch_size * cfg.accumulation)
        others = {}
        for key, table in tables.items():
            others[key] = torch.ones(len(table), dtype=torch.bool)
            others[key][self.token_ids[key]] = False
        curve, caption = [], 0
        shown = Progress(cfg.steps, "inversion", "step", enabled=progress)
        for _ in range(cfg.steps):
            optimiser.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.accumulation):
                pick = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
                texts = [cfg.templates[(caption + i) % len(cfg.templates)].format(cfg.token)
                         for i in range(cfg.batch_size)]
                caption += cfg.batch_size
                loss = self.loss(latents[pick], texts, gen)
                (loss / cfg.accumulation).backward()
                total += float(loss.detach()) / cfg.accumulation
            for key, table in tables.items():
                table.grad[others[key]] = 0   # only the new token's rows learn
            optimiser.step()
            curve.append(total)
            shown.update(1, loss=f"{total:.4f}")
        shown.close()
        return Inverted({key: table[self.token_ids[key]].detach().clone() for key, table in tables.items()}, curve)

    def save(self, inverted: Inverted, path: Path) -> None:
        """The token's embeddings in common/text_tokens.py's format (one encoder: diffusers' {token: [D]})."""
        save_token_embeddings(path, self.cfg.token, inverted.embeddings)


def images_needed(cfg: InversionConfig, prompts: int) -> int:
    """Images per reference prompt so that the base model's pictures number at least cfg.images."""
    return max(1, math.ceil(cfg.images / max(prompts, 1)))
