from collections import Counter

import pytest

from safediff.common.config import PromptSource
from safediff.common.prompts import AdversarialPool, PromptFileError, PromptStream, read_prompt_file


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n\n   \nbad \xff\xfe row\na dog\r\n")
    pf = read_prompt_file(path)
    assert pf.prompts == ("a cat", "a dog") and pf.skipped_empty == 2 and pf.skipped_undecodable == 1
    assert "skipped 2 empty and 1 non-UTF-8 rows" in caplog.text


def test_unusable_files_are_errors(tmp_path):
    with pytest.raises(PromptFileError, match="missing.txt: cannot read"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"\n\xff\n")
    with pytest.raises(PromptFileError, match="empty.txt: no usable prompt"):
        read_prompt_file(tmp_path / "empty.txt")


def _file(tmp_path, name, n):
    path = tmp_path / name
    path.write_text("".join(f"{name}-{i}\n" for i in range(n)))
    return PromptSource(path=path)


def test_each_epoch_visits_every_prompt_once(tmp_path):
    stream = PromptStream((_file(tmp_path, "a", 7),), seed=3)
    seen = [g.prompt for step in range(7) for g in stream.next_groups(step, 2)]  # 14 = two epochs
    assert sorted(seen[:7]) == sorted(f"a-{i}" for i in range(7))
    assert sorted(seen[7:]) == sorted(seen[:7]) and seen[7:] != seen[:7]  # reshuffled per epoch
    groups = stream.next_groups(99, 3)
    assert [g.group_index for g in groups] == [0, 1, 2] and all(g.step == 99 for g in groups)


def test_stream_is_seeded_and_resumable(tmp_path):
    sources = (_file(tmp_path, "a", 5), _file(tmp_path, "b", 9))
    first = PromptStream(sources, seed=1)
    head = [first.next_groups(s, 4) for s in range(3)]
    state = first.state_dict()
    tail = [first.next_groups(s, 4) for s in range(3, 6)]
    again = PromptStream(sources, seed=1)
    assert [again.next_groups(s, 4) for s in range(3)] == head
    resumed = PromptStream(sources, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_groups(s, 4) for s in range(3, 6)] == tail
    assert [g.prompt for g in PromptStream(sources, seed=2).next_groups(0, 4)] != [g.prompt for g in head[0]]


def test_mixture_weights(tmp_path):
    a, b = _file(tmp_path, "a", 50), _file(tmp_path, "b", 50)
    stream = PromptStream((a, PromptSource(path=b.path, weight=3.0, unsafe=True)), seed=0)
    groups = [g for s in range(100) for g in stream.next_groups(s, 8)]
    counts = Counter(g.source for g in groups)
    assert 0.70 < counts[1] / len(groups) < 0.80  # expected 0.75; 800 draws: sd 0.015
    assert all(g.unsafe is True for g in groups if g.source == 1)
    assert all(g.unsafe is None for g in groups if g.source == 0)


def test_an_adversarial_source_draws_nothing_until_a_pool_is_installed_and_leaves_the_files_alone(tmp_path):
    sources = (_file(tmp_path, "a", 5), _file(tmp_path, "b", 9))
    plain, red = PromptStream(sources, seed=1), PromptStream(sources, seed=1, adversarial_weight=2.0)
    # no pool: the same draws as a stream without the source (a run without red-teaming is unchanged)
    assert [red.next_groups(s, 4) for s in range(3)] == [plain.next_groups(s, 4) for s in range(3)]
    red.set_pool(AdversarialPool(("x-0", "x-1", "x-2"), step=2, version=1))
    groups = [g for s in range(3, 40) for g in red.next_groups(s, 4)]
    adversarial = [g for g in groups if g.source == red.adversarial_source == 2]
    assert 0.4 < len(adversarial) / len(groups) < 0.6  # weight 2 of 2 + 1 + 1; 148 draws: sd 0.04
    assert {g.prompt for g in adversarial} == {"x-0", "x-1", "x-2"} and all(g.unsafe for g in adversarial)
    assert Counter(g.prompt for g in adversarial[:3]) == Counter({"x-0": 1, "x-1": 1, "x-2": 1})  # one epoch


def test_the_pool_is_part_of_the_resumable_state(tmp_path):
    sources = (_file(tmp_path, "a", 5),)
    first = PromptStream(sources, seed=4, adversarial_weight=1.0)
    first.next_groups(0, 3)
    first.set_pool(AdversarialPool(("x-0", "x-1"), step=2, version=2))
    first.next_groups(1, 3)
    state = first.state_dict()
    assert state["adversarial"] == {"prompts": ["x-0", "x-1"], "step": 2, "version": 2}
    tail = [first.next_groups(s, 3) for s in range(2, 6)]
    resumed = PromptStream(sources, seed=4, adversarial_weight=1.0)
    resumed.load_state_dict(state)
    assert [resumed.next_groups(s, 3) for s in range(2, 6)] == tail
    with pytest.raises(ValueError, match="prompt cursor has 2 sources, config has 1"):
        PromptStream(sources, seed=4).load_state_dict(state)  # red-teaming switched off on resume
