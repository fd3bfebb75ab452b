"""Red-teaming in the loop on a real local Ray cluster: the adversarial source is refreshed on its schedule with
prompts made against the policy of the step that asked; a killed attack actor is restarted, re-synced to the
policy it was attacking and gives the same prompts; a run stopped between a request and its install resumes to
the same prompts and the same adapter as the uninterrupted run."""

import json
import os
import signal

import pytest
import ray

from safediff.common.checkpoint import read_manifest
from safediff.common.policy import Policy
from safediff.common.prompts import PromptFileError, PromptStream
from safediff.common.trainable import state_checksum
from safediff.common.weight_sync import publish
from safediff.runtime.controller import run
from safediff.runtime.groups import AttackGroup
from safediff.runtime.pipeline import RolloutPipeline
from safediff.runtime.redis_server import EmbeddedRedis
from safediff.runtime.redteam import RedTeam
from safediff.runtime.run_store import Interrupted, RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

# refreshes at steps 0, 2, 4: pools installed at 2 (attack on version 0) and 4 (on the policy of step 2)
SHAPE = ("run.steps=5", "run.save_every=8", "cluster.rollout_actors=1", "cluster.max_staleness=0",
         "cluster.cpus_per_rollout_actor=0.5", "cluster.cpus_per_reward_actor=0.5",
         "cluster.cpus_per_learner_worker=0.5", "cluster.cpus_per_attack_actor=0.5", "reward.batch_max_images=8",
         "prompts.adversarial.every=2", "prompts.adversarial.prompts_per_refresh=2", "prompts.adversarial.weight=2",
         "prompts.adversarial.unlearndiff.tokens=2", "prompts.adversarial.unlearndiff.timesteps=2",
         "prompts.adversarial.unlearndiff.iterations=2")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam")
    (root / "p.txt").write_text("a bright image\na dark image\nan image\na picture of colour\n")
    (root / "t.txt").write_text("a red square\na dark red image\na bright red picture\n")
    return root


def _config(tiny_config, tiny_dir, tmp_path, files, *overrides):
    return tiny_config(tiny_dir, tmp_path, files / "p.txt", *SHAPE, f"prompts.adversarial.targets={files / 't.txt'}",
                       *overrides)


def _adversarial(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "adversarial.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory, files, tiny_config):
    cfg = _config(tiny_config, tiny_dir, tmp_path_factory.mktemp("straight"), files, "run.name=red")
    result = run(cfg, progress=False)
    return result, _adversarial(result.run_dir)


def test_the_source_is_refreshed_on_schedule_with_prompts_made_against_the_asking_step_policy(uninterrupted):
    result, records = uninterrupted
    assert [(r["step"], r["requested_at"], r["policy_version"]) for r in records] == [(2, 0, 0)] * 2 + [(4, 2, 2)] * 2
    targets = ("a red square", "a dark red image", "a bright red picture")
    for r in records:  # k = 2 tokens before a training target, found by UnlearnDiff's 2 x 2 steps
        assert r["target"] in targets and r["prompt"].endswith(r["target"]) and len(r["tokens"]) == 2
        assert len(r["curve"]) == 2
    groups = [m["adversarial_groups"] for m in result.metrics]
    assert groups[:2] == [0, 0] and sum(groups[2:]) > 0  # weight 0 until the first pool, at step 2
    assert result.metrics[2]["time_wait_attack"] >= 0 and result.metrics[0]["time_wait_attack"] == 0


def test_red_teaming_in_the_loop_on_the_sd3_family(tiny_dir, tmp_path, files, tiny_config, colour_sd3):
    """The attack actor searches the flow model's two CLIP encoders at once against its rectified-flow loss; the
    pool made against the step-0 policy is trained on from step 2."""
    cfg = _config(tiny_config, tiny_dir, tmp_path, files, "run.steps=3", f"model.pretrained={colour_sd3}",
                  "model.family=sd3", "model.max_sequence_length=0", "sampler.height=16", "sampler.width=16")
    result = run(cfg, progress=False)
    records = _adversarial(result.run_dir)
    assert [(r["step"], r["requested_at"], r["policy_version"]) for r in records] == [(2, 0, 0)] * 2
    assert all(r["prompt"].endswith(r["target"]) and len(r["tokens"]) == 2 for r in records)
    assert result.metrics[2]["adversarial_groups"] > 0


def test_a_missing_targets_file_is_named_before_any_actor_starts(tiny_dir, tmp_path, files, tiny_config):
    cfg = _config(tiny_config, tiny_dir, tmp_path, files, f"prompts.adversarial.targets={tmp_path / 'nope.txt'}")
    with pytest.raises(PromptFileError, match="nope.txt: cannot read"):
        run(cfg, progress=False)


def test_a_killed_attack_actor_is_resynced_to_the_policy_it_attacked(tiny_dir, tmp_path, files, tiny_config):
    cfg = _config(tiny_config, tiny_dir, tmp_path, files)
    policy = Policy.from_config(cfg)
    state = {k: v + 0.05 for k, v in policy.state().items()}  # a policy other than the initial one
    update = publish(state, 3, policy.bound_modules())
    group, control = AttackGroup.create(cfg), AttackGroup.create(cfg)

    def dies_as_it_attacks(actor) -> None:
        """Run in the attack actor: its process ends as its next attack begins (the restarted one is fresh)."""
        actor.unlearndiff.attack = lambda *args: os._exit(1)

    prompts = PromptStream.from_config(cfg.prompts, cfg.run.seed)
    with EmbeddedRedis(tmp_path / "redis") as server:
        store = RunStore(server.url, "kill")
        red = RedTeam(cfg.prompts.adversarial, group, prompts, store, tmp_path, start=0)
        ray.get(group[0].__ray_call__.remote(dies_as_it_attacks))
        red.before_launch(4, update)              # asks for the attack of step 4 on version 3
        ray.get(red.pending.report)               # the actor holds version 3, and dies as the attack begins
        red.before_launch(6, update)              # collecting: lost, restarted, re-synced, asked again
        retried = [e for e in store.events() if e["kind"] == "attack_retried"]
    assert [e["step"] for e in retried] == [4]
    assert ray.get(group[0].status.remote()) == (3, state_checksum(state))
    ray.get(control.load_adapter(update))
    expected = ray.get(control.attack(4, 3))
    assert prompts.pool.prompts == tuple(r["prompt"] for r in expected) and prompts.pool.version == 3
    group.kill()
    control.kill()


def test_a_run_stopped_between_a_request_and_its_install_resumes_to_the_same_prompts(tiny_dir, tmp_path, files,
                                                                                     tiny_config, uninterrupted,
                                                                                     monkeypatch):
    reference, records = uninterrupted
    cfg = _config(tiny_config, tiny_dir, tmp_path, files, "run.name=red")
    run_dir = tmp_path / "runs" / "red"
    collect = RolloutPipeline.collect

    def collect_then_stop_in_step_2(self, step):  # a SIGTERM inside step 2, honoured after it: a checkpoint at 3
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return collect(self, step)

    monkeypatch.setattr(RolloutPipeline, "collect", collect_then_stop_in_step_2)
    with pytest.raises(Interrupted):
        run(cfg, progress=False)
    monkeypatch.undo()
    stopped = read_manifest(run_dir)[-1]
    assert stopped["step"] == 3  # the attack asked for at step 2 is pending, installed at step 4
    cursor = json.loads((run_dir / "checkpoints" / stopped["path"] / "trainer.json").read_text())["cursor"]
    assert cursor["redteam"] == {"step": 2, "version": 2} and cursor["adversarial"]["version"] == 0
    resumed = run(cfg, progress=False)
    assert _adversarial(run_dir) == records
    assert resumed.checksum == reference.checksum
    assert [m["reward_mean"] for m in resumed.metrics] == [m["reward_mean"] for m in reference.metrics]
