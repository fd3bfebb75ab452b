"""The FLUX.1 family on tiny random FLUX-architecture pipelines saved in the diffusers layout (one with FLUX.1-dev's
guidance input, one sampled with true classifier-free guidance): prompts encoded and sampled as the stock FluxPipeline
does at zero noise, the learner's step re-scoring a rollout's log-probs exactly, strict loading, a LoRA export a stock
FluxPipeline loads, a GRPO step through the single-process loop whose first minibatch is on-policy, and Ring-A-Bell's
search in the CLIP-L encoder."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

from safediff.common.config import LoraConfig, RingABellConfig, load_config
from safediff.common.flow_models import build_tiny_flux_bundle, load_flux_bundle
from safediff.common.flow_sde import sample_flow_with_logprob
from safediff.common.models import ModelLoadError, load_clip_text_encoder
from safediff.common.trainable import LoraTrainable, count_lora_modules
from safediff.redteam.ringabell import RingABell
from safediff.reward_server.steering import RewardOutput
from safediff.runtime.local import train

PROMPTS = ["a red square", "two blue circles"]
TOKENS = 16  # T5 tokens per prompt


@pytest.fixture(scope="module", params=[True, False], ids=["guidance-embedded", "true-cfg"])
def tiny_flux(request, tmp_path_factory):
    return build_tiny_flux_bundle(tmp_path_factory.mktemp("flux") / "tiny", seed=0, guidance_embeds=request.param)


def _packed(noise: torch.Tensor) -> torch.Tensor:
    B, C, h, w = noise.shape
    return FluxPipeline._pack_latents(noise, B, C, h, w)


def test_prompts_are_encoded_and_sampled_as_the_stock_pipeline_does(tiny_flux):
    bundle = load_flux_bundle(str(tiny_flux), max_sequence_length=TOKENS)
    stock = FluxPipeline.from_pretrained(tiny_flux)
    stock.set_progress_bar_config(disable=True)
    cond, uncond = bundle.encode_prompts(PROMPTS), bundle.encode_prompts([""])
    with torch.no_grad():  # as ours (autograd's kernels differ in the last bits)
        their_states, their_pooled, _ = stock.encode_prompt(PROMPTS, None, max_sequence_length=TOKENS)
    assert torch.equal(cond.states, their_states) and torch.equal(cond.pooled, their_pooled)
    assert cond.states.shape == (2, TOKENS, 32) and cond.pooled.shape == (2, 16)

    steps, shape = 4, bundle.latent_shape(16, 16)
    assert shape == (4, 8, 8)  # 16 px, VAE factor 2, 4 latent channels (16 packed)
    noise = torch.randn(len(PROMPTS), steps + 1, *shape, generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = bundle.schedule(steps, shape[1:])
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(timesteps) == steps
    ours = sample_flow_with_logprob(bundle.velocity(cond, uncond, 3.5), timesteps, sigmas, noise, 0.0)
    guidance = ({"guidance_scale": 3.5} if bundle.transformer.config.guidance_embeds
                else {"true_cfg_scale": 3.5, "negative_prompt": [""] * len(PROMPTS)})
    theirs = stock(PROMPTS, latents=_packed(noise[:, 0]), num_inference_steps=steps, height=16, width=16,
                   output_type="latent", max_sequence_length=TOKENS, **guidance).images
    theirs = FluxPipeline._unpack_latents(theirs, 16, 16, bundle.vae_scale_factor)
    torch.testing.assert_close(ours.latents[:, -1], theirs, rtol=1e-5, atol=1e-5)
    assert bundle.decode_images(ours.latents[:, -1]).shape == (2, 3, 16, 16)


def test_the_learners_step_rescores_a_sampled_trajectory(tiny_flux):
    """The family contract: `step` on the recorded latents gives the log-probs `sample` recorded, for samples at
    different trajectory steps in one call; and the noise determines the trajectory."""
    bundle = load_flux_bundle(str(tiny_flux), max_sequence_length=TOKENS)
    cfg = load_config("cpu_demo", ["model.family=flux", "sampler.num_steps=4", "grpo.train_timesteps=4"])
    cond, uncond = bundle.encode_prompts(PROMPTS), bundle.encode_prompts([""])
    noise = torch.randn(2, 5, *bundle.latent_shape(16, 16), generator=torch.Generator().manual_seed(1))
    traj = bundle.sample(cond, uncond, noise, cfg.sampler)
    assert torch.equal(bundle.sample(cond, uncond, noise, cfg.sampler).latents, traj.latents)
    assert torch.isfinite(traj.log_probs).all() and traj.log_probs.shape == (2, 4)
    rows, k = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3])
    step = bundle.step(traj.latents[rows, k], k, cond[rows], uncond, cfg.sampler,
                       prev_sample=traj.latents[rows, k + 1])
    torch.testing.assert_close(step.log_prob, traj.log_probs[rows, k], rtol=0, atol=1e-5)


def test_a_mismatched_weight_is_refused_naming_the_component(tiny_flux, tmp_path, without_a_weight):
    broken = without_a_weight(tiny_flux, tmp_path / "broken")
    with pytest.raises(ModelLoadError, match=r"model.pretrained: transformer in .* does not match its architecture"):
        load_flux_bundle(str(broken))
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(tiny_flux, no_t5)
    shutil.rmtree(no_t5 / "text_encoder_2")  # FLUX needs T5
    with pytest.raises(ModelLoadError, match="model.pretrained: cannot load"):
        load_flux_bundle(str(no_t5))


def test_a_transformer_lora_export_loads_into_the_stock_pipeline_and_gives_the_same_velocity(tiny_flux, tmp_path):
    bundle = load_flux_bundle(str(tiny_flux), max_sequence_length=TOKENS)
    trainable = LoraTrainable(LoraConfig(rank=4, alpha=4), family="flux")
    modules = trainable.attach(bundle.transformer, seed=0)
    assert modules == 4 + 3  # the double block's to_q, to_k, to_v, to_out.0; the single block's to_q, to_k, to_v
    state = {k: torch.randn_like(v) * 0.1 for k, v in trainable.state(bundle.transformer).items()}
    trainable.load(bundle.transformer, state)
    folder = trainable.save(state, tmp_path / "adapter")
    assert trainable.load_saved(folder).keys() == state.keys()
    with safe_open(str(folder / trainable.weights_file), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.r"] == 4

    stock = FluxPipeline.from_pretrained(tiny_flux)
    stock.load_lora_weights(folder)
    assert count_lora_modules(stock.transformer, adapter=None) == modules
    cond, uncond = bundle.encode_prompts(PROMPTS), bundle.encode_prompts([""])
    x, t = torch.randn(2, *bundle.latent_shape(16, 16)), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        mine = bundle.velocity(cond, uncond, 3.5)(x, t)
        bundle.pipeline.transformer = stock.transformer  # the stock pipeline's transformer in the same call
        theirs = bundle.velocity(cond, uncond, 3.5)(x, t)
        stock.unload_lora_weights()
        base = bundle.velocity(cond, uncond, 3.5)(x, t)
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, mine, atol=1e-4)  # the adapter changed the prediction


def brightness(images, prompts, unsafe=None, groups=None):
    return RewardOutput(rewards=images.float().mean(dim=(1, 2, 3)) / 255)


def test_a_grpo_step_on_flux_starts_on_policy(tiny_flux, tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "model.family=flux", f"model.max_sequence_length={TOKENS}",
                      "sampler.height=16", "sampler.width=16", "grpo.updates_per_step=1", "grpo.micro_batch_size=16",
                      "run.steps=2", "grpo.kl_beta=0.1", "optim.lr=1e-2", model=tiny_flux)
    result = train(cfg, reward_fn=brightness, progress=False)
    first, second = result.metrics
    assert first["first_update_max_abs_log_ratio"] < 1e-5  # the learner re-scores the rollout exactly
    assert abs(first["ratio_mean"] - 1) < 1e-5 and first["clipfrac"] == 0.0
    assert first["kl_ref"] == 0.0 and second["kl_ref"] > 0.0  # the update moved the policy off the base
    stock = FluxPipeline.from_pretrained(tiny_flux)
    stock.load_lora_weights(result.run_dir / "adapter")  # the run's export, as a user loads it
    assert count_lora_modules(stock.transformer, adapter=None) == 7


def test_ring_a_bell_searches_the_clip_l_encoder_deterministically(tiny_flux):
    tokenizer, encoder = load_clip_text_encoder(str(tiny_flux))  # FLUX.1's CLIP-L: no projection head
    attack = RingABell(tokenizer, encoder, RingABellConfig(length=4, population=16, generations=15))
    attack.fit_concept(["a red square", "two red circles"], ["a square", "two circles"])
    found = attack.attack("a blue square", seed=0)
    assert found["curve"][-1] < found["curve"][0] and len(found["tokens"]) == 4
    assert attack.attack("a blue square", seed=0)["tokens"] == found["tokens"]
