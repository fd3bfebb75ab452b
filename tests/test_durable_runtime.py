"""Durable distributed runs on a real local Ray cluster and real redis-servers on loopback: the Redis run
store survives a server restart mid-run; a dead learner rank stops the job with a checkpoint; a killed
driver's run is continued by resubmitting it; every continued run ends with the uninterrupted run's
adapter checksum (DeepSpeed ZeRO-2 optimiser partitions of 2 ranks, max_staleness 1)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import redis

from safediff.common.checkpoint import read_manifest
from safediff.common.errors import LearnerFailed
from safediff.runtime.controller import run
from safediff.runtime.groups import start_actors
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

# One group per reward forward (batch_max_images = group_size), so CLIP's numerics do not depend on how
# requests happened to be batched and runs can be compared bit for bit.
SHAPE = ("run.steps=4", "run.save_every=2", "cluster.rollout_actors=1", "cluster.learner_workers=2",
         "cluster.zero_stage=2", "cluster.max_staleness=1", "cluster.cpus_per_rollout_actor=0.5",
         "cluster.cpus_per_reward_actor=0.5", "cluster.cpus_per_learner_worker=0.5",
         "reward.batch_max_images=8", "store.lease_ttl_s=2",
         "sampler.num_steps=4", "grpo.train_timesteps=4")  # as tiny_config: the CLI run below loads cpu_demo itself


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("a bright image\na dark image\nan image\na picture of colour\na red square\n")
    return path


def _has_checkpoint(run_dir, step):
    return lambda: any(e["step"] == step for e in read_manifest(run_dir)) if run_dir.exists() else False


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory, prompts, tiny_config, steps_hooked):
    """The reference run, against an external redis-server that is restarted (same port, password and data
    directory) while step 2 runs, just after the first checkpoint (step 2's launch) and done before step 3's."""
    tmp = tmp_path_factory.mktemp("straight")
    server = EmbeddedRedis(tmp / "redis").start()
    cfg = tiny_config(tiny_dir, tmp, prompts, *SHAPE, "run.name=straight", f"store.url={server.url}")

    def restart():
        server.stop()
        time.sleep(0.5)  # the run goes on, writing into its buffer
        server.start()

    restarter = threading.Thread(target=restart)
    with steps_hooked() as before_step:
        before_step(2, lambda _: restarter.start())
        before_step(3, lambda _: restarter.join())
        result = run(cfg, progress=False)
    store = RunStore(server.url, "straight")
    yield result, store
    server.stop()


def test_a_redis_restart_mid_run_loses_no_manifest_entry_or_event(uninterrupted):
    result, store = uninterrupted
    assert [e["step"] for e in store.manifest()] == [2, 4, 4]  # two checkpoints and the exported adapter
    kinds = [e["kind"] for e in store.events()]
    assert kinds == ["started", "checkpoint_written", "checkpoint_written", "checkpoint_written", "finished"]
    assert [m["reward_mean"] for m in store.metrics()] == [m["reward_mean"] for m in result.metrics]
    assert store.status() == "finished"


def test_a_dead_learner_rank_stops_the_job_and_resubmitting_continues_it_exactly(tiny_dir, tmp_path, prompts,
                                                                                 uninterrupted, tiny_config,
                                                                                 before_step, kill_for_good):
    reference, _ = uninterrupted
    cfg = tiny_config(tiny_dir, tmp_path, prompts, *SHAPE, "run.name=learner-dies")
    actors = start_actors(cfg)
    before_step(2, lambda _: kill_for_good(actors.learners[1]))  # just after the first checkpoint
    with pytest.raises(LearnerFailed, match=r"a learner rank died in '\w+' \(\w+\); the job stops here"):
        run(cfg, progress=False, actors=actors)
    resumed = run(cfg, progress=False)  # same command again: the store says the last job failed
    assert resumed.checksum == reference.checksum
    assert [m["step"] for m in resumed.metrics] == [0, 1, 2, 3]
    assert [m["reward_mean"] for m in resumed.metrics] == [m["reward_mean"] for m in reference.metrics]
    assert resumed.actor_status == [(4, reference.checksum)]


def test_a_killed_driver_is_continued_by_resubmitting_the_same_run(tiny_dir, tmp_path, prompts, uninterrupted):
    reference, _ = uninterrupted
    run_dir = tmp_path / "runs" / "driver-dies"
    overrides = [f"model.pretrained={tiny_dir / 'sd'}", f"reward.clip.model=local-dir:{tiny_dir / 'clip'}",
                 f"prompts.sources=[{{path: {prompts}}}]", f"run.output_dir={tmp_path / 'runs'}", *SHAPE,
                 "run.name=driver-dies"]
    command = [sys.executable, "-m", "safediff.cli", "run", "--config", "cpu_demo",
               "--address", ray.get_runtime_context().gcs_address, *overrides]
    driver = subprocess.Popen(command, cwd=tmp_path, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _has_checkpoint(run_dir, 2)():
        assert driver.poll() is None and time.time() < deadline, driver.stderr.read()[-3000:]
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)  # no handler, no checkpoint, no release of anything
    driver.wait()
    orphan = json.loads((run_dir / "redis" / "server.json").read_text())["url"]  # its redis-server lives on
    time.sleep(2.5)  # the dead job's lease (store.lease_ttl_s) expires
    from safediff.common.config import load_config

    resumed = run(load_config("cpu_demo", overrides), progress=False)
    assert resumed.checksum == reference.checksum
    assert [m["reward_mean"] for m in resumed.metrics] == [m["reward_mean"] for m in reference.metrics]
    with pytest.raises(redis.ConnectionError):  # the resumed job adopted the orphaned server and stopped it
        redis.Redis.from_url(orphan, socket_connect_timeout=1).ping()
