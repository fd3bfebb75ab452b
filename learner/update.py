"""One GRPO training step over a batch of scored trajectories.

The step's samples are shuffled and split into `updates_per_step` minibatches; each minibatch is one
optimiser step whose gradient accumulates over micro-batches and over each sample's trained timesteps
(the first `train_timesteps` of its trajectory, visited in a per-sample shuffled order, of which the first
`timesteps_per_sample` are trained, `timesteps_per_pass` of them in one forward/backward). Each pass is weighted
by its share of the minibatch's (sample, timestep) terms, so the optimiser sees the mean PPO-clip loss over them,
even when dropped groups leave minibatches of unequal size. With `grpo.objective: decoupled` the log-probs the ratio
is taken against are recomputed under the learner's policy before the step's first update (the proximal policy),
and each term is weighted by its truncated behaviour weight (common/grpo.py `behaviour_weights`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch

from safediff.common.config import GRPOConfig, OptimConfig, SamplerConfig
from safediff.common.grpo import behaviour_weights, kl_controlled_lr, kl_to_reference, ppo_clip_loss
from safediff.common.metrics import PhaseTimer
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

    lr: float  # the learning rate of the next `step` (read and set; part of the optimiser's state_dict)


def adamw(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """The reference's optimiser: AdamW at a constant learning rate (both loops; DeepSpeed wraps it)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def prepare_denoiser(policy: Policy, grpo: GRPOConfig) -> None:
    """The learner's execution options, applied once to the policy's denoiser in place: gradient checkpointing
    (diffusers' `enable_gradient_checkpointing`; its blocks check for grad mode, so no-grad rollouts and reference
    passes run as before) and torch.compile (`nn.Module.compile`, in place: the adapter's state keys stay those of
    the module, which a wrapping `torch.compile(module)` would prefix)."""
    if grpo.gradient_checkpointing:
        policy.denoiser.enable_gradient_checkpointing()
    if grpo.compile:
        policy.denoiser.compile()


class ParamGroupsLR:
    """`StepOptimizer.lr` over the param groups of the torch optimiser a class wraps (`_param_groups`): one rate for
    every group, read from the first. The groups are looked up on each access, since a torch optimiser's
    load_state_dict replaces its param_groups list."""

    def _param_groups(self) -> list[dict]:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self._param_groups()[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self._param_groups():
            group["lr"] = value


class TorchOptimizer(ParamGroupsLR):
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

    def _param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

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

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(self.latents.to(device), self.log_probs.to(device), self.cond.to(device),
                          self.uncond.to(device), self.advantages.to(device))


class GRPOUpdate:
    def __init__(self, policy: Policy, grpo: GRPOConfig, sampler: SamplerConfig, run_seed: int,
                 optimizer: StepOptimizer):
        self.policy, self.cfg, self.sampler, self.run_seed = policy, grpo, sampler, run_seed
        self.optimizer = optimizer
        # grpo.target_kl: the configured rate (the optimiser's, before any checkpoint is loaded) is the ceiling
        self.max_lr = optimizer.lr if grpo.target_kl is not None else None

    def _zero_backward(self) -> None:
        self.optimizer.backward(sum(p.sum() * 0.0 for p in self.policy.trainable_parameters()))

    def _approx_kl_over_ranks(self, values: list[float], world_size: int) -> float:
        """The mean of every rank's per-term approx_kl `values` (an all-reduce with several ranks, called by all of
        them, also by a rank that trained nothing); 0 when no rank trained a term."""
        total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=self.policy.device)
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else 0.0

    def policy_step(self, batch: TrainBatch, rows: torch.Tensor, t_idx: torch.Tensor) -> GaussianStep:
        """The policy's sampler step (mean, std, log-prob of the recorded next latent) for samples `rows`, each at
        its own trajectory step `t_idx` (`batch` on the policy's device)."""
        x_t, x_prev = batch.latents[rows, t_idx], batch.latents[rows, t_idx + 1]
        with self.policy.autocast():
            return self.policy.bundle.step(x_t, t_idx, batch.cond[rows], batch.uncond, self.sampler, prev_sample=x_prev)

    @torch.no_grad()
    def proximal_log_probs(self, batch: TrainBatch, needed: torch.Tensor) -> torch.Tensor:
        """[N, K] log-probs, under the policy held now, of the (sample, recorded step) pairs where `needed` [N, K]
        is true (NaN elsewhere; K = train_timesteps): the decoupled objective's pi_prox, taken before the step's
        first update, in passes of micro_batch_size x timesteps_per_pass pairs."""
        out = torch.full(needed.shape, float("nan"), device=batch.log_probs.device)
        for pairs in torch.split(needed.nonzero(), self.cfg.micro_batch_size * self.cfg.timesteps_per_pass):
            step = self.policy_step(batch, pairs[:, 0], pairs[:, 1])
            out[pairs[:, 0], pairs[:, 1]] = step.log_prob.float()
        return out

    def _term(self, batch: TrainBatch, rows: torch.Tensor, t_idx: torch.Tensor, stats: dict,
              prox: torch.Tensor | None) -> torch.Tensor:
        """PPO-clip (+ KL) loss of samples `rows`, each at its own trajectory step `t_idx`; `prox` [N, K] the
        proximal log-probs (decoupled objective) or None (standard)."""
        step = self.policy_step(batch, rows, t_idx)
        behav, weights = batch.log_probs[rows, t_idx], None
        old = behav
        if prox is not None:
            old = prox[rows, t_idx]
            weights = behaviour_weights(old, behav, self.cfg.behaviour_weight_cap,
                                        self.cfg.behaviour_max_log_ratio)
            stats["behaviour_weight"].append(weights.cpu())
            stats["behaviour_log_ratio"].append((old - behav).abs().cpu())
        terms = ppo_clip_loss(batch.advantages[rows], step.log_prob, old, self.cfg.clip_range, weights)
        loss = terms.loss
        if self.cfg.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                ref_mean = self.policy_step(batch, rows, t_idx).mean
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

        Where the time went, in seconds (`learner_<phase>_s`): to_device (the batch, once), proximal (the
        decoupled objective's pi_prox), forward (policy steps and losses), backward (with ZeRO's gradient
        reduce, which runs inside it), optimizer (clip and apply). On CUDA each phase ends with a synchronize.
        """
        clock = PhaseTimer(torch.cuda.synchronize if self.policy.device.type == "cuda" else None)
        with clock("to_device"):
            batch = batch.to(self.policy.device)
        cfg, N, K = self.cfg, len(batch), self.cfg.train_timesteps
        S = cfg.trained_per_sample  # the first S of each sample's shuffled K
        stats: dict[str, list] = defaultdict(list)
        grad_norms, first_update_log_ratio = [], None
        orders = []
        for epoch in range(cfg.inner_epochs):
            rng = generator(derive_seed("train-order", self.run_seed, step, epoch))
            order = torch.randperm(N, generator=rng)
            t_order = torch.stack([torch.randperm(K, generator=rng)[:S] for _ in range(N)])
            orders.append((order, t_order))  # [N], [N, S]
        prox = None
        if cfg.objective == "decoupled":  # pi_prox: this rank's rows, before any update of the step
            needed = torch.zeros(N, K, dtype=torch.bool)
            for order, t_order in orders:
                for mb in torch.tensor_split(order, cfg.updates_per_step):
                    mine = mb[rank::world_size]
                    needed[mine.unsqueeze(1), t_order[mine]] = True
            with clock("proximal"):
                prox = self.proximal_log_probs(batch, needed)
        passes = torch.split(torch.arange(S), cfg.timesteps_per_pass)  # which of a sample's S steps share a pass
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
                        with clock("forward"):
                            loss = self._term(batch, flat_rows, flat_t, stats, prox)
                        with clock("backward"):
                            # weight so the minibatch gradient is that of the mean over its (sample, step) pairs
                            self.optimizer.backward(loss * (world_size * len(flat_rows) / (len(minibatch) * S)))
                # ZeRO-2/3 reduce inside every backward: all ranks must make the same number of calls, also
                # when dropped groups leave shards of unequal size (the largest is ceil(len / world_size)).
                largest = -(-len(minibatch) // world_size)
                with clock("backward"):
                    for _ in range((-(-largest // cfg.micro_batch_size) - len(micro_batches)) * len(passes)):
                        self._zero_backward()
                if first_update_log_ratio is None and stats["abs_log_ratio"]:
                    first_update_log_ratio = float(torch.cat(stats["abs_log_ratio"]).max())
                with clock("optimizer"):
                    grad_norms.append(self.optimizer.step())
        self.policy.denoiser.eval()
        times = {f"learner_{phase}_s": seconds for phase, seconds in clock.seconds.items()}
        steered = {}
        if cfg.target_kl is not None:  # the rate this step used, and the next step's, the same on every rank
            approx_kl = self._approx_kl_over_ranks(stats["approx_kl"], world_size)
            steered = {"lr": self.optimizer.lr}
            self.optimizer.lr = kl_controlled_lr(steered["lr"], approx_kl, cfg.target_kl, self.max_lr)
        if not stats["loss"]:
            return {"grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "samples_trained": 0, **times, **steered}
        ratio = torch.cat(stats["ratio"])
        out = {
            **times,
            **steered,
            "samples_trained": len(ratio) // S,
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
                       behaviour_dropped_frac=float((weights == 0).float().mean()),
                       behaviour_max_abs_log_ratio=float(torch.cat(stats["behaviour_log_ratio"]).max()))
        return out


def _pairs(rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten `rows` [r] and each row's trajectory steps `steps` [r, c] into the r * c (row, step) pairs one pass
    computes, step-major: with c = 1 exactly the reference's (rows, steps[:, 0])."""
    return rows.repeat(steps.shape[1]), steps.T.reshape(-1)
