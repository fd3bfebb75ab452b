"""Secrets: a Redis password never reaches a file, a log, the Redis keys or the process list; files that must hold
one are private from their first byte; the password may come from its own file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from safediff.common.config import load_config
from safediff.common.errors import UserInputError
from safediff.common.secrets import redact_url, write_private
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore, store_url

PASSWORD = "Kq7-known-pw/with@odd:chars"  # '/', '@' and ':' must survive URL quoting and masking


def test_redact_url_masks_only_the_password():
    assert redact_url("redis://:pw@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redact_url("rediss://alice:p@ss@h:6380/1") == "rediss://alice:***@h:6380/1"
    assert redact_url("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"
    assert redact_url("redis://alice@h:6379") == "redis://alice@h:6379"  # a user name alone is no secret


def test_password_file_fills_the_url_and_bad_files_name_the_field(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\nignored\n")
    with EmbeddedRedis(tmp_path / "redis", password=PASSWORD) as server:
        url = store_url(f"redis://127.0.0.1:{server.port}/0", pw)
        assert RunStore(url, "r").status() is None  # the server took the password from the file
        monkeypatch.setenv("SAFEDIFF_REDIS_URL", f"redis://127.0.0.1:{server.port}/0")
        assert store_url(None, pw) == url
    monkeypatch.delenv("SAFEDIFF_REDIS_URL")
    (tmp_path / "empty").write_text("\n")
    for url, path, message in [("redis://h:1/0", tmp_path / "missing", "cannot read"),
                               ("redis://h:1/0", tmp_path / "empty", "no password on its first line"),
                               ("redis://:x@h:1/0", pw, "already has a password"),
                               (None, pw, "set store.url or \\$SAFEDIFF_REDIS_URL")]:
        with pytest.raises(UserInputError, match=f"^store.password_file: .*{message}") as err:
            store_url(url, path)
        assert PASSWORD not in str(err.value)
    with pytest.raises(Exception, match="store.password_file: store.url already has a password"):
        load_config("cpu_demo", ["store.url=redis://:x@h:1/0", f"store.password_file={pw}"])


def test_private_files_are_0600_from_the_first_byte(tmp_path):
    old = os.umask(0)  # the most permissive umask: a create-then-chmod would leave a 0666 window
    try:
        write_private(tmp_path / "new.json", "{}")
        (tmp_path / "old.json").write_text("x")  # an existing world-readable file is narrowed too
        write_private(tmp_path / "old.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "old.json").stat().st_mode & 0o777 == 0o600 and (tmp_path / "old.json").read_text() == "{}"


def test_the_embedded_servers_password_is_not_in_its_command_line(tmp_path):
    with EmbeddedRedis(tmp_path / "redis", password=PASSWORD) as server:
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in cmdline and b"requirepass" not in cmdline
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()


def _grep(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_run_writes_and_prints_no_password(tiny_dir, tmp_path, prompt_file):
    """A training run on a password-protected Redis, given on its command line: every file it writes (config dumps,
    checkpoints, the adapter, metrics, plots, the TensorBoard, MLflow and W&B runs), everything it prints and every
    Redis value are searched for the password."""
    out = tmp_path / "out"
    with EmbeddedRedis(tmp_path / "redis", password=PASSWORD) as server:
        args = ["--config", "cpu_demo", f"model.pretrained={tiny_dir / 'sd'}",
                f"reward.clip.model=local-dir:{tiny_dir / 'clip'}", f"prompts.sources=[{{path: {prompt_file}}}]",
                f"run.output_dir={out}", "run.steps=2", "run.save_every=1", "sampler.num_steps=4",
                "grpo.train_timesteps=4", f"store.url={server.url}", "tracking.mlflow={}", "tracking.wandb={}",
                "tracking.sample_prompts=[an image]"]
        shown = subprocess.run([sys.executable, "-m", "safediff.cli", "config", *args], capture_output=True,
                               text=True, timeout=300, cwd=tmp_path)
        run = subprocess.run([sys.executable, "-m", "safediff.cli", "train", *args], capture_output=True,
                             text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        client = redis.Redis.from_url(server.url)
        values = []
        for key in client.keys("*"):
            kind = client.type(key)
            if kind == b"string":
                values.append(client.get(key))
            elif kind == b"stream":
                values += [str(fields).encode() for _, fields in client.xrange(key)]
            elif kind == b"list":
                values += client.lrange(key, 0, -1)
            elif kind == b"hash":
                values += [str(client.hgetall(key)).encode()]
        assert values, "the run wrote nothing to Redis"
    assert shown.returncode == 0 and "store:\n  url: redis://:***@127.0.0.1" in shown.stdout
    files = list(out.rglob("*"))
    assert any(p.name == "config.yaml" and "checkpoints" in p.parts for p in files)
    assert (out / "cpu-demo" / "adapter" / "config.yaml").is_file()
    assert {"tensorboard", "mlruns", "wandb", "samples"} <= {p.name for p in (out / "cpu-demo").iterdir()}
    quoted = server.url.split("//:", 1)[1].split("@127", 1)[0].encode()  # the password as the URL carries it
    for secret in (PASSWORD.encode(), quoted):
        assert _grep(out, secret) == []
        assert secret not in (shown.stdout + shown.stderr + run.stdout + run.stderr).encode()
        assert not [v for v in values if secret in v]
