"""Supervised pre-training of a small SD-architecture model on (image, caption) pairs, on CPU.

A random model is a meaningless policy (its VAE maps every latent to nearly the same image), so the
tests and demos train a tiny one first: the VAE as an autoencoder (MSE + small KL), then its latent
scale, then the UNet (text encoder frozen) with the standard epsilon-prediction loss and 10% caption dropout (so
classifier-free guidance has an unconditional branch to contrast with). The flow world's SD3-architecture
transformer learns the rectified-flow velocity instead (`train_flow_transformer`), on the same VAE's latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safediff.common.flow_models import SD3Bundle
from safediff.common.flow_sde import logit_normal_sigmas
from safediff.common.models import ModelBundle
from safediff.common.progress import Progress


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=gen)


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, bar: Progress) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    bar.update(1, loss=f"{loss.item():.4f}")


@torch.no_grad()
def _latent_means(vae, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i:i + chunk]).latent_dist.mean for i in range(0, len(pixels), chunk)])


def train_vae(bundle: ModelBundle | SD3Bundle, images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, progress: bool = True) -> float:
    """Autoencoder training; then sets `vae.config.scaling_factor` = 1 / std(latents). Returns the last loss."""
    vae, gen = bundle.vae, torch.Generator().manual_seed(seed)
    x_all = images.float() / 127.5 - 1
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    bar = Progress(steps, "vae", "step", enabled=progress)
    for idx in _batches(len(x_all), batch_size, steps, gen):
        posterior = vae.encode(x_all[idx]).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x_all[idx]) + kl_weight * posterior.kl().mean()
        _optimise(opt, loss, bar)
    bar.close()
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=float(1.0 / _latent_means(vae, x_all).std()))
    return float(loss.detach())


def train_unet(bundle: ModelBundle, images: torch.Tensor, captions: list[str], steps: int, batch_size: int = 32,
               lr: float = 1e-3, uncond_prob: float = 0.1, seed: int = 0, progress: bool = True) -> float:
    """Epsilon-prediction training of the UNet on VAE latents, the text encoder frozen (the UNet learns to read its
    states). Returns the last loss."""
    unet, scheduler, gen = bundle.unet, bundle.scheduler, torch.Generator().manual_seed(seed)
    texts = sorted(set(captions) | {""})
    index = {t: i for i, t in enumerate(texts)}
    caption_ids = torch.tensor([index[c] for c in captions])
    empty = index[""]
    with torch.no_grad():
        latents = _latent_means(bundle.vae, images.float() / 127.5 - 1) * bundle.vae.config.scaling_factor
        context_of = bundle.encode_prompts(texts).states
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    T = scheduler.config.num_train_timesteps
    bar = Progress(steps, "unet", "step", enabled=progress)
    for idx in _batches(len(latents), batch_size, steps, gen):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < uncond_prob
        which = torch.where(drop, torch.full_like(caption_ids[idx], empty), caption_ids[idx])
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context_of[which]).sample
        loss = F.mse_loss(pred, noise)
        _optimise(opt, loss, bar)
    bar.close()
    unet.eval().requires_grad_(False)
    return float(loss.detach())


def train_flow_transformer(bundle: SD3Bundle, images: torch.Tensor, captions: list[str], steps: int,
                           batch_size: int = 32, lr: float = 1e-3, uncond_prob: float = 0.1, seed: int = 0,
                           progress: bool = True) -> float:
    """Rectified-flow training of the transformer and both CLIP text encoders together on the VAE's latents
    (scaled as SD3's pipeline scales them): x_sigma = (1 - sigma) x0 + sigma eps, target velocity eps - x0, MSE;
    10% of captions dropped to the empty prompt for classifier-free guidance. Returns the last loss."""
    pipe, vae, gen = bundle.pipeline, bundle.vae, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        means = _latent_means(vae, images.float() / 127.5 - 1)
        latents = (means - vae.config.shift_factor) * vae.config.scaling_factor
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for module in modules:
        module.train().requires_grad_(True)
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    bar = Progress(steps, "flow", "step", enabled=progress)
    for idx in _batches(len(latents), batch_size, steps, gen):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = logit_normal_sigmas(len(idx), gen)
        drop = (torch.rand(len(idx), generator=gen) < uncond_prob).tolist()
        texts = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
        states, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=x0.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=bundle.max_sequence_length)
        s = sigma[:, None, None, None]
        pred = pipe.transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                                encoder_hidden_states=states, pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        _optimise(opt, loss, bar)
    bar.close()
    for module in modules:
        module.eval().requires_grad_(False)
    return float(loss.detach())
