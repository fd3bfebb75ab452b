"""One GRPO training step over a batch of scored trajectories.

The step's samples are shuffled and split into `updates_per_step` minibatches; each minibatch is one
optimiser step whose gradient accumulates over micro-batches and over each sample's trained timesteps
(the first `train_timesteps` of its trajectory, visited in a per-sample shuffled order,
`timesteps_per_pass` of them in one forward/backward). Each pass is weighted by its share of
the minibatch's (sample, timestep) terms, so the optimiser sees the mean PPO-clip loss over
them, even when dropped groups leave minibatches of unequal size. With `grpo.objective: decoupled` the
log-probs the ratio is taken against are recomputed under the learner's policy before the step's first
update (the proximal policy), and each term is weighted by its truncated behaviour weight
(common/grpo.py `behaviour_weights`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch

from safediff.common.config import GRPOConfig, OptimConfig, SamplerConfig
from safediff.common.grpo import behaviour_weights, kl_to_reference, ppo_clip_loss
from safediff.common.policy import Policy
from safediff.common.sampling import GaussianStep
from safediff.common.seeds import derive_seed, generator
from safediff.common.types import TextEmbeds, Trajectory


class StepOptimizer(Protocol):
    """What the update needs from an optimiser: any number of `backward` calls accumulate gradients
    (locally: no communication), then `step` reduces them across ranks, clips, applies and zeroes them.
    `TorchOptimizer` is the single-process version; `learner.engine.DeepSpeedStep` wraps a ZeRO engine."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...  # returns the pre-clip global grad norm


def adamw(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """The reference's optimiser: AdamW at a constant learning rate (both loops; DeepSpeed wraps it)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


class TorchOptimizer:
    """AdamW with grad-norm clipping and no schedule (the reference's optimiser)."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimConfig):
        self.params, self.max_grad_norm = params, cfg.max_grad_norm
        self.optimizer = adamw(params, cfg)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


@dataclass
class TrainBatch:
    """The samples of one step, flattened across groups."""

    latents: torch.Tensor     # [N, T+1, C, h, w]
    log_probs: torch.Tensor   # [N, T] recorded at rollout
    cond: TextEmbeds          # [N, ...]
    uncond: TextEmbeds        # [1, ...]
    advantages: torch.Tensor  # [N]

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory], advantages: torch.Tensor) -> TrainBatch:
        """`advantages` is [P, G], row i for trajectories[i]."""
        G = trajectories[0].group_size
        return cls(
            latents=torch.cat([t.latents for t in trajectories]),
            log_probs=torch.cat([t.log_probs for t in trajectories]),
            cond=TextEmbeds.cat([t.prompt_embeds for t in trajectories]).map(lambda x: x.repeat_interleave(G, dim=0)),
            uncond=trajectories[0].negative_embeds,
            advantages=advantages.reshape(-1).float(),
        )

    def __len__(self) -> int:
        return self.latents.shape[0]


class GRPOUpdate:
    def __init__(self, policy: Policy, grpo: GRPOConfig, sampler: SamplerConfig, run_seed: int,
                 optimizer: StepOptimizer):
        self.policy, self.cfg, self.sampler, self.run_seed = policy, grpo, sampler, run_seed
        self.optimizer = optimizer

    def _zero_backward(self) -> None:
        self.optimizer.backward(sum(p.sum() * 0.0 for p in self.policy.trainable_parameters()))

    def _step(self, batch: TrainBatch, rows: torch.Tensor, t_idx: torch.Tensor) -> GaussianStep:
        """The policy's sampler step (mean, std, log-prob of the recorded next latent) for samples `rows`, each at
        its own trajectory step `t_idx`."""
        dev = self.policy.device
        x_t, x_prev = batch.latents[rows, t_idx].to(dev), batch.latents[rows, t_idx + 1].to(dev)
        cond, uncond = batch.cond[rows].to(dev), batch.uncond.to(dev)
        with self.policy.autocast():
            return self.policy.bundle.step(x_t, t_idx, cond, uncond, self.sampler, prev_sample=x_prev)

    @torch.no_grad()
    def proximal_log_probs(self, batch: TrainBatch, rows: torch.Tensor) -> torch.Tensor:
        """[N, K] log-probs of the first K = train_timesteps recorded steps under the policy held now, filled for
        `rows` (NaN elsewhere): the decoupled objective's pi_prox, taken before the step's first update."""
        K, out = self.cfg.train_timesteps, torch.full((len(batch), self.cfg.train_timesteps), float("nan"))
        for chunk in torch.split(rows, self.cfg.micro_batch_size):
            for ks in torch.split(torch.arange(K), self.cfg.timesteps_per_pass):
                flat_rows, flat_t = _pairs(chunk, ks.expand(len(chunk), -1))
                step = self._step(batch, flat_rows, flat_t)
                out[flat_rows, flat_t] = step.log_prob.float().cpu()
        return out

    def _term(self, batch: TrainBatch, rows: torch.Tensor, t_idx: torch.Tensor, stats: dict,
              prox: torch.Tensor | None) -> torch.Tensor:
        """PPO-clip (+ KL) loss of samples `rows`, each at its own trajectory step `t_idx`; `prox` [N, K] the
        proximal log-probs (decoupled objective) or None (standard)."""
        dev = self.policy.device
        step = self._step(batch, rows, t_idx)
        behav, weights = batch.log_probs[rows, t_idx].to(dev), None
        old = behav
        if prox is not None:
            old = prox[rows, t_idx].to(dev)
            weights = behaviour_weights(old, behav, self.cfg.behaviour_weight_cap)
            stats["behaviour_weight"].append(weights.cpu())
            stats["behaviour_log_ratio"].append((old - behav).abs().cpu())
        terms = ppo_clip_loss(batch.advantages[rows].to(dev), step.log_prob, old, self.cfg.clip_range, weights)
        loss = terms.loss
        if self.cfg.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                ref_mean = self._step(batch, rows, t_idx).mean
            kl = kl_to_reference(step.mean, ref_mean, step.std).mean()
            loss = loss + self.cfg.kl_beta * kl
            stats["kl_ref"].append(float(kl.detach()))
        stats["loss"].append(float(terms.loss.detach()))
        stats["approx_kl"].append(float(terms.approx_kl))
        stats["ratio"].append(terms.ratio.cpu())
        stats["clipped"].append(terms.clipped.cpu())
        stats["abs_log_ratio"].append((step.log_prob.detach() - old).abs().cpu())
        return loss

    def update(self, batch: TrainBatch, step: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Run `updates_per_step` optimiser steps (x `inner_epochs`) over `batch`; return diagnostics.

        With several data-parallel ranks every rank sees the whole batch and the same seeded order, and
        trains rows rank, rank + W, ... of each minibatch; its loss is scaled by W so that the ranks'
        averaged gradient is the gradient of the mean over the whole minibatch.
        """
        cfg, N, K = self.cfg, len(batch), self.cfg.train_timesteps
        stats: dict[str, list] = defaultdict(list)
        grad_norms, first_update_log_ratio = [], None
        orders = []
        for epoch in range(cfg.inner_epochs):
            rng = generator(derive_seed("train-order", self.run_seed, step, epoch))
            order = torch.randperm(N, generator=rng)
            orders.append((order, torch.stack([torch.randperm(K, generator=rng) for _ in range(N)])))  # [N], [N, K]
        prox = None
        if cfg.objective == "decoupled":  # pi_prox: this rank's rows, before any update of the step
            mine = torch.cat([mb[rank::world_size] for order, _ in orders
                              for mb in torch.tensor_split(order, cfg.updates_per_step)]).unique()
            prox = self.proximal_log_probs(batch, mine)
        passes = torch.split(torch.arange(K), cfg.timesteps_per_pass)  # which of a sample's K steps share a pass
        self.policy.denoiser.train()
        for order, t_order in orders:
            for minibatch in torch.tensor_split(order, cfg.updates_per_step):
                if minibatch.numel() == 0:  # fewer samples than minibatches (groups were dropped)
                    continue
                shard = minibatch[rank::world_size]
                micro_batches = torch.split(shard, cfg.micro_batch_size)
                for rows in micro_batches:
                    for js in passes:
                        flat_rows, flat_t = _pairs(rows, t_order[rows][:, js])
                        loss = self._term(batch, flat_rows, flat_t, stats, prox)
                        # weight so the minibatch gradient is that of the mean over its (sample, step) pairs
                        self.optimizer.backward(loss * (world_size * len(flat_rows) / (len(minibatch) * K)))
                # ZeRO-2/3 reduce inside every backward: all ranks must make the same number of calls, also
                # when dropped groups leave shards of unequal size (the largest is ceil(len / world_size)).
                largest = -(-len(minibatch) // world_size)
                for _ in range((-(-largest // cfg.micro_batch_size) - len(micro_batches)) * len(passes)):
                    self._zero_backward()
                if first_update_log_ratio is None and stats["abs_log_ratio"]:
                    first_update_log_ratio = float(torch.cat(stats["abs_log_ratio"]).max())
                grad_norms.append(self.optimizer.step())
        self.policy.denoiser.eval()
        if not stats["loss"]:
            return {"grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "samples_trained": 0}
        ratio = torch.cat(stats["ratio"])
        out = {
            "samples_trained": len(ratio) // K,
            "loss": sum(stats["loss"]) / len(stats["loss"]),
            "approx_kl": sum(stats["approx_kl"]) / len(stats["approx_kl"]),
            "clipfrac": float(torch.cat(stats["clipped"]).float().mean()),
            "ratio_mean": float(ratio.mean()),
            "ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "first_update_max_abs_log_ratio": first_update_log_ratio,
        }
        if stats["kl_ref"]:
            out["kl_ref"] = sum(stats["kl_ref"]) / len(stats["kl_ref"])
        if stats["behaviour_weight"]:  # decoupled: how far the behaviour policies were from the proximal one
            weights = torch.cat(stats["behaviour_weight"])
            out.update(behaviour_weight_mean=float(weights.mean()),
                       behaviour_weight_capped_frac=float((weights >= cfg.behaviour_weight_cap).float().mean()),
                       behaviour_max_abs_log_ratio=float(torch.cat(stats["behaviour_log_ratio"]).max()))
        return out


def _pairs(rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten `rows` [r] and each row's trajectory steps `steps` [r, c] into the r * c (row, step) pairs one pass
    computes, step-major: with c = 1 exactly the reference's (rows, steps[:, 0])."""
    return rows.repeat(steps.shape[1]), steps.T.reshape(-1)
