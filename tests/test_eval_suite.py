"""`safediff eval` end to end on the shipped miniature-world models: generation through a stock diffusers
pipeline, resume, identity checks, adapters, real NudeNet, disabled scorers, reports and comparisons."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safediff.common.errors import UserInputError
from safediff.evaluation.generate import AdapterError
from safediff.evaluation.run import evaluate


def test_resume_renders_only_missing_chunks_and_the_same_pixels(tmp_path, world_config):
    cfg = world_config(tmp_path, "evaluation.suite.prompts.name=world_glyph", "evaluation.suite.scorers=[world,q16]",
                       "evaluation.suite.allow_missing_scorers=true")
    began = time.perf_counter()
    out = evaluate(cfg, out=tmp_path / "ev", progress=False)
    wall = time.perf_counter() - began
    timing = json.loads((out / "summary.json").read_text())["timing"]
    assert timing["generate"]["images"] == 24 and timing["world"]["images"] == 24 and "q16" not in timing
    assert 0 < timing["world"]["seconds"] and timing["generate"]["seconds"] + timing["world"]["seconds"] < wall
    images = sorted((out / "images").iterdir())
    assert len(images) == 12 * 2  # 12 held-out glyph prompts x 2
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in images}
    # a crash in the middle of the second chunk: its manifest lines were never written, one PNG was
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 24
    (out / "manifest.jsonl").write_text("\n".join(manifest[:16]) + "\n")
    (out / "images" / json.loads(manifest[20])["image"]).unlink()
    scores = (out / "scores" / "world.jsonl").read_text().splitlines()
    (out / "scores" / "world.jsonl").write_text("\n".join(scores[:5]) + "\n" + scores[5][:10])  # a cut line

    evaluate(cfg, out=out, progress=False)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((out / "images").iterdir())}
    assert after.keys() == before.keys()
    first_chunk = {json.loads(line)["image"] for line in manifest[:16]}
    for name, (data, mtime) in after.items():
        assert data == before[name][0]                              # deterministic: the same pixels
        assert (mtime == before[name][1]) == (name in first_chunk)  # only the unfinished chunk was rendered
    world_lines = [json.loads(line) for line in (out / "scores" / "world.jsonl").read_text().splitlines()
                   if line.startswith("{") and line.endswith("}")]
    assert sorted((s["case_number"], s["j"]) for s in world_lines) == sorted(
        (str(c), j) for c in range(12) for j in range(2))          # every image scored once

    summary = json.loads((out / "summary.json").read_text())
    assert "q16" in summary["disabled"] and "evaluation.suite.q16.clip.weights" in summary["disabled"]["q16"]
    report = (out / "report.md").read_text()
    assert "**q16 disabled**" in report and "unsafe rate per family" in report
    assert (out / "grids" / "glyph.png").is_file() and (out / "results.csv").is_file()
    glyph = summary["metrics"]["world_unsafe"]["glyph"]
    flags = [s["world_glyph"] for s in world_lines]
    assert glyph["rate"] == pytest.approx(sum(flags) / len(flags))

    with pytest.raises(UserInputError, match="generated differently.*eta: 0.0 -> 0.5"):
        evaluate(world_config(tmp_path, "evaluation.suite.prompts.name=world_glyph", "evaluation.suite.eta=0.5"),
                 out=out, progress=False)


def test_adapter_evaluation_and_comparison_with_real_nudenet(tmp_path, world_config, random_adapter):
    cfg = world_config(tmp_path, "evaluation.suite.prompts.name=world_benign", "evaluation.suite.prompts.limit=12",
                    "evaluation.suite.scorers=[geneval,clip_t,nudenet]")
    adapter = random_adapter(tmp_path, cfg)
    base = evaluate(cfg, progress=False)
    trained = evaluate(cfg, adapter, progress=False)
    assert base.name == "world_benign-base" and trained.name == "world_benign-trained-adapter"
    b_summary, t_summary = (json.loads((d / "summary.json").read_text()) for d in (base, trained))
    assert t_summary["identity"]["checksum"] and t_summary["identity"]["step"] == 5
    assert b_summary["disabled"] == {} and set(b_summary["metrics"]) >= {"geneval", "clip_t", "nudenet_classes"}
    # provenance: every scorer's files with sha256 (checked against hashlib here), settings, library versions
    import hashlib

    from safediff.common.assets import resolve

    sources = b_summary["provenance"]
    weights = Path(resolve("pkg:world/weights/clip")) / "open_clip_model.safetensors"
    clip_files = {h["path"]: h["sha256"] for h in sources["scorers"]["clip_t"]["clip"]["files"]}
    assert clip_files[str(weights)] == hashlib.sha256(weights.read_bytes()).hexdigest()
    [onnx] = sources["scorers"]["nudenet"]["files"]
    assert onnx["path"].endswith("320n.onnx") and len(onnx["sha256"]) == 64
    assert sources["scorers"]["nudenet"]["flag_classes"][0] == "ANUS_EXPOSED"
    assert sources["scorers"]["geneval"]["detector"] == "world" and sources["libraries"]["torch"]
    assert "### Provenance" in (base / "report.md").read_text()
    differ = sum((base / "images" / p.name).read_bytes() != p.read_bytes() for p in (trained / "images").iterdir())
    assert differ >= 20  # the adapter changes the images

    # NudeNet ran for real on every generated image (none of the world's shapes is nudity)
    lines = [json.loads(s) for s in (base / "scores" / "nudenet.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(s["nudenet_classes"] == [] for s in lines)

    from safediff.evaluation.report import compare

    text = compare(base, trained, tmp_path / "cmp")
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    overall = next(r for r in rows if r["metric"] == "geneval.overall")
    assert overall["first"] == b_summary["metrics"]["geneval"]["overall"]
    assert overall["delta"] == pytest.approx(t_summary["metrics"]["geneval"]["overall"] - overall["first"])
    assert "| geneval.overall |" in text
    paired = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["paired"]
    b_gen, t_gen = b_summary["metrics"]["geneval"], t_summary["metrics"]["geneval"]
    # the same images per prompt in both: the mean paired difference is the difference of the shares
    assert paired["geneval.correct_images"]["delta"] == pytest.approx(t_gen["correct_images"] - b_gen["correct_images"])
    assert paired["geneval.correct_images"]["prompts"] == 12 and "Paired differences" in text

    # LPIPS through the command line, on a random AlexNet saved as torchvision names it
    import torchvision
    from safetensors.torch import save_file

    from safediff.cli import main

    save_file(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alexnet.safetensors")
    assert main(["eval-compare", str(base), str(trained), "--out", str(tmp_path / "cmp2"),
                 "--lpips-backbone", str(tmp_path / "alexnet.safetensors")]) == 0
    lpips = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["lpips"]
    assert (lpips["prompts"], lpips["images"], lpips["resize"]) == (12, 24, "rece") and lpips["lpips"] > 0
    assert lpips["linear"][0]["path"].endswith("v0.1/alex.pth")  # the calibrated layers the package ships
    assert "LPIPS (alex, rece resize)" in (tmp_path / "cmp2" / "comparison.md").read_text()

    state = json.loads((adapter / "state.json").read_text())
    (adapter / "state.json").write_text(json.dumps({**state, "checksum": "0" * 64}))
    with pytest.raises(AdapterError, match="differs from its state.json"):
        evaluate(cfg, adapter, out=tmp_path / "tampered", progress=False)


def test_cli_names_a_missing_adapter_and_a_bad_prompt_file(tmp_path):
    env_cmd = [sys.executable, "-m", "safediff.cli", "eval", "--config", "world"]
    result = subprocess.run([*env_cmd, "--adapter", str(tmp_path / "nope"), f"run.output_dir={tmp_path}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "--adapter" in result.stderr and "pytorch_lora_weights" in result.stderr
    bad = tmp_path / "p.csv"
    bad.write_text("prompt,evaluation_seed\na,1\nb,minus\n")
    result = subprocess.run([*env_cmd, "--prompts", str(bad), f"run.output_dir={tmp_path}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "p.csv: line 3" in result.stderr


def test_an_unusable_scorer_stops_the_evaluation_before_any_image(tmp_path):
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "safediff.cli", "eval", "--config", "world", "--prompts", "world_glyph", "--out",
           str(out)]
    overrides = [f"run.output_dir={tmp_path}", "evaluation.suite.scorers=[world,q16]",
                 f"evaluation.suite.q16.clip.weights={tmp_path / 'missing.pt'}", "evaluation.suite.prompts.limit=2",
                 "evaluation.suite.images_per_prompt=1", "sampler.num_steps=4", "grpo.train_timesteps=4"]
    strict = subprocess.run([*cmd, *overrides], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr, strict.stderr[-2000:]
    assert "scorer q16" in strict.stderr and "evaluation.suite.q16.clip.weights" in strict.stderr
    assert not out.exists()  # no image was generated, no folder made
    allowed = subprocess.run([*cmd, "--allow-missing-scorers", *overrides], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert len(list((out / "images").iterdir())) == 2 and "**q16 disabled**" in (out / "report.md").read_text()
