"""UnlearnDiff (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to
Generate Unsafe Images ... For Now", ECCV 2024): prompt-token optimisation against the *target* model with the
diffusion classifier's objective. Written from the paper and OPTML-Group/Diffusion-MU-Attack
(`src/attackers/text_grad_.py`, `src/tasks/classifier_.py`):

    tokens x (k of them, put before the prompt) minimise   E_eps | eps - eps_theta(x_t(z, eps), t, E([x; prompt])) |^2

where z is the latent of a reference picture of the concept for that prompt (here: the base model's own image of
the prompt with its seed), t runs over `timesteps` values spread evenly over the schedule, `iterations` steps
each. Each of the k positions holds a distribution u_i over the vocabulary (uniform at first); a step draws one
token per position from u (the embedding is the drawn one-hot times the embedding table), and the gradient
passes straight through the draw, clipped to [-1, 1] (hardtanh); Adam updates u, which is then projected back
onto the probability simplex. The adversarial prompt is the most likely token of each position, then the prompt.

Differs from the reference: it judges the prompt after every timestep and stops at the first success (ASR =
success at any of up to 50 checkpoints); here only the final prompt is judged (by `safediff attack`, like every
attack), so the ASR is a lower bound of the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safediff.common.config import UnlearnDiffConfig


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v [k, V] onto {u >= 0, sum u = 1} (sort-based, exact)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    excess = u.cumsum(-1) - 1
    rank = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - excess / rank > 0).sum(-1, keepdim=True)           # how many entries stay positive
    theta = excess.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp(min=0)


class _DrawStraightThrough(torch.autograd.Function):
    """Forward: one token per row drawn from the row's distribution, as one-hot rows. Backward: the incoming
    gradient clipped to [-1, 1], as if the draw were the identity."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        drawn = torch.multinomial(probs.detach().cpu(), 1, generator=gen).flatten()
        return F.one_hot(drawn, probs.shape[-1]).to(probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


def optimise_tokens(u: torch.Tensor, loss_of, table: torch.Tensor, steps: int, optimiser: torch.optim.Optimizer,
                    gen: torch.Generator) -> float:
    """`steps` updates of the token distributions u [k, V] (a leaf the optimiser holds) on loss_of(embeddings
    [k, D]) of tokens drawn from u (module docstring); u stays on the simplex. Returns the mean loss."""
    total = 0.0
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_of(_DrawStraightThrough.apply(u, gen) @ table)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            u.copy_(project_simplex(u))
        total += float(loss.detach()) / steps
    return total


class UnlearnDiff:
    def __init__(self, bundle, cfg: UnlearnDiffConfig):
        self.bundle, self.cfg = bundle, cfg
        for module in (bundle.unet, bundle.vae, bundle.text_encoder):
            module.requires_grad_(False)
        self.table = bundle.text_encoder.get_input_embeddings().weight.detach()   # [V, D]
        self.positions: slice | None = None
        self.replacement: torch.Tensor | None = None
        # the adversarial embeddings enter through the token-embedding layer's output
        bundle.text_encoder.get_input_embeddings().register_forward_hook(self._replace)

    def _replace(self, module, inputs, output):
        if self.replacement is None:
            return output
        output = output.clone()
        output[:, self.positions] = self.replacement.to(output.dtype)
        return output

    def sampled_timesteps(self) -> list[int]:
        """`timesteps` values spread evenly over the schedule, from the middle of the first stretch."""
        total, n = self.bundle.scheduler.config.num_train_timesteps, self.cfg.timesteps
        return list(range(total // n // 2, total, max(total // n, 1)))[:n]

    def ids(self, prompt: str, adversarial: list[int]) -> torch.Tensor:
        """[1, L]: bos, the k adversarial tokens, the prompt's tokens, eos padding (truncated to L)."""
        tok = self.bundle.tokenizer
        words = tok.encode(prompt, add_special_tokens=False)
        body = (adversarial + words)[: tok.model_max_length - 2]
        pad = [tok.eos_token_id] * (tok.model_max_length - 1 - len(body))
        return torch.tensor([[tok.bos_token_id, *body, *pad]])

    @torch.no_grad()
    def latent(self, picture: torch.Tensor) -> torch.Tensor:
        vae = self.bundle.vae
        x = picture[None].to(vae.device, vae.dtype) / 127.5 - 1
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    def attack(self, prompt: str, picture: torch.Tensor, seed: int) -> dict:
        """The adversarial prompt for `prompt` and its reference picture uint8 [3, H, W]; deterministic for a
        seed. Returns {prompt, tokens, curve (mean loss per timestep)}."""
        b, cfg, k = self.bundle, self.cfg, self.cfg.tokens
        gen = torch.Generator().manual_seed(seed)
        z = self.latent(picture)
        u = torch.full((k, len(self.table)), 1.0 / len(self.table), device=self.table.device, requires_grad=True)
        optimiser = torch.optim.Adam([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
        ids = self.ids(prompt, [b.tokenizer.eos_token_id] * k).to(b.text_encoder.device)
        self.positions = slice(1, 1 + k)
        alphas, table = b.scheduler.alphas_cumprod, self.table.float()

        def loss_at(t: int):
            def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
                self.replacement = embeddings
                cond = b.text_encoder(ids)[0]
                noise = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
                a = alphas[t].to(z.device, z.dtype)
                pred = b.unet(a.sqrt() * z + (1 - a).sqrt() * noise, torch.tensor([t], device=z.device),
                              encoder_hidden_states=cond).sample
                return F.mse_loss(pred.float(), noise.float())
            return loss_of

        try:
            curve = [optimise_tokens(u, loss_at(t), table, cfg.iterations, optimiser, gen)
                     for t in self.sampled_timesteps()]
        finally:
            self.replacement = None
        tokens = u.detach().argmax(-1).tolist()
        words = b.tokenizer.encode(prompt, add_special_tokens=False)
        return {"prompt": b.tokenizer.decode(tokens + words), "tokens": tokens, "curve": curve}
