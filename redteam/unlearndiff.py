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

The loss is the family's own (common/family.py `denoising_loss`): the epsilon regression above (the velocity for a
v-prediction model) for SD 1.x/2.x, the rectified-flow regression at sigma = t / 1000 for SD3. A model with several
text encoders gets the same tokens in each, so they must share one vocabulary: SD3 without T5 (CLIP-L and CLIP-G),
not FLUX.1 or SD3 with T5, whose T5 tokenizes otherwise.

Differs from the reference: it judges the prompt after every timestep and stops at the first success (ASR =
success at any of up to 50 checkpoints); here only the final prompt is judged (by `safediff attack`, like every
attack), so the ASR is a lower bound of the reference's.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from safediff.common.config import UnlearnDiffConfig
from safediff.common.errors import UserInputError
from safediff.common.models import encode_images
from safediff.common.text_tokens import text_encoders


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
    """The attack against `bundle` (its adapter applied). `guidance_scale` is the guidance input of a transformer
    that has one, as it samples; other models ignore it."""

    PLACEHOLDER = "!"   # one ordinary token per adversarial position, its embedding replaced (not the end token:
                        # CLIP takes its pooled embedding, which SD3 conditions on, at the first end token)

    def __init__(self, bundle, cfg: UnlearnDiffConfig, guidance_scale: float = 1.0):
        self.bundle, self.cfg, self.guidance_scale = bundle, cfg, guidance_scale
        encoders = text_encoders(bundle)
        (first, (self.tokenizer, _)), *others = encoders.items()
        differ = [key for key, (tokenizer, _) in others if tokenizer.get_vocab() != self.tokenizer.get_vocab()]
        if differ:
            raise UserInputError(f"unlearndiff: the model's text encoders {', '.join(encoders)} do not share "
                                 f"one vocabulary ({', '.join(differ)} differs from {first}); its token search needs "
                                 "one (SD 1.x/2.x, or SD3 without T5)")
        for module in (bundle.denoiser, bundle.vae, *(encoder for _, encoder in encoders.values())):
            module.requires_grad_(False)
        # one table [V, D_1 + D_2 + ...]: a drawn one-hot row times it holds the token's embedding in every encoder,
        # each encoder's in its own columns
        tables = [encoder.get_input_embeddings().weight.detach().float() for _, encoder in encoders.values()]
        self.table = torch.cat(tables, dim=1)
        ends = torch.tensor([t.shape[1] for t in tables]).cumsum(0).tolist()
        self.columns = {key: slice(end - t.shape[1], end) for key, t, end in zip(encoders, tables, ends)}
        self.replacement: torch.Tensor | None = None
        for key, (_, encoder) in encoders.items():
            encoder.get_input_embeddings().register_forward_hook(partial(self._replace, key))

    def _replace(self, key: str, module, inputs, output):
        """The token-embedding layer's output with positions 1..k (after the start token) set to this encoder's
        columns of `replacement` [k, D_1 + D_2 + ...]."""
        if self.replacement is None:
            return output
        output = output.clone()
        output[:, 1:1 + self.cfg.tokens] = self.replacement[:, self.columns[key]].to(output.dtype)
        return output

    def sampled_timesteps(self) -> list[int]:
        """`timesteps` values spread evenly over the schedule, from the middle of the first stretch."""
        total, n = self.bundle.scheduler.config.num_train_timesteps, self.cfg.timesteps
        return list(range(total // n // 2, total, max(total // n, 1)))[:n]

    def text(self, prompt: str) -> str:
        """The prompt behind k placeholders, checked to tokenize as [start, k placeholders, the prompt's tokens]."""
        tok, k = self.tokenizer, self.cfg.tokens
        text = " ".join([self.PLACEHOLDER] * k + [prompt])
        mark = tok.encode(self.PLACEHOLDER, add_special_tokens=False)
        if len(mark) != 1 or tok(text).input_ids[1:1 + k] != mark * k:
            raise ValueError(f"the placeholder {self.PLACEHOLDER!r} does not tokenize as one token per position")
        return text

    def attack(self, prompt: str, picture: torch.Tensor, seed: int) -> dict:
        """The adversarial prompt for `prompt` and its reference picture uint8 [3, H, W]; deterministic for a
        seed. Returns {prompt, tokens, curve (mean loss per timestep)}."""
        b, cfg, k = self.bundle, self.cfg, self.cfg.tokens
        gen = torch.Generator().manual_seed(seed)
        z = encode_images(b.vae, picture[None])
        vocabulary = len(self.table)
        u = torch.full((k, vocabulary), 1.0 / vocabulary, device=z.device, requires_grad=True)
        optimiser = torch.optim.Adam([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
        text = self.text(prompt)

        def loss_at(t: int):
            def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
                self.replacement = embeddings
                cond = b.encode_prompts([text], grad=True)
                return b.denoising_loss(z, cond, gen, self.guidance_scale, torch.tensor([t], device=z.device))
            return loss_of

        try:
            curve = [optimise_tokens(u, loss_at(t), self.table.to(z.device), cfg.iterations, optimiser, gen)
                     for t in self.sampled_timesteps()]
        finally:
            self.replacement = None
        tokens = u.detach().argmax(-1).tolist()
        words = self.tokenizer.encode(prompt, add_special_tokens=False)
        return {"prompt": self.tokenizer.decode(tokens + words), "tokens": tokens, "curve": curve}
