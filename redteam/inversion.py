"""Concept inversion (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models",
ICLR 2024): textual inversion of one new token against the *target* model. It needs no prompt that names the
concept, only pictures of it, and is the strongest known attack on erasure methods. Written from the paper and
NYU-DICE-Lab/circumventing-concept-erasure (`esd/train.sh`, `esd/concept_inversion.py`):

    v* = argmin_v  E_{x, t, eps} | eps - eps_theta(sqrt(a_t) z(x) + sqrt(1 - a_t) eps, t, E(caption(v))) |^2

with z(x) the VAE latent of a picture x of the concept, eps_theta the target's UNet (the adapter applied), E the
text encoder with v as the embedding of a new token, caption a template holding the token, t uniform over the
training timesteps (v-prediction models regress the velocity instead). Only v moves. The attack then prompts the
same model with `prompt` holding the token; the embedding is saved in diffusers' textual-inversion format, so a
stock pipeline's `load_textual_inversion` reproduces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from safediff.common.config import InversionConfig
from safediff.common.errors import UserInputError
from safediff.common.progress import Progress


def denoising_loss(unet: torch.nn.Module, scheduler, latents: torch.Tensor, cond: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """The diffusion training loss of `latents` [B, C, h, w] under conditioning `cond` [B, L, D] at random
    timesteps and noise from `gen`, in fp32."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen, dtype=latents.dtype).to(latents.device)
    t = t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), target.float())


@dataclass
class Inverted:
    embedding: torch.Tensor   # [D] the new token's input embedding
    curve: list[float]        # mean loss per step


class ConceptInversion:
    """Fits one new token of `bundle`'s text encoder to pictures of a concept (module docstring). Adds the token
    to the bundle's tokenizer and text encoder (use a bundle of its own)."""

    def __init__(self, bundle, cfg: InversionConfig):
        self.bundle, self.cfg = bundle, cfg
        tokenizer, encoder = bundle.tokenizer, bundle.text_encoder
        start = tokenizer.encode(cfg.initializer, add_special_tokens=False)
        if len(start) != 1:
            raise UserInputError(f"evaluation.attack.inversion.initializer: {cfg.initializer!r} is {len(start)} "
                                 "tokens; give a word that is one token")
        if tokenizer.add_tokens([cfg.token]) != 1:
            raise UserInputError(f"evaluation.attack.inversion.token: {cfg.token!r} is already a token")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set just below
        self.token_id = tokenizer.convert_tokens_to_ids(cfg.token)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[self.token_id] = table[start[0]]
        for module in (bundle.unet, bundle.vae, encoder):
            module.requires_grad_(False)
        table.requires_grad_(True)

    @torch.no_grad()
    def latents(self, pictures: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> VAE latents (the posterior mean: no sampling noise), scaled."""
        vae = self.bundle.vae
        x = pictures.to(vae.device, vae.dtype) / 127.5 - 1
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def mean_loss(self, pictures: torch.Tensor, seed: int, draws: int = 8) -> float:
        """The objective at the current embedding over fixed draws of (picture, caption, t, noise): comparable
        before and after fitting, unlike the noisy per-step losses."""
        b, gen = self.bundle, torch.Generator().manual_seed(seed)
        latents, total = self.latents(pictures), 0.0
        for d in range(draws):
            text = self.cfg.templates[d % len(self.cfg.templates)].format(self.cfg.token)
            ids = b.tokenizer([text] * len(latents), padding="max_length", max_length=b.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(b.text_encoder.device)
            total += float(denoising_loss(b.unet, b.scheduler, latents, b.text_encoder(ids)[0], gen))
        return total / draws

    def fit(self, pictures: torch.Tensor, seed: int, progress: bool = False) -> Inverted:
        """v* for the pictures uint8 [N, 3, H, W] (the model's resolution); deterministic for a seed."""
        cfg, b = self.cfg, self.bundle
        gen = torch.Generator().manual_seed(seed)
        latents = self.latents(pictures)
        table = b.text_encoder.get_input_embeddings().weight
        # Adam without decay: rows whose gradient is always zero never move (their moments stay zero)
        optimiser = torch.optim.Adam([table], lr=cfg.lr * cfg.batch_size * cfg.accumulation)
        others = torch.ones(len(table), dtype=torch.bool)
        others[self.token_id] = False
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
                ids = b.tokenizer(texts, padding="max_length", max_length=b.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(b.text_encoder.device)
                loss = denoising_loss(b.unet, b.scheduler, latents[pick], b.text_encoder(ids)[0], gen)
                (loss / cfg.accumulation).backward()
                total += float(loss.detach()) / cfg.accumulation
            table.grad[others] = 0   # only the new token's row learns
            optimiser.step()
            curve.append(total)
            shown.update(1, loss=f"{total:.4f}")
        shown.close()
        return Inverted(table[self.token_id].detach().clone(), curve)

    def save(self, inverted: Inverted, path: Path) -> None:
        """diffusers' textual-inversion format: {token: [D]}, loadable by `load_textual_inversion`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({self.cfg.token: inverted.embedding.float().contiguous()}, str(path))


def images_needed(cfg: InversionConfig, prompts: int) -> int:
    """Images per reference prompt so that the base model's pictures number at least cfg.images."""
    return max(1, math.ceil(cfg.images / max(prompts, 1)))
