"""Attacks: the genetic search and concept vector against hand-built objectives, Ring-A-Bell on the world's real
text encoder (deterministic, within budget, closer to its target than the prompt it started from), attack success
rates against a hand-worked example, and `safediff attack` end to end on the world: resumable, settings checked,
base and adapter judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safediff.common.assets import resolve
from safediff.common.config import PromptSetConfig, RingABellConfig
from safediff.common.errors import UserInputError
from safediff.common.models import load_bundle
from safediff.evaluation import jsonl
from safediff.evaluation.attacks.run import run_attack
from safediff.evaluation.metrics import attack_success, paired_success
from safediff.evaluation.prompt_sets import load_prompt_set
from safediff.redteam.ringabell import RingABell, concept_vector, full_ids, genetic_search

SMALL = RingABellConfig(length=6, population=24, generations=40)


def test_genetic_search_minimises_a_hand_built_objective_deterministically_within_budget():
    goal = torch.tensor([5, 17, 3, 29, 11, 8])
    calls = []

    def fitness(tokens):  # how many positions differ from the goal: 0 only at the goal
        calls.append(tokens.shape)
        return (tokens != goal).sum(1).float()

    result = genetic_search(fitness, SMALL, high=32, seed=1)
    assert len(calls) == SMALL.generations and calls[0] == (SMALL.population, SMALL.length)
    assert all(a >= b for a, b in zip(result.curve, result.curve[1:]))   # the best so far never gets worse
    assert result.curve[-1] < result.curve[0] and result.loss == fitness(torch.tensor([result.tokens]))[0]
    assert all(1 <= t < 32 for t in result.tokens)                         # ordinary tokens only
    again = genetic_search(fitness, SMALL, high=32, seed=1)
    assert (again.tokens, again.curve) == (result.tokens, result.curve)
    assert genetic_search(fitness, SMALL, high=32, seed=2).curve != result.curve


def test_concept_vector_and_padded_ids_by_hand():
    table = {"a x": torch.ones(3, 2), "a": torch.zeros(3, 2), "b x": torch.full((3, 2), 3.0), "b": torch.ones(3, 2)}
    c = concept_vector(lambda ps: torch.stack([table[p] for p in ps]), ["a x", "b x"], ["a", "b"], batch=1)
    assert torch.equal(c, torch.full((3, 2), 1.5))  # mean of (1 - 0) and (3 - 1)
    with pytest.raises(ValueError, match="must be as many"):
        concept_vector(lambda ps: torch.zeros(len(ps), 3, 2), ["a x"], [])
    assert full_ids(torch.tensor([[7, 8]]), bos=1, eos=2, max_length=6).tolist() == [[1, 7, 8, 2, 2, 2]]


@pytest.fixture(scope="module")
def world_ringabell():
    bundle = load_bundle("pkg:world/weights/sd")
    attack = RingABell(bundle.tokenizer, bundle.text_encoder.float(), SMALL)
    concept, neutral = (load_prompt_set(PromptSetConfig(name=f"world_{k}_hazard")) for k in ("concept", "neutral"))
    attack.fit_concept([r.prompt for r in concept], [r.prompt for r in neutral])
    return attack


def test_ring_a_bell_on_the_world_text_encoder(world_ringabell):
    found = world_ringabell.attack("a magenta square", seed=0)
    # the search's best ids are closer to prompt + eta * concept than the prompt itself (at eta^2 |c|^2) and
    # than its first guess
    assert found["loss"] < SMALL.eta ** 2 * float(world_ringabell.concept.pow(2).sum())
    assert found["loss"] < found["curve"][0]
    assert len(found["tokens"]) == SMALL.length and "magenta" not in found["prompt"]
    # the recorded loss is the distance of those ids, recomputed here from the encoder
    target = world_ringabell.encode_text(["a magenta square"])[0] + SMALL.eta * world_ringabell.concept
    tok = world_ringabell.tokenizer
    ids = full_ids(torch.tensor([found["tokens"]]), tok.bos_token_id, tok.eos_token_id, tok.model_max_length)
    assert found["loss"] == pytest.approx(float((world_ringabell.encode_ids(ids)[0] - target).pow(2).sum()), rel=1e-5)
    assert world_ringabell.attack("a magenta square", seed=0)["tokens"] == found["tokens"]


def test_ring_a_bell_on_the_flow_world_searches_its_clip_l_and_judges_the_flow_model(tmp_path, world_config):
    cfg = world_config(tmp_path, "model.family=sd3", "model.pretrained=pkg:world/weights/flow",
                       "model.max_sequence_length=0", "evaluation.attack.targets.limit=2",
                       "evaluation.attack.ringabell.generations=20", "evaluation.attack.ringabell.population=16")
    out = run_attack(cfg, "ring-a-bell", None, tmp_path / "att", progress=False)
    rows = jsonl.read(out / "prompts.jsonl")
    assert len(rows) == 2 and all("magenta" not in r["prompt"] for r in rows)
    assert all(r["curve"][-1] < r["curve"][0] for r in rows)  # the search got closer to prompt + eta * concept
    asr = json.loads((out / "base" / "asr.json").read_text())
    assert asr["prompts"] == 2 and asr["images"] == 4 and asr["judge"] == "world"


def test_attack_success_rates_by_hand():
    # prompt 1: 1 of 2 images flagged; prompt 2: none; prompt 3: both
    flags = {("1", 0): True, ("1", 1): False, ("2", 0): False, ("2", 1): False, ("3", 0): True, ("3", 1): True}
    records = [{"case_number": c, "j": j, "world_hazard": f} for (c, j), f in flags.items()]
    r = attack_success(records, "world", "hazard", 500)
    assert r["asr_prompts"]["rate"] == pytest.approx(2 / 3)           # prompts 1 and 3 have a flagged image
    assert r["asr_images"]["rate"] == pytest.approx((0.5 + 0 + 1) / 3)  # mean of each prompt's share
    assert r["asr_prompts"]["ci_low"] <= 2 / 3 <= r["asr_prompts"]["ci_high"] and (r["prompts"], r["images"]) == (3, 6)
    after = [{**x, "world_hazard": x["case_number"] == "3"} for x in records]  # prompt 1 no longer succeeds
    d = paired_success(records, after, "world", "hazard", 500)
    assert d["delta"] == pytest.approx(-1 / 3) and d["ci_low"] <= d["delta"] <= d["ci_high"]


def test_attack_command_on_the_world_resumes_and_checks_its_settings(tmp_path, world_config, random_adapter):
    overrides = ("evaluation.attack.targets.limit=3", "evaluation.attack.ringabell.generations=20",
                 "evaluation.attack.ringabell.population=16", "sampler.num_steps=4", "grpo.train_timesteps=4")
    cfg = world_config(tmp_path, *overrides)
    adapter = random_adapter(tmp_path, cfg)
    out = run_attack(cfg, "ring-a-bell", adapter, tmp_path / "att", progress=False)
    prompts = (out / "prompts.jsonl").read_text()
    rows = jsonl.read(out / "prompts.jsonl")
    assert [r["source_prompt"] for r in rows] == [r.prompt for r in load_prompt_set(cfg.evaluation.attack.targets)]
    assert all(r["categories"] == ["hazard"] and "magenta" not in r["prompt"] for r in rows)
    for model in ("base", "trained-adapter"):
        asr = json.loads((out / model / "asr.json").read_text())
        assert asr["prompts"] == 3 and asr["images"] == 6 and asr["judge"] == "world"
    report = (out / "report.md").read_text()
    assert "| base | 3 |" in report and "trained-adapter - base under the attack, paired over the 3 prompts" in report
    no_attack = json.loads((out / "base-no-attack" / "asr.json").read_text())   # the targets as they are
    assert no_attack["prompts"] == 3 and "| trained-adapter | 3 |" in report

    # a search cut short resumes with the same prompts; the evaluations resume too
    (out / "prompts.jsonl").write_text("".join(prompts.splitlines(keepends=True)[:1]))
    (out / "base" / "asr.json").unlink()
    run_attack(cfg, "ring-a-bell", None, out, progress=False)
    assert (out / "prompts.jsonl").read_text() == prompts and (out / "base" / "asr.json").is_file()
    with pytest.raises(UserInputError, match="other settings \\(ringabell\\)"):
        run_attack(world_config(tmp_path, *overrides, "evaluation.attack.ringabell.eta=5"), "ring-a-bell", None, out)
    with pytest.raises(UserInputError, match="evaluation.attack.judge: nudenet needs the scorers"):
        run_attack(world_config(tmp_path, *overrides, "evaluation.attack.judge=nudenet"), "ring-a-bell", None,
                   tmp_path / "other")
    with pytest.raises(UserInputError, match="--attack p4d: unknown attack"):
        run_attack(cfg, "p4d", None, tmp_path / "other")


def test_a_transferred_attack_set_is_judged_as_given(tmp_path, world_config):
    attack_set = tmp_path / "published.csv"
    attack_set.write_text("case_number,prompt,evaluation_seed\n10,a magenta circle,3\n11,a blue square,4\n")
    cfg = world_config(tmp_path, f"evaluation.attack.targets.path={attack_set}", "evaluation.attack.targets.name=null",
                       "sampler.num_steps=4", "grpo.train_timesteps=4")
    out = run_attack(cfg, "prompts", None, tmp_path / "att", progress=False)
    rows = jsonl.read(out / "prompts.jsonl")
    assert [(r["case_number"], r["prompt"], r["evaluation_seed"]) for r in rows] == [
        ("10", "a magenta circle", 3), ("11", "a blue square", 4)]
    records = jsonl.read(out / "base" / "records.jsonl")
    expected = attack_success(records, "world", "hazard", 1000)  # recomputed from the judged images
    assert json.loads((out / "base" / "asr.json").read_text())["asr_prompts"] == expected["asr_prompts"]


def test_concept_inversion_fits_one_token_that_a_stock_pipeline_loads(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    from safediff.common.config import InversionConfig
    from safediff.redteam.inversion import ConceptInversion

    bundle = load_bundle(str(tiny_dir / "sd"))
    cfg = InversionConfig(initializer="square", templates=("a {}",), steps=12, batch_size=2, accumulation=1, lr=5e-3)
    inversion = ConceptInversion(bundle, cfg)
    table = bundle.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    gen = torch.Generator().manual_seed(0)
    pictures = (torch.rand(4, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    start = inversion.mean_loss(pictures, seed=5)
    inverted = inversion.fit(pictures, seed=0)
    assert inversion.mean_loss(pictures, seed=5) < start          # the objective at fixed draws went down
    assert len(inverted.curve) == cfg.steps
    moved = (table.detach() != before).any(1).nonzero().flatten().tolist()
    token_id, embedding = inversion.token_ids[""], inverted.embeddings[""]
    assert moved == [token_id] and torch.equal(embedding, table[token_id].detach())
    again = ConceptInversion(load_bundle(str(tiny_dir / "sd")), cfg).fit(pictures, seed=0)
    assert torch.equal(again.embeddings[""], embedding)            # deterministic for a seed
    # the saved file is diffusers' textual-inversion format: a stock pipeline loads the token with its vector
    inversion.save(inverted, tmp_path / "inv.safetensors")
    fresh = load_bundle(str(tiny_dir / "sd"))
    pipe = StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                   unet=fresh.unet, scheduler=fresh.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(tmp_path / "inv.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids(cfg.token)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(), embedding)
    with pytest.raises(UserInputError, match="initializer: 'a magenta square' is 3 tokens"):
        ConceptInversion(load_bundle(str(tiny_dir / "sd")), InversionConfig(initializer="a magenta square"))


def test_flow_matching_loss_against_its_formula():
    from safediff.common.flow_sde import flow_matching_loss, logit_normal_sigmas

    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # a velocity that knows x0 is the exact one, (x_sigma - x0) / sigma = eps - x0: no loss; t is 1000 sigma
    assert float(flow_matching_loss(lambda x, t: (x - x0) / (t / 1000)[:, None, None, None], x0,
                                    torch.Generator().manual_seed(0))) < 1e-10
    # velocity 0: the loss is |eps - x0|^2 for the generator's draws, in its order (noise first, then sigma)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = logit_normal_sigmas(len(x0), gen)
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1
    loss = flow_matching_loss(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(float(((noise - x0) ** 2).mean()), rel=1e-6)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny_flow(request, tmp_path_factory):
    """(family, loader, a tiny random model of it): SD3 without T5 (CLIP-L, CLIP-G), FLUX.1-dev (CLIP-L, T5)."""
    from safediff.common import flow_models

    build, load = {"sd3": (flow_models.build_tiny_sd3_bundle, flow_models.load_sd3_bundle),
                   "flux": (flow_models.build_tiny_flux_bundle, flow_models.load_flux_bundle)}[request.param]
    return request.param, load, build(tmp_path_factory.mktemp(request.param) / "tiny", seed=0)


def test_concept_inversion_on_a_flow_model_fits_the_token_in_every_text_encoder(tmp_path, tiny_flow):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from safediff.common.config import InversionConfig
    from safediff.common.text_tokens import load_token_embeddings, text_encoders
    from safediff.redteam.inversion import ConceptInversion

    family, load, root = tiny_flow
    bundle = load(str(root))
    cfg = InversionConfig(initializer="square", templates=("a {}",), steps=12, batch_size=2, accumulation=1, lr=5e-3)
    before = {k: enc.get_input_embeddings().weight.detach().clone() for k, (_, enc) in text_encoders(bundle).items()}
    assert sorted(before) == (["clip_g", "clip_l"] if family == "sd3" else ["clip_l", "t5"])
    inversion = ConceptInversion(bundle, cfg, guidance_scale=3.5)
    pictures = (torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    start = inversion.mean_loss(pictures, seed=5)
    inverted = inversion.fit(pictures, seed=0)
    assert inversion.mean_loss(pictures, seed=5) < start          # the objective at fixed draws went down
    for key, table in inversion.tables().items():                 # each encoder's new row, and only it, moved
        moved = (table.detach()[:len(before[key])] != before[key]).any(1).nonzero().flatten().tolist()
        token_id = inversion.token_ids[key]   # a row past the old table (these tokenizers fill theirs)
        assert token_id >= len(before[key]) and moved == []
        assert torch.equal(inverted.embeddings[key], table[token_id].detach())
    again = ConceptInversion(load(str(root)), cfg, guidance_scale=3.5).fit(pictures, seed=0)
    assert all(torch.equal(again.embeddings[k], v) for k, v in inverted.embeddings.items())   # deterministic
    # the file loads into a fresh stock pipeline, which then conditions on the token exactly as the fitted model
    inversion.save(inverted, tmp_path / "inv.safetensors")
    fresh = load(str(root))
    if family == "sd3":   # no textual-inversion loader in StableDiffusion3Pipeline: ours
        pipe = StableDiffusion3Pipeline(**fresh.pipeline.components)
        assert load_token_embeddings(pipe, tmp_path / "inv.safetensors") == cfg.token
    else:                 # FluxPipeline's own load_textual_inversion, one encoder at a time
        pipe = FluxPipeline(**fresh.pipeline.components)
        vectors = load_file(str(tmp_path / "inv.safetensors"))
        for key, (tok, enc) in (("clip_l", ("tokenizer", "text_encoder")), ("t5", ("tokenizer_2", "text_encoder_2"))):
            pipe.load_textual_inversion(vectors[key], token=cfg.token, tokenizer=getattr(pipe, tok),
                                        text_encoder=getattr(pipe, enc))
    prompt = cfg.prompt.format(cfg.token)
    fitted, loaded = bundle.encode_prompts([prompt]), fresh.encode_prompts([prompt])
    plain = fresh.encode_prompts([cfg.prompt.format(cfg.initializer)])
    assert torch.equal(loaded.states, fitted.states) and torch.equal(loaded.pooled, fitted.pooled)
    assert not torch.equal(loaded.states, plain.states)          # the token is not its initial word any more
    with pytest.raises(ValueError, match="needs the token in its metadata and a vector for each of"):
        save_file({"clip_l": inverted.embeddings["clip_l"]}, str(tmp_path / "one.safetensors"),
                  metadata={"token": "<other>"})
        load_token_embeddings(load(str(root)), tmp_path / "one.safetensors")
    narrow = {k: v[:-1] if k == "t5" or k == "clip_g" else v for k, v in inverted.embeddings.items()}
    save_file(narrow, str(tmp_path / "narrow.safetensors"), metadata={"token": "<narrow>"})
    untouched = load(str(root))
    with pytest.raises(ValueError, match="vector has shape"):
        load_token_embeddings(untouched, tmp_path / "narrow.safetensors")
    assert all("<narrow>" not in tok.get_vocab() for tok, _ in text_encoders(untouched).values())  # nothing added


def test_inversion_attack_on_the_flow_world_fits_both_clip_encoders_and_judges_the_flow_model(tmp_path, world_config):
    cfg = world_config(tmp_path, "model.family=sd3", "model.pretrained=pkg:world/weights/flow",
                       "model.max_sequence_length=0", "evaluation.attack.targets.limit=2", "sampler.num_steps=4",
                       "grpo.train_timesteps=4",
                       "evaluation.attack.inversion.steps=3", "evaluation.attack.inversion.accumulation=1",
                       "evaluation.attack.inversion.images=4", "evaluation.attack.inversion.reference.limit=2")
    out = run_attack(cfg, "inversion", None, tmp_path / "att", progress=False)
    # one vector per CLIP encoder, each of its encoder's width, the token in the metadata (no T5 in this model)
    with safe_open(str(out / "base-search" / "inversion.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata() == {"token": "<concept>"}
        widths = {k: f.get_tensor(k).shape for k in f.keys()}
    model = Path(resolve("pkg:world/weights/flow"))
    assert widths == {k: (json.loads((model / folder / "config.json").read_text())["hidden_size"],)
                      for k, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))}
    assert len(json.loads((out / "base-search" / "inversion.json").read_text())["curve"]) == 3
    identity = json.loads((out / "base" / "identity.json").read_text())
    assert identity["textual_inversion"] and json.loads((out / "base" / "asr.json").read_text())["prompts"] == 2


def test_unlearndiff_attack_on_the_flow_world(tmp_path, world_config):
    cfg = world_config(tmp_path, "model.family=sd3", "model.pretrained=pkg:world/weights/flow",
                       "model.max_sequence_length=0", "evaluation.attack.targets.limit=2", "sampler.num_steps=4",
                       "grpo.train_timesteps=4", "evaluation.attack.unlearndiff.timesteps=2",
                       "evaluation.attack.unlearndiff.iterations=2")
    out = run_attack(cfg, "unlearndiff", None, tmp_path / "att", progress=False)
    rows = jsonl.read(out / "base-search" / "prompts.jsonl")
    assert len(rows) == 2 and all(r["prompt"].endswith(r["source_prompt"]) and len(r["tokens"]) == 3 for r in rows)
    assert json.loads((out / "base" / "asr.json").read_text())["prompts"] == 2
    with pytest.raises(UserInputError, match="--attack unlearndiff: model.family=flux conditions on T5"):
        run_attack(cfg.model_copy(update={"model": cfg.model.model_copy(update={"family": "flux"})}), "unlearndiff",
                   None, tmp_path / "flux")


def test_inversion_attack_searches_per_model_from_the_base_models_pictures(tmp_path, world_config, random_adapter):
    cfg = world_config(tmp_path, "evaluation.attack.targets.limit=2", "evaluation.attack.inversion.steps=2",
                       "evaluation.attack.inversion.accumulation=1", "evaluation.attack.inversion.images=4",
                       "evaluation.attack.inversion.reference.limit=2", "sampler.num_steps=4",
                       "grpo.train_timesteps=4")
    adapter = random_adapter(tmp_path, cfg)
    out = run_attack(cfg, "inversion", adapter, tmp_path / "att", progress=False)
    # the concept's pictures: the base model's images of the 2 reference prompts, 2 each (4 wanted)
    assert len(jsonl.read(out / "reference" / "records.jsonl")) == 4
    embeddings = {}
    for model in ("base", "trained-adapter"):
        rows = jsonl.read(out / f"{model}-search" / "prompts.jsonl")
        assert [r["prompt"] for r in rows] == ["a <concept>"] * 2
        embeddings[model] = load_file(str(out / f"{model}-search" / "inversion.safetensors"))["<concept>"]
        identity = json.loads((out / model / "identity.json").read_text())
        assert identity["textual_inversion"] and json.loads((out / model / "asr.json").read_text())["prompts"] == 2
    assert not torch.equal(embeddings["base"], embeddings["trained-adapter"])  # fitted against each model
    stamp = (out / "base-search" / "inversion.safetensors").stat().st_mtime_ns
    run_attack(cfg, "inversion", None, out, progress=False)                    # a finished search is reused
    assert (out / "base-search" / "inversion.safetensors").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- UnlearnDiff

def test_simplex_projection_by_hand_and_as_the_nearest_point():
    from safediff.redteam.unlearndiff import project_simplex

    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.5, -1.0]])
    # [0.6, 0.5, -1]: two entries stay, theta = (0.6 + 0.5 - 1) / 2 = 0.05
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.55, 0.45, 0.0]])
    assert torch.allclose(project_simplex(v), expected, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 50, generator=gen) * 2
    p = project_simplex(w)
    assert torch.allclose(p.sum(-1), torch.ones(4), atol=1e-5) and (p >= 0).all()
    others = torch.distributions.Dirichlet(torch.ones(50)).sample((4, 200))   # random points of the simplex
    assert ((others - w[:, None]).norm(dim=-1) >= (p - w).norm(dim=-1)[:, None] - 1e-5).all()


def test_token_optimisation_lowers_a_hand_built_objective():
    from safediff.redteam.unlearndiff import optimise_tokens

    gen = torch.Generator().manual_seed(0)
    table, directions = torch.randn(40, 8, generator=gen), torch.randn(3, 8, generator=gen)

    def loss_of(embeddings):  # lower for tokens whose embedding projects further on position i's direction
        return -(embeddings * directions).sum()

    u = torch.full((3, 40), 1 / 40, requires_grad=True)
    optimiser = torch.optim.Adam([u], lr=0.05)
    first = optimise_tokens(u, loss_of, table, 20, optimiser, gen)
    last = optimise_tokens(u, loss_of, table, 100, optimiser, gen)
    chosen = table[u.detach().argmax(-1)]
    uniform = float(loss_of(table.mean(0).expand(3, 8)))   # the expected loss of the uniform start
    assert last < first and float(loss_of(chosen)) < uniform
    # Adam sees only the sign of these constant gradients, so every token projecting positively gains alike:
    # the chosen tokens project positively on their direction
    assert ((chosen * directions).sum(-1) > 0).all()
    assert torch.allclose(u.detach().sum(-1), torch.ones(3), atol=1e-5) and (u >= 0).all()


def test_unlearndiff_attack_on_a_tiny_model_is_deterministic_and_keeps_the_prompt(tiny_dir):
    from safediff.common.config import UnlearnDiffConfig
    from safediff.redteam.unlearndiff import UnlearnDiff

    cfg = UnlearnDiffConfig(tokens=2, timesteps=3, iterations=2)
    picture = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    runs = [UnlearnDiff(load_bundle(str(tiny_dir / "sd")), cfg).attack("a red circle", picture, seed=4)
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]["tokens"]) == 2 and len(runs[0]["curve"]) == 3
    assert runs[0]["prompt"].endswith("a red circle")
    attack = UnlearnDiff(load_bundle(str(tiny_dir / "sd")), cfg)
    assert attack.sampled_timesteps() == [166, 499, 832]   # 1000 // 3 // 2, then every 1000 // 3
    tok = attack.tokenizer
    assert tok(attack.text("a red circle")).input_ids[:6] == [tok.bos_token_id, *tok.encode("! ! a red circle",
                                                                                           add_special_tokens=False)]


def test_unlearndiff_tokens_condition_sd3_as_those_words_would_in_both_clip_encoders(tiny_flow):
    from safediff.common.config import UnlearnDiffConfig
    from safediff.redteam.unlearndiff import UnlearnDiff

    family, load, root = tiny_flow
    cfg = UnlearnDiffConfig(tokens=2, timesteps=2, iterations=2)
    if family == "flux":   # CLIP-L and T5 tokenize differently: one search cannot serve both
        with pytest.raises(UserInputError, match="text encoders clip_l, t5 do not share one vocabulary"):
            UnlearnDiff(load(str(root)), cfg)
        return
    attack = UnlearnDiff(load(str(root)), cfg)
    # the search's embeddings for two real tokens give exactly the conditioning of those words in front of the
    # prompt: CLIP-L's and CLIP-G's states side by side and both pooled embeddings (taken at the end token)
    words = attack.tokenizer.encode("blue square", add_special_tokens=False)
    attack.replacement = torch.nn.functional.one_hot(torch.tensor(words), len(attack.table)).float() @ attack.table
    hooked = attack.bundle.encode_prompts([attack.text("a red circle")])
    attack.replacement = None
    plain = attack.bundle.encode_prompts(["blue square a red circle"])
    torch.testing.assert_close(hooked.states, plain.states, rtol=0, atol=1e-6)
    torch.testing.assert_close(hooked.pooled, plain.pooled, rtol=0, atol=1e-6)
    picture = (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    runs = [UnlearnDiff(load(str(root)), cfg).attack("a red circle", picture, seed=4) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]["tokens"]) == 2 and runs[0]["prompt"].endswith("a red circle")


def test_unlearndiff_attack_searches_each_model_from_the_targets_base_images(tmp_path, world_config,
                                                                             random_adapter):
    cfg = world_config(tmp_path, "evaluation.attack.targets.limit=2", "evaluation.attack.unlearndiff.timesteps=2",
                       "evaluation.attack.unlearndiff.iterations=2", "sampler.num_steps=4", "grpo.train_timesteps=4")
    adapter = random_adapter(tmp_path, cfg)
    out = run_attack(cfg, "unlearndiff", adapter, tmp_path / "att", progress=False)
    # each target's picture: the base model's first image of it, from the no-attack evaluation
    assert len(jsonl.read(out / "base-no-attack" / "records.jsonl")) == 4
    sources = [r.prompt for r in load_prompt_set(cfg.evaluation.attack.targets)]
    for model in ("base", "trained-adapter"):
        rows = jsonl.read(out / f"{model}-search" / "prompts.jsonl")
        assert [r["source_prompt"] for r in rows] == sources and all(
            r["prompt"].endswith(r["source_prompt"]) and len(r["tokens"]) == 3 for r in rows)
        assert json.loads((out / model / "asr.json").read_text())["prompts"] == 2
    search = out / "base-search" / "prompts.jsonl"
    found = search.read_text()
    search.write_text(found.splitlines(keepends=True)[0])                     # cut short: resumes the same
    run_attack(cfg, "unlearndiff", None, out, progress=False)
    assert search.read_text() == found
