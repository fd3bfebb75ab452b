"""LearnerWorker: one rank of the DeepSpeed ZeRO engine that trains the policy.

K workers live in a Ray placement group and form one torch.distributed group (NCCL with GPUs, gloo on
CPU). Each holds the policy, wraps its trainable parameters in a ZeRO engine (stage from config) with
torch AdamW as the client optimiser, and runs `GRPOUpdate` on its shard of every minibatch. DeepSpeed
runs in unmanaged gradient accumulation: our loop's `backward` calls only accumulate, and each
`step` is one reduce + clip + AdamW update.
"""

from __future__ import annotations

import gc
import os
import time

import ray
import torch

from safediff.common.checkpoint import TrainerState
from safediff.common.config import Config
from safediff.common.messages import AdapterUpdate
from safediff.common.policy import Policy
from safediff.common.process import configure_process, free_port, peak_memory
from safediff.common.trainable import state_checksum
from safediff.common.types import Trajectory
from safediff.common.weight_sync import publish
from safediff.learner.update import GRPOUpdate, ParamGroupsLR, TrainBatch, adamw, prepare_denoiser


def deepspeed_config(cfg: Config) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.grpo.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # our loop decides where an optimiser step falls
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": {"stage": cfg.cluster.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStep(ParamGroupsLR):
    """`StepOptimizer` over a DeepSpeed engine: backward accumulates, step reduces/clips/applies."""

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def _param_groups(self) -> list[dict]:  # ZeRO's optimiser passes its base torch optimiser's groups through
        return self.engine.optimizer.param_groups

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


def init_process_group(gpu: bool, master_addr: str, master_port: int, rank: int, world_size: int):
    """Join rank `rank` of `world_size` (one rank per process) at rank 0's address: torch.distributed through
    DeepSpeed, NCCL on GPUs, gloo on CPU. Returns the deepspeed module."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    if not gpu:
        # the CPU backend would JIT-compile a shared-memory all-reduce op (~25 s); gloo is enough here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)
    return deepspeed


def zero_updater(deepspeed, cfg: Config, policy: Policy) -> tuple[GRPOUpdate, object]:
    """The GRPO update of `policy` through a ZeRO engine over its trainable parameters (torch AdamW as the client
    optimiser), in the process group `init_process_group` joined; and the engine."""
    prepare_denoiser(policy, cfg.grpo)
    params = policy.trainable_parameters()
    engine, *_ = deepspeed.initialize(model=policy.denoiser, optimizer=adamw(params, cfg.optim),
                                      model_parameters=params, config=deepspeed_config(cfg))
    return GRPOUpdate(policy, cfg.grpo, cfg.sampler, cfg.run.seed, DeepSpeedStep(engine)), engine


def gathered_state(policy: Policy, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full trainable state; ZeRO-3 partitions parameters, so gather them first (collective)."""
    if zero_stage != 3:
        return policy.state()
    import deepspeed

    with deepspeed.zero.GatheredParameters(policy.trainable_parameters(), modifier_rank=None):
        return policy.state()


@ray.remote
class LearnerWorker:
    def __init__(self, cfg: Config, rank: int, world_size: int):
        cfg = configure_process(cfg, cfg.cluster.cpus_per_learner_worker, cfg.cluster.gpus_per_learner_worker)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.engine = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group."""
        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group and build the engine (all ranks must call this concurrently).
        Returns the number of trainable tensors."""
        deepspeed = init_process_group(self.cfg.cluster.gpus_per_learner_worker > 0, master_addr, master_port,
                                       self.rank, self.world_size)
        self.policy = Policy.from_config(self.cfg)
        self.updater, self.engine = zero_updater(deepspeed, self.cfg, self.policy)
        return len(self.policy.trainable_parameters())

    def update(self, trajectory_refs: list, advantages: torch.Tensor, step: int) -> dict[str, float]:
        """One training step on this rank's shard. `trajectory_refs` are ObjectRefs (fetched here, from the
        object store, never through the driver); `advantages` is [P, G]."""
        start = time.perf_counter()
        trajectories: list[Trajectory] = ray.get(trajectory_refs)
        fetched = time.perf_counter()
        metrics = self.updater.update(TrainBatch.from_trajectories(trajectories, advantages), step,
                                      self.rank, self.world_size)
        self.policy.version += 1
        metrics.update(fetch_s=fetched - start, train_s=time.perf_counter() - fetched,
                       **{f"learner_{k}": v for k, v in peak_memory(self.policy.device).items()})
        return metrics

    def skip(self) -> None:
        """A step whose groups were all dropped: no update, but the version still counts the step."""
        self.policy.version += 1

    def publish(self) -> AdapterUpdate | None:
        """Put the current trainable state in the object store once (rank 0) and describe it. Under ZeRO-3
        every rank must call this: the partitioned parameters are gathered first."""
        state = gathered_state(self.policy, self.cfg.cluster.zero_stage)
        if self.rank != 0:
            return None
        return publish(state, self.policy.version, self.policy.bound_modules())

    def trainer_state(self) -> TrainerState:
        """This rank's optimiser state (its ZeRO partition) and RNG, for a checkpoint; not a collective."""
        return TrainerState.capture(self.engine.optimizer.state_dict())

    def restore(self, weights: dict[str, torch.Tensor], version: int, trainer: TrainerState) -> str:
        """Continue from a checkpoint written by the same number of ranks at the same ZeRO stage.
        Returns the checksum of the restored trainable state."""
        stage = self.cfg.cluster.zero_stage
        if stage != 3:  # ZeRO-3's partitioned weights come back from the optimiser's fp32 partitions below
            self.policy.load_state(weights, version)
        self.policy.version = version
        state = trainer.restore(self.engine.optimizer.state_dict())
        if stage == 0:  # the engine holds the client torch optimiser itself
            self.engine.optimizer.load_state_dict(state)
        else:  # a list indexed by data-parallel rank; each rank reads its own entry
            self.engine.optimizer.load_state_dict([state] * self.world_size, load_from_fp32_weights=True)
        return state_checksum(gathered_state(self.policy, stage))

    def shutdown(self) -> None:
        """Tear down in the order that avoids DeepSpeed's exit-time aborts."""
        import torch.distributed as dist

        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
