"""The command line's surface: examples in --help, the JSON Schema export, `safediff compare`, progress in logs."""

import json
import logging
import subprocess
import sys

import jsonschema
import pytest
import yaml

from safediff.cli import EXAMPLES, build_parser, main
from safediff.common.assets import config_path
from safediff.common.progress import track
from safediff.runtime.progress import StepProgress


def test_every_command_has_examples_in_its_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "examples:" in text and EXAMPLES[name][0] in text, name


def test_the_json_schema_accepts_the_shipped_configs_and_names_a_typo(capsys):
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    for name in ("world", "cpu_demo", "gpu8"):
        jsonschema.validate(yaml.safe_load(config_path(name).read_text()), schema)
    typo = yaml.safe_load(config_path("world").read_text())
    typo["grpo"]["group_sise"] = 8
    with pytest.raises(jsonschema.ValidationError, match="group_sise"):
        jsonschema.validate(typo, schema)


def _write_run(path, rewards, kls):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": r, "approx_kl": k}) + "\n" for s, (r, k) in enumerate(zip(rewards, kls))))


def test_compare_draws_and_tabulates_training_runs(tmp_path, capsys):
    _write_run(tmp_path / "a", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [1e-3] * 8)
    _write_run(tmp_path / "b", [0.0, -0.1, -0.2, -0.3], [2e-3, 4e-3, 6e-3, 8e-3])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp"),
                 "--metrics", "reward_mean", "approx_kl"]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    # last quarter of a's 8 steps: steps 6, 7 -> (0.7 + 0.8) / 2; of b's 4 steps: step 3 alone
    assert "| a | reward_mean | 8 | 0.1 | 0.8 | 0.75 |" in table
    assert "| b | reward_mean | 4 | 0 | -0.3 | -0.3 |" in table
    assert "| b | approx_kl | 4 | 0.002 | 0.008 | 0.008 |" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path / "a"), "--metrics", "eval_unsafe_rate"]) == 2
    assert "no run logged eval_unsafe_rate" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2


def test_progress_in_a_log_is_a_line_every_few_steps_not_a_bar(caplog, capsys):
    caplog.set_level(logging.INFO, logger="safediff.progress")
    shown = StepProgress(start=0, total=40, terminal=False)
    for _ in range(40):
        shown.step({"reward_mean": 0.5, "approx_kl": 1e-4})
    shown.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 and lines[0].startswith("step 2/40  reward 0.5000  kl 1.00e-04")
    assert lines[-1].startswith("step 40/40")
    assert "\r" not in capsys.readouterr().err


def test_evaluation_progress_in_a_log_is_lines_and_on_a_terminal_a_bar(caplog, capsys):
    caplog.set_level(logging.INFO, logger="safediff.progress")
    assert list(track(range(7), "evaluate", "batch", terminal=False)) == list(range(7))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  ")[0] for line in lines] == [f"evaluate {i}/7" for i in range(1, 8)]
    assert lines[-1].endswith(" s/batch") and "\r" not in capsys.readouterr().err
    caplog.clear()
    assert list(track(range(100), "score", terminal=False)) == list(range(100))
    assert list(track([], "nothing to do", terminal=False)) == []
    assert list(track(range(5), "off", terminal=False, enabled=False)) == list(range(5))
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == [f"score {i}/100" for i in range(5, 101, 5)]
    list(track(range(3), "drawn", terminal=True))
    assert "drawn" in capsys.readouterr().err and not caplog.records[20:]


def test_quiet_is_accepted_by_every_command_and_silences_info():
    for name in EXAMPLES:
        assert build_parser().parse_args([name, "--quiet", *(["x"] if name in ("eval-compare", "compare") else []),
                                          *(["y"] if name == "eval-compare" else []),
                                          *(["--attack", "prompts"] if name == "attack" else []),
                                          *(["x", "y", "--inception", "z"] if name == "fid-reference" else []),
                                          *(["x"] if name == "build-tiny" else [])]).quiet
    run = subprocess.run([sys.executable, "-m", "safediff.cli", "compare", "--quiet", "nowhere"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stderr.strip() == "error: nowhere: no metrics.jsonl (is it a training run's " \
        "directory?)"
