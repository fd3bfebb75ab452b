"""Ring-A-Bell (Tsai et al., ICLR 2024): a model-agnostic attack that needs only the target's text encoder E
(last hidden states [L, D], what the UNet is conditioned on). Written from the paper and chiayi-hsu/Ring-A-Bell
(`Get_Concept_Vector.ipynb`, `InversePrompt.ipynb`):

    concept vector   c = mean_i [ E(p_i) - E(n_i) ]          p_i with the concept, n_i the same prompt without
    target           t = E(prompt) + eta * c
    search           K token ids x minimising  f(x) = | E([bos, x, eos, ..., eos]) - t |^2   (summed over L, D)

by a genetic algorithm: each generation keeps the better half of the population by f; each survivor stays and,
with probability `crossover_rate`, breeds two children with a random partner (one-point crossover); each member
then has, with probability `mutation_rate`, one token replaced by a random id. Token ids are drawn from
[1, bos): every ordinary token, none of the special ones. The adversarial prompt is the decoded text of the best
ids found (the tokens a user would type); its own distance to t after re-tokenisation is recorded too, since
decoding and tokenising again need not give the same ids.

SD3 and FLUX.1 have more than one text encoder; the search runs in the CLIP ViT-L encoder each has (the reference's
encoder, SD 1.x's only one, its last hidden states as above), and what it finds is text, which the target model then
encodes with all of its encoders: the prompts transfer, as the paper's transfer between models does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from safediff.common.config import RingABellConfig

Encode = Callable[[torch.Tensor], torch.Tensor]   # token ids [P, L] -> last hidden states [P, L, D]


@torch.no_grad()
def concept_vector(encode_text: Callable[[list[str]], torch.Tensor], with_concept: list[str],
                   without: list[str], batch: int = 8) -> torch.Tensor:
    """c = mean over pairs of E(with) - E(without), [L, D] in fp32."""
    if len(with_concept) != len(without) or not with_concept:
        raise ValueError(f"concept pairs: {len(with_concept)} prompts with the concept and {len(without)} without; "
                         "they pair row by row and must be as many (and not none)")
    total = None
    for i in range(0, len(with_concept), batch):
        diff = (encode_text(with_concept[i:i + batch]).float() - encode_text(without[i:i + batch]).float()).sum(0)
        total = diff if total is None else total + diff
    return total / len(with_concept)


def full_ids(tokens: torch.Tensor, bos: int, eos: int, max_length: int) -> torch.Tensor:
    """[P, K] tokens -> [P, max_length] ids: bos, the tokens, then eos to the end (as the reference pads)."""
    pad = torch.full((tokens.shape[0], max_length - 1 - tokens.shape[1]), eos, dtype=tokens.dtype)
    return torch.cat([torch.full((tokens.shape[0], 1), bos, dtype=tokens.dtype), tokens, pad], dim=1)


@torch.no_grad()
def distance(encode: Encode, ids: torch.Tensor, target: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """f per row of ids [P, L]: the squared distance of its hidden states to target [L, D], in fp32."""
    return torch.cat([(encode(ids[i:i + batch]).float() - target).pow(2).sum((1, 2))
                      for i in range(0, len(ids), batch)])


def _crossover(parents: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Every parent, and for each one drawn with probability `rate` two children with a random partner cut at
    one random point."""
    n, k = parents.shape
    breeding = (torch.rand(n, generator=gen) < rate).nonzero().flatten()
    partners = torch.randint(0, n, (len(breeding),), generator=gen)
    cuts = torch.randint(1, k + 1, (len(breeding),), generator=gen)  # k: the child is a copy
    first = torch.arange(k)[None, :] < cuts[:, None]                 # [B, K] positions from the first parent
    a, b = parents[breeding], parents[partners]
    return torch.cat([parents, torch.where(first, a, b), torch.where(first, b, a)])


def _mutate(population: torch.Tensor, rate: float, high: int, gen: torch.Generator) -> torch.Tensor:
    out = population.clone()
    hit = (torch.rand(len(out), generator=gen) < rate).nonzero().flatten()
    out[hit, torch.randint(0, out.shape[1], (len(hit),), generator=gen)] = torch.randint(
        1, high, (len(hit),), generator=gen)
    return out


@dataclass
class SearchResult:
    tokens: list[int]        # the K best ids found
    loss: float              # their f
    curve: list[float]       # the best f so far after each generation


def genetic_search(fitness: Callable[[torch.Tensor], torch.Tensor], cfg: RingABellConfig, high: int,
                   seed: int) -> SearchResult:
    """Minimise fitness([P, K] token ids) -> [P] over ids in [1, high) (module docstring); deterministic for a
    seed. The best member ever seen is kept, so `curve` never rises."""
    gen = torch.Generator().manual_seed(seed)
    population = torch.randint(1, high, (cfg.population, cfg.length), generator=gen)
    best, best_loss, curve = population[0], float("inf"), []
    for generation in range(cfg.generations):
        losses = fitness(population)
        order = torch.argsort(losses, stable=True)
        if float(losses[order[0]]) < best_loss:
            best, best_loss = population[order[0]].clone(), float(losses[order[0]])
        curve.append(best_loss)
        if generation == cfg.generations - 1:
            break
        survivors = population[order[: max(cfg.population // 2, 2)]]
        population = _mutate(_crossover(survivors, cfg.crossover_rate, gen), cfg.mutation_rate, high, gen)
    return SearchResult(best.tolist(), best_loss, curve)


@dataclass
class RingABell:
    """The attack against one text encoder: `attack(prompt, seed)` -> the adversarial prompt and its record."""

    tokenizer: object
    text_encoder: torch.nn.Module
    cfg: RingABellConfig
    concept: torch.Tensor | None = None   # [L, D], set by `fit_concept`

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state.float().cpu()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(prompts))

    def fit_concept(self, with_concept: list[str], without: list[str]) -> torch.Tensor:
        self.concept = concept_vector(self.encode_text, with_concept, without)
        return self.concept

    @torch.no_grad()
    def attack(self, prompt: str, seed: int) -> dict:
        target = self.encode_text([prompt])[0] + self.cfg.eta * self.concept
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        length = self.tokenizer.model_max_length
        result = genetic_search(lambda t: distance(self.encode_ids, full_ids(t, bos, eos, length), target),
                                self.cfg, high=bos, seed=seed)
        text = self.tokenizer.decode(result.tokens)
        return {"prompt": text, "tokens": result.tokens, "loss": result.loss,
                "text_loss": float(distance(self.encode_ids, self.tokenize([text]), target)[0]),
                "curve": result.curve[:: max(len(result.curve) // 20, 1)] + result.curve[-1:]}
