import json
import math

import numpy as np
import open_clip
import pytest
import torch

from safediff.common.config import ClipConfig, ConfigError, RewardConfig, load_config
from safediff.reward_server.clip_model import TINY_CLIP_CONFIG, ClipLoadError, load_clip
from safediff.reward_server.steering import (
    SteeringReward,
    jpeg_roundtrip,
    safety_direction,
    steered_targets,
    steering_reward,
)

e1, e2, e3 = torch.eye(3)


def test_formula_against_a_hand_computation():
    # S = {e1}, U = {e2}: v_safe = (e1 - e2)/sqrt(2). Prompt e3, alpha 0.5:
    # z = (e3 + 0.5 v_safe) / sqrt(1 + 0.25); image e1: r = (0.5/sqrt(2)) / sqrt(1.25) = 0.316227766...
    v = safety_direction(e1[None], e2[None])
    torch.testing.assert_close(v, torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2))
    z = steered_targets(e3[None], v, alpha=0.5)
    r = steering_reward(e1[None], z)
    assert r.item() == pytest.approx(0.316227766, abs=1e-6)
    # image e3 (on the prompt): r = 1 / sqrt(1.25)
    assert steering_reward(e3[None], z).item() == pytest.approx(1 / math.sqrt(1.25), abs=1e-6)


def test_anchor_means_and_unsafe_only_variant():
    safe = torch.stack([e1, e3])  # mean (0.5, 0, 0.5)
    unsafe = torch.stack([e2, e2])
    v = safety_direction(safe, unsafe)  # n(0.5, -1, 0.5) = (0.5, -1, 0.5)/sqrt(1.5)
    torch.testing.assert_close(v, torch.tensor([0.5, -1.0, 0.5]) / math.sqrt(1.5))
    v_u = safety_direction(torch.zeros(0, 3), unsafe)  # unsafe-anchor only: n(-e2)
    torch.testing.assert_close(v_u, -e2)


def test_steer_mask_leaves_safe_prompts_unsteered():
    v = safety_direction(e1[None], e2[None])
    prompts = torch.stack([e3, e3])
    z = steered_targets(prompts, v, 1.0, steer=torch.tensor([True, False]))
    torch.testing.assert_close(z[1], e3)
    torch.testing.assert_close(z[0], (e3 + v) / math.sqrt(2))


def test_prompt_weight_scales_the_prompt_term_and_zero_leaves_the_safety_direction():
    v = safety_direction(e1[None], e2[None])
    # w = 2, alpha = 1: z = n(2 e3 + v) = (2 e3 + v) / sqrt(5)
    torch.testing.assert_close(steered_targets(e3[None], v, 1.0, prompt_weight=2.0)[0], (2 * e3 + v) / math.sqrt(5))
    torch.testing.assert_close(steered_targets(e3[None], v, 0.5, prompt_weight=0.0)[0], v)  # negative-only
    with pytest.raises(ConfigError, match="reward.prompt_weight=0"):
        load_config(None, ["reward.prompt_weight=0", "reward.alpha=0"])


@pytest.fixture(scope="module")
def clip(tiny_dir):
    return load_clip(ClipConfig(model=f"local-dir:{tiny_dir / 'clip'}"))


def _images(n, seed=0, size=32):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_reward_end_to_end_matches_numpy_recomputation(clip):
    cfg = RewardConfig(clip=ClipConfig(model="local-dir:x"), alpha=0.7)
    reward = SteeringReward(clip, cfg)
    images, prompts = _images(5), ["a cat", "a dog", "a cat", "nudity", "a gun"]
    out = reward(images, prompts, groups=[3, 2])
    # independent recomputation in float64 numpy from the raw (unnormalised) encoder outputs
    from safediff.reward_server.clip_model import preprocess
    with torch.no_grad():
        img = clip.model.encode_image(preprocess(images, clip.image_size, clip.mean, clip.std)).double().numpy()
        txt = lambda ts: clip.model.encode_text(clip.tokenizer(ts)).double().numpy()  # noqa: E731
        S, U, P = txt(list(cfg.safe_anchors)), txt(list(cfg.unsafe_anchors)), txt(prompts)
    n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    v = n(n(S).mean(0) - n(U).mean(0))
    z = n(n(P) + 0.7 * v)
    expected = (n(img) * z).sum(-1)
    np.testing.assert_allclose(out.rewards.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.cos_prompt.numpy(), (n(img) * n(P)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.cos_safe.numpy(), n(img) @ v, rtol=1e-5, atol=1e-5)
    for group in (slice(0, 3), slice(3, 5)):  # each image's mean cosine distance to the rest of its group
        e = n(img[group])
        distance = 1 - e @ e.T
        np.testing.assert_allclose(out.diversity[group].numpy(), distance.sum(1) / (len(e) - 1), rtol=1e-5,
                                   atol=1e-6)
    assert reward(images, prompts).diversity is None  # no groups given


def test_group_diversity_by_hand():
    from safediff.reward_server.steering import group_diversity

    emb = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    # group [0, 1, 2]: cos = 1 between 0 and 1, 0 with 2 -> (0 + 1) / 2, (0 + 1) / 2, (1 + 1) / 2; group [3]: 0
    torch.testing.assert_close(group_diversity(emb, [3, 1]), torch.tensor([0.5, 0.5, 1.0, 0.0]))


def test_text_embeddings_are_cached(clip):
    reward = SteeringReward(clip, RewardConfig(clip=ClipConfig(model="local-dir:x")))
    calls = []
    original = clip.encode_text
    clip.encode_text = lambda texts: calls.append(list(texts)) or original(texts)
    try:
        reward(_images(4), ["a", "b", "a", "b"])
        reward(_images(2), ["a", "c"])
    finally:
        clip.encode_text = original
    assert calls == [["a", "b"], ["c"]]


def test_unsafe_only_needs_labels_and_jpeg_roundtrip_is_close(clip):
    cfg = RewardConfig(clip=ClipConfig(model="local-dir:x"), steer="unsafe_only")
    reward = SteeringReward(clip, cfg)
    with pytest.raises(ValueError, match="unsafe label"):
        reward(_images(2), ["a", "b"], [True, None])
    out = reward(_images(2), ["a", "a"], [True, False])
    plain = SteeringReward(clip, RewardConfig(clip=ClipConfig(model="local-dir:x"), alpha=0.0))(_images(2), ["a", "a"])
    assert out.rewards[1] == pytest.approx(plain.rewards[1].item(), abs=1e-6)  # unsteered
    assert out.rewards[0] != pytest.approx(plain.rewards[0].item(), abs=1e-6)
    smooth = torch.nn.functional.interpolate(_images(2, size=8).float(), size=32, mode="bilinear").to(torch.uint8)
    jpeg = jpeg_roundtrip(smooth, 75)
    assert jpeg.dtype == torch.uint8 and jpeg.shape == smooth.shape
    assert 0 < (jpeg.float() - smooth.float()).abs().mean() < 10


def test_bad_images_are_refused(clip):
    reward = SteeringReward(clip, RewardConfig(clip=ClipConfig(model="local-dir:x")))
    with pytest.raises(ValueError, match="uint8"):
        reward(torch.rand(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="prompts"):
        reward(_images(2), ["a"])


def test_anchor_file(clip, tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("safe: []\nunsafe: [a red square]\n")
    reward = SteeringReward(clip, RewardConfig(clip=ClipConfig(model="local-dir:x"), anchors_file=path))
    torch.testing.assert_close(reward.v_safe, -clip.encode_text(["a red square"])[0])
    path.write_text("safe: [x]\n")
    with pytest.raises(ConfigError, match="reward.anchors_file.*no unsafe"):
        SteeringReward(clip, RewardConfig(clip=ClipConfig(model="local-dir:x"), anchors_file=path))
    path.write_text("safe: a safe\nunsafe: 5\n")
    with pytest.raises(ConfigError, match="must be lists"):
        SteeringReward(clip, RewardConfig(clip=ClipConfig(model="local-dir:x"), anchors_file=path))


def test_builtin_architecture_with_an_hps_style_state_dict(tmp_path):
    """The HPSv2.1 path: a registered architecture + a torch file {'state_dict': {'module.'+k: v}}."""
    cfg_path = tmp_path / "tiny-test-arch.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_path)
    source = open_clip.create_model("tiny-test-arch")
    weights = tmp_path / "hps_like.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, weights)
    loaded = load_clip(ClipConfig(model="tiny-test-arch", weights=weights))
    torch.testing.assert_close(loaded.encode_text(["a cat"]),
                               torch.nn.functional.normalize(source.encode_text(open_clip.tokenize(["a cat"])), dim=-1))
    with pytest.raises(ClipLoadError, match="reward.clip.weights: no such file"):
        load_clip(ClipConfig(model="tiny-test-arch", weights=tmp_path / "missing.pt"))
    with pytest.raises(ClipLoadError, match="reward.clip.weights: a local weights file is required"):
        load_clip(ClipConfig(model="ViT-H-14"))
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, bad)
    with pytest.raises(ClipLoadError, match="does not fit"):
        load_clip(ClipConfig(model="tiny-test-arch", weights=bad))
    for name, content in (("garbage.pt", b"not a checkpoint"), ("garbage.safetensors", b"\x00" * 16)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ClipLoadError, match="reward.clip.weights: .*does not fit"):
            load_clip(ClipConfig(model="tiny-test-arch", weights=tmp_path / name))
