import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from safediff.common.assets import package_root
from safediff.common.config import SAFE_ANCHORS, UNSAFE_ANCHORS, Config, ConfigError, dump_config, load_config


def test_defaults_reproduce_the_reference():
    cfg = Config()
    assert (cfg.sampler.num_steps, cfg.sampler.eta, cfg.sampler.guidance_scale) == (50, 1.0, 5.0)
    assert (cfg.sampler.height, cfg.sampler.width, cfg.sampler.negative_prompt) == (512, 512, "")
    assert cfg.reward.alpha == 0.5 and cfg.reward.steer == "all" and not cfg.reward.jpeg_roundtrip
    assert cfg.reward.clip.model == "ViT-H-14"
    assert len(SAFE_ANCHORS) == 5 and len(UNSAFE_ANCHORS) == 3
    assert cfg.reward.safe_anchors[0] == "a safe" and cfg.reward.unsafe_anchors[1] == "pornographic material"
    g = cfg.grpo
    assert (g.group_size, g.adv_eps, g.adv_clip, g.clip_range, g.train_timesteps, g.kl_beta) == \
        (16, 1e-8, 2.5, 1e-4, 49, 0.0)
    # 32 prompts x 16 images = 512 images, 16 optimiser steps per epoch of 4 x 8 micro-batches
    assert g.prompts_per_step * g.group_size == 512 and g.updates_per_step == 16
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.max_grad_norm) == (1e-5, 1e-4, 1.0)
    assert cfg.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")


def _walk(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, prefix + name + ".")


def test_every_field_is_documented():
    undocumented = [name for name, field in _walk(Config) if not field.description]
    assert not undocumented


def test_typo_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  clip_rang: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.count("\n") == 0 and "grpo.clip_rang" in msg and "unknown field" in msg and str(path) in msg


def test_bad_values_name_each_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["grpo.group_size=1", "sampler.eta=0"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert any("grpo.group_size" in line for line in lines) and any("sampler.eta" in line for line in lines)


@pytest.mark.parametrize("overrides, needle", [
    (["grpo.train_timesteps=60"], "grpo.train_timesteps"),
    (["grpo.updates_per_step=7"], "grpo.updates_per_step"),
    (["grpo.micro_batch_size=5"], "grpo.micro_batch_size"),
    (["reward.steer=unsafe_only"], "prompts.sources"),
    (["model.finetune=full", "grpo.kl_beta=0.1"], "grpo.kl_beta"),
    (["model.family=sd3", "model.finetune=full"], "model.finetune=full supports model.family=unet only"),
    (["model.family=sd3", "sampler.sde_kind=cps", "sampler.num_steps=10", "grpo.train_timesteps=10"],
     "grpo.train_timesteps .10. must be below sampler.num_steps"),
    (["grpo.compile=true", "cluster.zero_stage=3"], "grpo.compile needs cluster.zero_stage 0-2"),
    (["grpo.behaviour_max_log_ratio=0.01"], "grpo.behaviour_max_log_ratio needs grpo.objective=decoupled"),
    (["grpo.target_kl=0.001", "grpo.updates_per_step=1"], "grpo.target_kl needs at least two updates per step"),
    (["model.family=flux", "prompts.adversarial.targets=t.txt"], "prompts.adversarial: model.family=flux conditions "
                                                                 "on T5"),
])
def test_cross_field_checks(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(None, ["grpo.group_size=8", "lora.target_modules=[to_q, to_v]", "run.name=x y",
                             "reward.jpeg_roundtrip=true", "prompts.sources=[{path: a.txt, weight: 2, unsafe: true}]"])
    assert cfg.grpo.group_size == 8 and cfg.lora.target_modules == ("to_q", "to_v") and cfg.run.name == "x y"
    assert cfg.reward.jpeg_roundtrip is True
    assert cfg.prompts.sources[0].weight == 2 and cfg.prompts.sources[0].unsafe is True


def test_a_numeric_override_part_sets_a_field_of_one_list_item(tmp_path):
    two = "prompts.sources=[{path: a.txt}, {path: b.txt, weight: 5}]"
    cfg = load_config(None, [two, "prompts.sources.0.path=x.txt", "prompts.sources.1.weight=2"])  # an override's list
    assert [(str(s.path), s.weight) for s in cfg.prompts.sources] == [("x.txt", 1.0), ("b.txt", 2.0)]
    path = tmp_path / "c.yaml"
    path.write_text("prompts:\n  sources:\n    - path: a.txt\n    - path: b.txt\n      weight: 5\n")
    cfg = load_config(path, ["prompts.sources.1.unsafe=true", "prompts.sources.0.weight=3"])  # the file's list
    assert [(str(s.path), s.weight, s.unsafe) for s in cfg.prompts.sources] == [("a.txt", 3.0, None),
                                                                                ("b.txt", 5.0, True)]
    cfg = load_config(None, ["prompts.sources.0.weight=4", "lora.target_modules.1=to_k2"])  # the defaults' lists
    assert cfg.prompts.sources[0].weight == 4 and cfg.prompts.sources[0].path == Config().prompts.sources[0].path
    assert cfg.lora.target_modules == ("to_q", "to_k2", "to_v", "to_out.0")


@pytest.mark.parametrize("overrides, message", [
    (["prompts.sources=[{path: a.txt}, {path: b.txt}]", "prompts.sources.3.path=x.txt"],
     "override prompts.sources.3.path: the list prompts.sources has 2 items (indices 0-1)"),
    (["prompts.sources.1.weight=2"],
     "override prompts.sources.1.weight: the list prompts.sources has 1 item (index 0)"),
    (["prompts.sources=[]", "prompts.sources.0.path=x"], "override prompts.sources.0.path: the list prompts.sources "
     "is empty"),
    (["run.name.0=x"], "override run.name.0: run.name is not a list, so '0' cannot index it"),
    (["prompts.0.path=x"], "override prompts.0.path: prompts is not a list, so '0' cannot index it"),
    (["prompts.sources=[{}]", "prompts.sources.0.path.0=x"], "override prompts.sources.0.path.0: "
     "prompts.sources.0.path is not a list, so '0' cannot index it"),   # a required field: no default to index
    (["prompts.sources.0.weight=2", "prompts.sources.path=x"], "override prompts.sources.path: prompts.sources is a "
     "list, indexed by number: it has 1 item (index 0)"),
    (["prompts.sourcez.0.path=x"], "override prompts.sourcez.0.path: prompts.sourcez: unknown field (did you mean "
     "'sources'?)"),
])
def test_a_bad_list_index_in_an_override_is_one_line_naming_it(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "", "..", "a\\b", "'bell\\a'"])
def test_a_run_name_is_one_folder_name(name):
    # the run's folder, Redis keys and lease: '..' would put metrics.jsonl and checkpoints beside output_dir
    with pytest.raises(ConfigError, match=r"^config error in <defaults> \+ overrides: run.name: .* not one folder"):
        load_config(None, [f"run.name={name}"])
    assert load_config(None, ["run.name=seed 0.v2"]).run.name == "seed 0.v2"


def test_malformed_yaml_and_bad_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(path)
    path.write_text("run:\n  name: x\n grpo: [\n")  # the file and the line, not "<unicode string>"
    with pytest.raises(ConfigError, match=f"^config error in {path}, line 3, column 2: not valid YAML") as err:
        load_config(path)
    assert "unicode string" not in str(err.value)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["novalue"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["grpo.kl_beta=0.05", "reward.safe_anchors=[]"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.grpo.group_size = 3


def test_cli_prints_one_line_error_and_exit_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampler:\n  num_step: 10\n")
    proc = subprocess.run([sys.executable, "-m", "safediff.cli", "config", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "sampler.num_step: unknown field" in proc.stderr


def test_resume_differences_name_the_fields_that_change_the_numbers():
    from safediff.common.config import resume_differences

    saved = dump_config(load_config(None, ["run.steps=10", "grpo.group_size=8"]))
    assert resume_differences(saved, load_config(None, ["run.steps=50", "grpo.group_size=8",
                                                         "cluster.rollout_actors=4"])) == []
    assert resume_differences(saved, load_config(None, ["grpo.group_size=4", "optim.lr=0.001"])) == [
        "grpo.group_size: 8 -> 4", "optim.lr: 1e-05 -> 0.001"]


def test_kuberay_manifests_wire_gcs_fault_tolerance_to_the_redis_they_define():
    import yaml

    job = yaml.safe_load((package_root() / "deploy/kuberay-rayjob.yaml").read_text())
    redis_docs = {d["kind"]: d for d in yaml.safe_load_all((package_root() / "deploy/kuberay-redis.yaml").read_text())}
    ft = job["spec"]["rayClusterSpec"]["gcsFaultToleranceOptions"]
    service = redis_docs["Service"]
    assert ft["redisAddress"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis_env = redis_docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": secret["name"], "key": secret["key"]} in [e["valueFrom"]["secretKeyRef"] for e in redis_env]
    assert service["spec"]["type"] == "ClusterIP" and job["spec"]["backoffLimit"] >= 1


def test_kuberay_run_store_uses_tls_a_password_file_and_a_network_policy():
    """The driver's store URL carries no password and speaks TLS to the port the Service exposes; the password file
    the entrypoint names is mounted from the Redis Secret; only Pods labelled as clients reach Redis."""
    import yaml

    job = yaml.safe_load((package_root() / "deploy/kuberay-rayjob.yaml").read_text())
    redis_docs = {d["kind"]: d for d in yaml.safe_load_all((package_root() / "deploy/kuberay-redis.yaml").read_text())}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    container = head["spec"]["containers"][0]
    url = next(e["value"] for e in container["env"] if e["name"] == "SAFEDIFF_REDIS_URL")
    tls_port = next(p["port"] for p in redis_docs["Service"]["spec"]["ports"] if p["name"] == "redis-tls")
    assert url.startswith(f"rediss://safediff-redis:{tls_port}/") and "@" not in url
    password_file = Path(job["spec"]["entrypoint"].split("store.password_file=")[1].split()[0])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == password_file.parent)
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "safediff-redis" and password_file.name == "password"
    policy = redis_docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis_docs["Deployment"]["spec"]["selector"]["matchLabels"]
    allowed = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= head["metadata"]["labels"].items()


def test_cli_version_is_the_installed_package_version():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "safediff.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"safediff {version('safediff')}"


def test_a_mistyped_field_gets_a_did_you_mean_from_its_own_section():
    for override, expected in [("grpo.group_szie=4", "grpo.group_szie: unknown field (did you mean 'group_size'?)"),
                               ("gpro.group_size=4", "gpro: unknown field (did you mean 'grpo'?)"),
                               ("prompts.sources=[{path: a.txt, wieght: 2}]",
                                "prompts.sources.0.wieght: unknown field (did you mean 'weight'?)")]:
        with pytest.raises(ConfigError) as err:
            load_config("world", [override])
        assert expected in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("world", ["grpo.zzz=1"])
    assert str(err.value).endswith("grpo.zzz: unknown field")  # nothing close: no guess


def test_section_at_follows_nested_sections_and_list_indices():
    from safediff.common.config import ClipConfig, PromptSource, WandbConfig, section_at

    assert section_at("") is Config and section_at("reward.clip") is ClipConfig  # a nested model field
    assert section_at("tracking.wandb") is WandbConfig  # through `X | None`
    assert section_at("prompts.sources.1") is section_at(("prompts", "sources", 1)) is PromptSource  # index skipped
    assert "weight" in section_at("prompts.sources.0").model_fields
    assert section_at("grpo.clip_range") is None  # a leaf is no section
    assert section_at("grpo.clip_rang") is None and section_at(("gpro", 0)) is None  # unknown fields


def test_a_path_the_cli_cannot_write_is_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "safediff.cli", "build-tiny", "/proc/forbidden"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: /proc/forbidden: No such file or directory"]


def test_config_describe_lists_every_field_with_its_default_and_description():
    import yaml

    proc = subprocess.run([sys.executable, "-m", "safediff.cli", "config", "--describe"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    described = dict(line.split(" = ", 1) for line in lines[0::2])
    assert all(line.startswith("    ") and line.strip() for line in lines[1::2])  # a description under each

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    defaults = dict(leaves(yaml.safe_load(dump_config(load_config(None)))))  # independent: the dumped defaults
    assert defaults.keys() <= described.keys()
    for field, value in defaults.items():
        assert yaml.safe_load(described[field]) == value, field


def test_a_config_extends_another_field_by_field(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, steps: 7}\nsampler: {num_steps: 9, guidance_scale: 3}\n"
                                        "grpo: {train_timesteps: 8}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsampler: {num_steps: 12}\n")  # beside the file
    child = load_config(tmp_path / "child.yaml")
    assert (child.run.name, child.run.steps, child.sampler.num_steps, child.sampler.guidance_scale) == \
        ("base", 7, 12, 3.0)
    flow, world = load_config("world_flow"), load_config("world")  # a built-in name
    assert flow.model.family == "sd3" and flow.reward == world.reward and flow.prompts == world.prompts
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    (tmp_path / "odd.yaml").write_text("extends: [a, b]\n")
    (tmp_path / "missing.yaml").write_text("extends: nowhere\n")
    for name, needle in (("loop.yaml", "loop.yaml: extends: makes a loop"),
                         ("odd.yaml", "odd.yaml: extends: must name one config"),
                         ("missing.yaml", "missing.yaml: --config nowhere: no such file")):
        with pytest.raises(ConfigError, match=needle) as err:
            load_config(tmp_path / name)
        assert "\n" not in str(err.value)


def test_every_shipped_config_validates_and_names_its_model_family():
    configs = sorted((package_root() / "deploy" / "configs").glob("*.yaml"))
    assert {"world", "sd35m_gpu8", "flux1dev_gpu8"} <= {p.stem for p in configs}
    for path in configs:
        cfg = load_config(path.stem)
        assert cfg.model.family == {"sd35m_gpu8": "sd3", "flux1dev_gpu8": "flux", "world_flow": "sd3"}.get(
            path.stem, "unet"), path.name
