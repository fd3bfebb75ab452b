"""The Ray runtime on a real local Ray cluster (CPU): rollout actors, reward actor, DeepSpeed learner (gloo)."""

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from safetensors.torch import load_file

from safediff.common.config import ConfigError
from safediff.common.grpo import kl_controlled_lr
from safediff.common.policy import Policy
from safediff.common.trainable import LoraTrainable
from safediff.runtime.controller import run
from safediff.runtime.local import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

SMALL = ("cluster.cpus_per_rollout_actor=0.5", "cluster.cpus_per_reward_actor=0.5",
         "cluster.cpus_per_learner_worker=0.5", "run.steps=3")


def _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, *overrides):
    return tiny_config(tiny_dir, tmp_path, prompt_file, *SMALL, *overrides)


def test_async_run_syncs_every_actor_within_the_staleness_bound(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "cluster.rollout_actors=2", "cluster.reward_actors=1",
               "cluster.learner_workers=2", "cluster.max_staleness=1", "grpo.target_kl=1e-12")
    result = run(cfg, progress=False)
    assert result.final_version == 3
    assert result.actor_status == [(3, result.checksum)] * 2  # every actor holds the learner's latest
    assert result.max_staleness_seen == 1
    assert [m["staleness_max"] for m in result.metrics] == [0, 1, 1]  # step 0 has no older policy
    first = result.metrics[0]
    assert first["first_update_max_abs_log_ratio"] < 1e-5 and abs(first["ratio_mean"] - 1) < 1e-5
    assert all(m["sync_bytes"] > 0 and m["groups_in_flight"] <= 2 * cfg.grpo.prompts_per_step
               and m["time_generate_mean"] > 0 and m["time_reward_batch_mean"] > 0 for m in result.metrics)
    assert (result.run_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (result.run_dir / "reward_curve.png").is_file()
    # grpo.target_kl: each step's rate follows from the last step's approx_kl over both ranks (all-reduced, so the
    # ranks agree; rates set per rank from each rank's own approx_kl would average to another number)
    lrs, kls = [m["lr"] for m in result.metrics], [m["approx_kl"] for m in result.metrics]
    assert lrs[0] == cfg.optim.lr and lrs[1] < cfg.optim.lr
    for s in (1, 2):
        assert lrs[s] > cfg.optim.lr / 100  # above the floor: the rate follows the measured approx_kl
        assert lrs[s] == pytest.approx(kl_controlled_lr(lrs[s - 1], kls[s - 1], 1e-12, cfg.optim.lr), rel=1e-9)


# sample grids after steps 0, 2 and 3: the local loop renders them itself, the Ray runtime on rollout actor 0
GRIDS = ("tracking.sample_prompts=[a bright image, a dark image]", "tracking.every=2")


def _pooled(tmp):
    return ("grpo.adv_scale=pooled", f"prompts.sources=[{{path: {tmp / 'prompts.txt'}}}, {{path: {tmp / 'more.txt'}}}]")


@pytest.fixture(scope="module")
def local_reference(tiny_dir, tmp_path_factory, tiny_config):
    """The single-process loop on the same config, and the initial adapter, for comparison. Two prompt
    sources and pooled advantages, so the source of every group reaches the advantage in both runtimes."""
    tmp = tmp_path_factory.mktemp("local")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a bright image\na dark image\nan image\na picture of colour\n")
    (tmp / "more.txt").write_text("a red square\na blue circle\n")
    cfg = _cfg(tiny_config, tiny_dir, tmp, prompts, "run.name=local", *_pooled(tmp), *GRIDS)
    result = train(cfg, progress=False)
    LoraTrainable(cfg.lora).save(Policy.from_config(cfg).state(), tmp / "init")
    return result, tmp, prompts


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("learners", [1, 2])
def test_on_policy_run_matches_the_single_process_loop(tiny_dir, local_reference, learners, tiny_config):
    """Tolerance: rewards within 1e-5 and the parameter update (final - initial adapter) within 1% in
    L2 norm. Measured: ~5e-7 and ~0.06%, from float summation order (thread counts, ZeRO flattening)."""
    local, tmp, prompts = local_reference
    cfg = _cfg(tiny_config, tiny_dir, tmp, prompts, f"run.name=ray{learners}", f"cluster.learner_workers={learners}",
               "cluster.max_staleness=0", *_pooled(tmp), *GRIDS)
    result = run(cfg, progress=False)
    for a, b in zip(local.metrics, result.metrics):
        assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-5
    init, ours, theirs = load_file(str(tmp / "init" / "pytorch_lora_weights.safetensors")), \
        _adapter(local.run_dir), _adapter(result.run_dir)
    delta_local = torch.cat([(ours[k] - init[k]).flatten() for k in init])
    delta_ray = torch.cat([(theirs[k] - init[k]).flatten() for k in init])
    assert delta_local.norm() > 0
    assert (delta_local - delta_ray).norm() / delta_local.norm() < 1e-2
    # the same policies rendered from the same noise. The base model's grid matches to the last rounding: the actor's
    # thread count changes float summation order, which can move a channel value across a .5 boundary (on one
    # AMD EPYC machine: 1 of 12288 values, by 1). The trained grids differ only as much as the adapters do.
    grids = {where: {s: np.asarray(Image.open(r.run_dir / "samples" / f"step_{s}.png"), dtype=np.int16)
                     for s in (0, 2, 3)} for where, r in (("local", local), ("ray", result))}
    base = np.abs(grids["local"][0] - grids["ray"][0])
    assert base.max() <= 1 and (base > 0).mean() < 1e-3
    for s in (2, 3):
        assert np.abs(grids["local"][s] - grids["ray"][s]).mean() < 0.5, s


@pytest.fixture(params=["sd3", "flux"])
def flow_model(request, colour_sd3, tmp_path_factory) -> tuple[str, ...]:
    """A flow family's model overrides: the trained tiny SD3 (CLIP-L, CLIP-G), or a random tiny FLUX.1-dev (CLIP-L's
    pooled embedding, T5's states, the guidance input)."""
    if request.param == "sd3":
        return f"model.pretrained={colour_sd3}", "model.family=sd3", "model.max_sequence_length=0"
    from safediff.common.flow_models import build_tiny_flux_bundle

    flux = build_tiny_flux_bundle(tmp_path_factory.mktemp("flux") / "tiny", seed=0)
    return f"model.pretrained={flux}", "model.family=flux", "model.max_sequence_length=16"


def test_the_flow_family_trains_on_the_ray_runtime_as_in_one_process(tiny_dir, tmp_path, prompt_file, tiny_config,
                                                                     flow_model):
    """model.family sd3 / flux end to end: two rollout actors sampling the flow SDE, the CLIP reward actor, the
    DeepSpeed learner, weight sync and sample grids from the stock StableDiffusion3Pipeline / FluxPipeline; the same
    tolerances as above."""
    flow = (*flow_model, "sampler.height=16", "sampler.width=16", "cluster.rollout_actors=2",
            "cluster.max_staleness=0", "run.steps=2", "tracking.sample_prompts=[a bright image]", "tracking.every=2")
    local = train(_cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "run.name=local", *flow), progress=False)
    result = run(_cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "run.name=ray", *flow), progress=False)
    assert result.actor_status == [(2, result.checksum)] * 2
    assert result.metrics[0]["first_update_max_abs_log_ratio"] < 1e-5
    for a, b in zip(local.metrics, result.metrics):
        assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-5
    ours, theirs = _adapter(local.run_dir), _adapter(result.run_dir)
    assert any(k.startswith("transformer.") for k in theirs)  # the stock export format of both pipelines
    delta = torch.cat([(ours[k] - theirs[k]).flatten() for k in ours]).norm()
    assert delta / torch.cat([ours[k].flatten() for k in ours if "lora_B" in k]).norm() < 1e-2
    for r in (local, result):
        assert (r.run_dir / "samples" / "step_2.png").is_file()


def test_a_topology_the_cluster_cannot_hold_is_refused(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "cluster.rollout_actors=2",
               "cluster.gpus_per_rollout_actor=1")
    with pytest.raises(ConfigError, match="GPU: the cluster section asks for 2, the Ray cluster has 0"):
        run(cfg, progress=False)


def test_zero3_with_two_ranks_gathers_the_adapter_it_publishes(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "cluster.learner_workers=2", "cluster.zero_stage=3",
               "cluster.rollout_actors=1", "run.steps=2")
    result = run(cfg, progress=False)
    assert result.actor_status == [(2, result.checksum)]
    assert result.metrics[0]["first_update_max_abs_log_ratio"] < 1e-5


def test_full_finetune_through_deepspeed_saves_a_loadable_unet(tiny_dir, tmp_path, prompt_file, tiny_config):
    from diffusers import UNet2DConditionModel

    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "model.finetune=full", "cluster.rollout_actors=1",
               "run.steps=2")
    result = run(cfg, progress=False)
    assert result.actor_status == [(2, result.checksum)]
    trained = UNet2DConditionModel.from_pretrained(result.run_dir / "adapter" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_dir / "sd", subfolder="unet")
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert sum(changed) > len(changed) // 2  # every weight is trained, not an adapter


@ray.remote(num_cpus=0)
class NaNReward:
    """Stand-in reward: step 0 (calls 0-3) loses group 0 to NaN, step 1 (calls 4-7) loses every group."""

    def __init__(self):
        self.calls = 0

    async def score(self, images, prompts, unsafe=None):
        from safediff.reward_server.steering import RewardOutput

        call, self.calls = self.calls, self.calls + 1
        rewards = images.float().mean(dim=(1, 2, 3))
        if call == 0 or 4 <= call < 8:
            rewards[:] = float("nan")
        return RewardOutput(rewards=rewards)

    def batch_stats(self):
        return {}


def test_dropped_groups_and_empty_steps_with_uneven_rank_shards(tiny_dir, tmp_path, prompt_file, tiny_config):
    """G=3, P=4, 2 minibatches, 2 ranks, micro-batch 1: dropping one group leaves minibatches of 5 and 4,
    so the ranks' shards differ by a row (ZeRO-2 would deadlock on unequal backward counts); a step
    with no finite reward still advances the version."""
    from safediff.runtime.groups import RewardGroup, start_actors

    cfg = _cfg(tiny_config, tiny_dir, tmp_path, prompt_file, "grpo.group_size=3", "grpo.prompts_per_step=4",
               "grpo.updates_per_step=2", "grpo.micro_batch_size=1", "grpo.train_timesteps=2",
               "cluster.learner_workers=2", "cluster.rollout_actors=1", "cluster.max_staleness=0")
    actors = start_actors(cfg)
    for actor in actors.rewards:
        ray.kill(actor)
    actors.rewards = RewardGroup([NaNReward.remote()])
    result = run(cfg, progress=False, actors=actors)
    assert [m["dropped_groups"] for m in result.metrics] == [1, 4, 0]
    assert result.final_version == 3 and result.actor_status == [(3, result.checksum)]
    assert "loss" in result.metrics[0] and "loss" not in result.metrics[1] and "loss" in result.metrics[2]
