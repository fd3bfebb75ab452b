"""Pieces of the distributed runtime that need no Ray cluster: micro-batching, sync checks, staleness, resources."""

import asyncio
import platform
import resource
import subprocess
import sys
import threading

import pytest
import torch

from safediff.common.config import ConfigError, load_config
from safediff.common.messages import AdapterSyncError, AdapterUpdate
from safediff.common.policy import Policy
from safediff.common.weight_sync import apply_update
from safediff.reward_server.batching import MicroBatcher
from safediff.runtime.cluster import check_resources, required_resources
from safediff.runtime.pipeline import HangWatch
from safediff.runtime.staleness import StalenessBoundExceeded, StalenessGate


def test_micro_batcher_merges_concurrent_requests_and_routes_results():
    seen = []

    def double(batch):
        seen.append(len(batch))
        return [x * 2 for x in batch]

    async def main():
        batcher = MicroBatcher(double, max_items=4, max_wait_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert results == [2 * i for i in range(10)]
    assert seen == [4, 4, 2]  # the first full batch starts at once, each next one as the one before it ends
    assert stats.batches == 3 and stats.requests == 10 and stats.mean_batch_items == pytest.approx(10 / 3)


def test_requests_that_arrive_while_a_batch_runs_form_one_batch_when_it_ends():
    seen, release = [], threading.Event()

    def slow(batch):
        seen.append(list(batch))
        release.wait(60)  # the first batch runs until every later request has arrived
        return batch

    async def main():
        batcher = MicroBatcher(slow, max_items=64, max_wait_s=0.01)
        first = asyncio.ensure_future(batcher.submit(0))
        later = []
        for i in range(1, 4):  # 30 ms apart, all while the first batch runs, each longer apart than max_wait
            await asyncio.sleep(0.03)
            later.append(asyncio.ensure_future(batcher.submit(i)))
        await asyncio.sleep(0.03)
        release.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert seen == [[0], [1, 2, 3]]  # not [[0], [1], [2], [3]]: no request waits behind a queue of small batches


def test_micro_batcher_propagates_errors_to_every_request():
    def boom(batch):
        raise ValueError("bad images")

    async def main():
        batcher = MicroBatcher(boom, max_items=8, max_wait_s=0.01)
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    assert all(isinstance(r, ValueError) for r in asyncio.run(main()))


def test_a_failed_batch_does_not_stop_the_next():
    def fail_on_negative(batch):
        if min(batch) < 0:
            raise ValueError("bad images")
        return batch

    async def main():
        batcher = MicroBatcher(fail_on_negative, max_items=2, max_wait_s=0.01)
        return await asyncio.gather(*(batcher.submit(i) for i in (-1, 1, 2, 3)), return_exceptions=True)

    first, second, *rest = asyncio.run(main())
    assert isinstance(first, ValueError) and isinstance(second, ValueError) and rest == [2, 3]


def test_staleness_gate():
    gate = StalenessGate(max_staleness=1, prompts_per_step=4)
    assert gate.may_start(0, 0) and gate.may_start(1, 0) and not gate.may_start(2, 0)
    assert gate.max_groups_in_flight() == 8
    assert gate.record(5, 4) == 1 and gate.max_seen == 1
    with pytest.raises(StalenessBoundExceeded):
        gate.record(5, 3)
    with pytest.raises(StalenessBoundExceeded):
        StalenessGate(0, 1).record(3, 4)  # a version from the future is a bug too


def test_the_hang_limit_scales_with_the_slowest_recent_step():
    watch = HangWatch(first_s=600, factor=5, min_s=30)
    assert watch.limit() == 600  # nothing measured: the first step's limit (model loading included)
    watch.measured(2.0)
    assert watch.limit() == 30  # 5 x 2 s is under the floor
    watch.measured(20.0)
    assert watch.limit() == 100  # a slow step raises the limit: a slow actor is not a hung one
    for _ in range(8):
        watch.measured(10.0)
    assert watch.limit() == 50  # only the last 8 steps count: the slow one has left the window


def test_resource_check_names_the_fields(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "cluster.rollout_actors=6", "cluster.gpus_per_rollout_actor=1")
    assert required_resources(cfg) == {"CPU": 6 * 1 + 0.5 + 1, "GPU": 6.0}  # cpu_demo: 1, 0.5, 1 CPU each
    with pytest.raises(ConfigError, match="cluster.*GPU: the cluster section asks for 6, the Ray cluster has 1"):
        check_resources(cfg, {"CPU": 64.0, "GPU": 1.0})
    check_resources(cfg, {"CPU": 7.5, "GPU": 6.0})
    with pytest.raises(ConfigError, match=r"asks for 7.5, the Ray cluster has 2 \(`ray start --num-cpus=N`"):
        check_resources(tiny_config(tiny_dir, tmp_path, prompt_file, "cluster.rollout_actors=6"), {"CPU": 2.0})
    placed = tiny_config(tiny_dir, tmp_path, prompt_file, "cluster.rollout_actors=3", "cluster.learner_workers=2",
                         "cluster.resources_per_rollout_actor={inference: 1}",
                         "cluster.resources_per_learner_worker={training: 0.5, inference: 0.25}")
    assert required_resources(placed) == {"inference": 3 + 2 * 0.25, "training": 1.0, "CPU": 3 + 0.5 + 2, "GPU": 0}
    with pytest.raises(ConfigError, match=r"inference: the cluster section asks for 3.5, the Ray cluster has 3 "
                                          r"\(`ray start --resources="):
        check_resources(placed, {"CPU": 8.0, "inference": 3.0, "training": 1.0})


def test_gpus_the_config_leaves_unused_are_a_warning(tiny_dir, tmp_path, prompt_file, tiny_config, caplog):
    cpu_only = tiny_config(tiny_dir, tmp_path, prompt_file)
    check_resources(cpu_only, {"CPU": 8.0})
    assert "GPU" not in caplog.text
    check_resources(cpu_only, {"CPU": 8.0, "GPU": 8.0})
    assert "the Ray cluster has 8 GPUs but the config asks for none" in caplog.text
    caplog.clear()
    check_resources(tiny_config(tiny_dir, tmp_path, prompt_file, "cluster.gpus_per_learner_worker=1"),
                    {"CPU": 8.0, "GPU": 8.0})
    assert "asks for none" not in caplog.text


def test_learner_workers_must_divide_an_optimiser_step():
    with pytest.raises(ConfigError, match="cluster.learner_workers"):
        load_config(None, ["cluster.learner_workers=3"])


@pytest.fixture
def two_policies(tiny_dir, tmp_path, prompt_file, tiny_config):
    cfg = tiny_config(tiny_dir, tmp_path, prompt_file)
    learner, actor = Policy.from_config(cfg), Policy.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in learner.state().items()}
    learner.load_state(state, version=1)
    return learner, actor, state


def _update(policy, version, **changes):
    fields = dict(version=version, state_ref=None, checksum=policy.checksum(), module_count=policy.bound_modules(),
                  num_bytes=0)
    fields.update(changes)
    return AdapterUpdate(**fields)


def test_sync_applies_a_verified_update(two_policies):
    learner, actor, state = two_policies
    checksum, bound = apply_update(actor, _update(learner, 1), state)
    assert (actor.version, checksum, bound) == (1, learner.checksum(), 32)


def test_sync_refuses_stale_and_out_of_order_versions(two_policies):
    learner, actor, state = two_policies
    apply_update(actor, _update(learner, 2), state)
    for version in (2, 1):
        with pytest.raises(AdapterSyncError, match="stale or out-of-order"):
            apply_update(actor, _update(learner, version), state)
    assert actor.version == 2


def test_sync_that_does_not_bind_as_published_fails_and_rolls_back(two_policies):
    learner, actor, state = two_policies
    before = actor.checksum()
    with pytest.raises(AdapterSyncError, match="checksum"):
        apply_update(actor, _update(learner, 1, checksum="0" * 64), state)
    with pytest.raises(AdapterSyncError, match="expected 33"):
        apply_update(actor, _update(learner, 1, module_count=33), state)
    assert actor.checksum() == before and actor.version == 0


def test_pack_unpack_roundtrip_keeps_names_dtypes_shapes_and_bytes():
    from safediff.common.trainable import state_checksum
    from safediff.common.weight_sync import pack_state, unpack_state

    state = {"a.lora_A.weight": torch.randn(4, 3), "b.bias": torch.arange(5, dtype=torch.float64),
             "c.half": torch.randn(2, 2, 2).to(torch.bfloat16), "d.empty": torch.zeros(0, 7)}
    packed = pack_state(state)
    assert packed.flat.dtype == torch.uint8 and packed.flat.numel() == 4 * 12 + 8 * 5 + 2 * 8
    out = unpack_state(packed)
    assert list(out) == list(state) and state_checksum(out) == state_checksum(state)
    assert all(out[k].dtype == state[k].dtype and out[k].shape == state[k].shape for k in state)


def test_sync_with_a_state_that_does_not_fit_restores_the_previous_weights(two_policies):
    learner, actor, state = two_policies
    before = actor.checksum()
    partial = dict(list(state.items())[:10])
    with pytest.raises(AdapterSyncError, match="does not fit"):
        apply_update(actor, _update(learner, 1), partial)
    assert actor.checksum() == before and actor.version == 0


def test_actors_without_a_gpu_run_on_cpu(tiny_dir, tmp_path, prompt_file, tiny_config):
    from safediff.common.process import on_assigned_device

    cfg = tiny_config(tiny_dir, tmp_path, prompt_file, "run.device=auto")
    assert on_assigned_device(cfg, 0.0).run.device == "cpu"
    assert on_assigned_device(cfg, 0.5).run.device == "auto"


# What a training pass does to host memory: the same activations allocated, written and freed again, round after
# round (64 blocks of 1 MiB, 10 rounds); prints the minor page faults the rounds cost the process. "keep": a CPU
# process's setup, which must be taken; "glibc": glibc's initial settings, held (glibc raises them by itself as blocks
# are freed, which makes its default depend on what the process did before).
CHURN = """
import ctypes, resource, sys, torch
from safediff.common import process
from safediff.common.config import load_config
if sys.argv[1] == "keep":
    assert process.configure_memory(load_config("cpu_demo"))  # run.keep_freed_memory is on by default
else:
    libc = ctypes.CDLL(None)
    libc.mallopt(process.M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(process.M_TRIM_THRESHOLD, 128 * 1024)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    blocks = [torch.ones(2**18) for _ in range(64)]
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="run.keep_freed_memory sets glibc's malloc")
def test_keeping_freed_memory_stops_the_kernel_mapping_the_same_pages_again():
    def faults(setting: str) -> int:
        run = subprocess.run([sys.executable, "-c", CHURN, setting], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    pages_per_round = 64 * 2**20 // resource.getpagesize()
    assert faults("glibc") > 8 * pages_per_round  # given back to the OS and faulted in again every round
    assert faults("keep") < 2 * pages_per_round   # kept: faulted in once, in the first round


def test_host_memory_is_kept_only_by_processes_computing_on_the_cpu(monkeypatch):
    from safediff.common import process

    calls = []  # recorded instead of set: this test process keeps glibc's settings and its torch threads
    monkeypatch.setattr(process, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(process, "configure_threads", lambda cpus: 1)
    cfg = load_config("cpu_demo", ["run.device=auto"])
    assert process.configure_process(cfg, 1).run.device == "cpu" and len(calls) == 1  # an actor without a GPU
    assert not process.configure_memory(load_config("cpu_demo", ["run.keep_freed_memory=false"])) and len(calls) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process.configure_process(cfg, 1, gpus=0.5).run.device == "auto" and len(calls) == 1  # a GPU computes
    assert process.configure_process(cfg, 1).run.device == "cpu" and len(calls) == 2  # on a GPU node, without one
