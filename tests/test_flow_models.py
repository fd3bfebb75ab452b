"""The SD3 family's model layer on a tiny random SD3-architecture pipeline saved in the diffusers layout: strict
loading, prompts encoded as the stock pipeline encodes them, sampling through the loaded bundle equal to the stock
pipeline at zero noise, and a LoRA adapter exported in the format a stock StableDiffusion3Pipeline loads."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open

from safediff.common.config import LoraConfig
from safediff.common.flow_models import build_tiny_sd3_bundle, load_sd3_bundle
from safediff.common.flow_sde import sample_flow_with_logprob
from safediff.common.models import ModelLoadError
from safediff.common.trainable import LoraTrainable, count_lora_modules

PROMPTS = ["a red square", "two blue circles"]


def _stock(folder):
    """A stock pipeline as a user loads an SD3 checkpoint without T5."""
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3_bundle(tmp_path_factory.mktemp("sd3") / "tiny", seed=0)


def test_prompts_are_encoded_and_sampled_as_the_stock_pipeline_does(tiny_sd3):
    bundle = load_sd3_bundle(str(tiny_sd3))
    stock = _stock(tiny_sd3)
    states, pooled = (e := bundle.encode_prompts(PROMPTS)).states, e.pooled
    their_states, their_uncond, their_pooled, their_uncond_pooled = stock.encode_prompt(PROMPTS, None, None)
    assert torch.equal(states, their_states) and torch.equal(pooled, their_pooled)
    # one row; the stock pipeline encodes one per prompt
    uncond, uncond_pooled = (u := bundle.encode_prompts([""])).states, u.pooled
    torch.testing.assert_close(uncond.expand_as(their_uncond), their_uncond, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(uncond_pooled.expand_as(their_uncond_pooled), their_uncond_pooled, rtol=1e-6, atol=1e-6)

    steps = 4
    noise = torch.randn(len(PROMPTS), steps + 1, *bundle.latent_shape(16, 16),
                        generator=torch.Generator().manual_seed(0))
    ours = sample_flow_with_logprob(bundle.velocity(e, u, 4.0), *bundle.schedule(steps, (8, 8)), noise, 0.0)
    theirs = stock(PROMPTS, latents=noise[:, 0], num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                   height=16, width=16).images
    torch.testing.assert_close(ours.latents[:, -1], theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_with_noise_the_sampler_records_every_trainable_step_as_a_function_of_its_noise(tiny_sd3, kind):
    bundle = load_sd3_bundle(str(tiny_sd3))
    e, u = bundle.encode_prompts(PROMPTS), bundle.encode_prompts([""])
    steps = 4
    noise = torch.randn(len(PROMPTS), steps + 1, *bundle.latent_shape(16, 16),
                        generator=torch.Generator().manual_seed(1))

    def sample(level: float):
        return sample_flow_with_logprob(bundle.velocity(e, u, 4.0), *bundle.schedule(steps, (8, 8)), noise, level,
                                        kind)

    ode, sde, again = sample(0.0), sample(0.7), sample(0.7)
    assert sde.latents.shape == (2, steps + 1, 4, 8, 8) and sde.log_probs.shape == (2, steps)
    trainable = steps - 1 if kind == "cps" else steps  # CPS's last step (to sigma 0) has no density
    assert torch.isfinite(sde.log_probs[:, :trainable]).all() and sde.log_probs[:, trainable:].isnan().all()
    assert not torch.allclose(sde.latents[:, -1], ode.latents[:, -1], atol=1e-3)  # the noise was used
    assert torch.equal(again.latents, sde.latents)
    torch.testing.assert_close(again.log_probs, sde.log_probs, rtol=0, atol=0, equal_nan=True)


def test_a_mismatched_weight_is_refused_naming_the_component(tiny_sd3, tmp_path, without_a_weight):
    broken = without_a_weight(tiny_sd3, tmp_path / "broken")
    with pytest.raises(ModelLoadError, match=r"model.pretrained: transformer in .* does not match its architecture"):
        load_sd3_bundle(str(broken))
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_sd3_bundle(str(tmp_path / "missing"))


def test_a_transformer_lora_export_loads_into_the_stock_pipeline_and_gives_the_same_velocity(tiny_sd3, tmp_path):
    """The adapter on the transformer's attention projections, made non-zero, exported by the project's own export
    code: a stock pipeline's `load_lora_weights` reads it, binds every module, and its transformer then predicts the
    same velocity as ours."""
    bundle = load_sd3_bundle(str(tiny_sd3))
    trainable = LoraTrainable(LoraConfig(rank=4, alpha=4), family="sd3")
    modules = trainable.attach(bundle.transformer, seed=0)
    assert modules == 4 * 2  # to_q, to_k, to_v and to_out.0 of the joint attention in each of the two blocks
    state = {k: torch.randn_like(v) * 0.1 for k, v in trainable.state(bundle.transformer).items()}
    trainable.load(bundle.transformer, state)
    folder = trainable.save(state, tmp_path / "adapter")
    assert trainable.load_saved(folder).keys() == state.keys()
    with safe_open(str(folder / trainable.weights_file), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.r"] == 4  # the rank travels with it

    stock = _stock(tiny_sd3)
    stock.load_lora_weights(folder)
    assert count_lora_modules(stock.transformer, adapter=None) == modules
    x = torch.randn(2, *bundle.latent_shape(16, 16))
    states, pooled = (e := bundle.encode_prompts(PROMPTS)).states, e.pooled
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ours = bundle.transformer(hidden_states=x, timestep=t, encoder_hidden_states=states,
                                  pooled_projections=pooled).sample
        theirs = stock.transformer(hidden_states=x, timestep=t, encoder_hidden_states=states,
                                   pooled_projections=pooled).sample
        stock.unload_lora_weights()
        base = stock.transformer(hidden_states=x, timestep=t, encoder_hidden_states=states,
                                 pooled_projections=pooled).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-4)  # the adapter changed the prediction
