"""Fuzzed bad input (property-based, hypothesis): configs, prompt files and checkpoint folders.

Every case ends in a one-line error of the documented type that names the field or the file, or in a result that
skips and counts the bad rows; never a traceback of another exception type, never a corrupted checkpoint loaded
in silence, never a lost or half-written one. Examples are derandomized (the same on every run) and sized so the
whole file takes well under a minute on 2 cores; each `@example` is a bug these properties found, kept as a
regression.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from safediff.common import checkpoint as ckpt
from safediff.common.config import (
    Config,
    ConfigError,
    PromptSetConfig,
    describe_fields,
    flatten_tree,
    load_config,
    section_at,
)
from safediff.common.errors import UserInputError
from safediff.common.prompts import PromptFileError, read_prompt_file


def fuzz(n: int):
    """Reproducible, deadline-free settings: the same `n` examples on every run, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def one_line(message: str) -> str:
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def shown(name: str) -> str:
    """How an error shows a name it was given: as is, or quoted and escaped when empty or not printable."""
    return name if name.isprintable() and name else repr(name)


# ---------------------------------------------------------------------------------------------
# 1. Configs

FIELDS = [name for name, _, _ in describe_fields()]
DEFAULTS = flatten_tree(Config().model_dump(mode="json"))
NULL_SECTIONS = [name for name, default, _ in describe_fields() if default == "null"]  # incl. optional sections
PATHS = sorted({".".join(f.split(".")[:i]) for f in FIELDS for i in range(1, f.count(".") + 2)}, key=len,
               reverse=True)  # every section and field, longest first
SECTIONS = [p for p in PATHS if "." not in p]
SRC = "<defaults> + overrides"

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 2**63, -2**63 - 1, 10**30]),
    st.text(max_size=12), st.sampled_from(["", "a\nb", "pkg:", "pkg:../x", "local-dir:", "all", "lora", "\x1b[31m"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


NAMED_PATH = re.compile(r"(?<![\w.])(" + "|".join(re.escape(p) for p in PATHS if "." in p) + r")(?!\w)")


def named_paths(text: str) -> set[str]:
    """The dotted config paths (`grpo.group_size`, `prompts.adversarial`) a message names, as whole words."""
    return set(NAMED_PATH.findall(text))


def split_location(rest: str) -> tuple[str | None, str | None, str]:
    """`<field>: <reason>` -> (the known config path the location starts with, the location, the reason); (None,
    None, rest) for a line that starts with no known path (a check across sections, or an unknown name)."""
    for path in PATHS:
        if rest.startswith(path + ": "):
            return path, path, rest[len(path) + 2:]
        if rest.startswith(path + ".") and ": " in rest:
            loc, reason = rest.split(": ", 1)
            return path, loc, reason
    return None, None, rest


def check_config_error(message: str, source: str) -> list[tuple[str | None, str | None, str]]:
    """A ConfigError from validation: one line per problem (none twice), each `config error in <source>: ...`.
    A line located at a known field keeps to it: every config path its reason names lies within that field (no
    line blames another section), and a list whose items failed gets no extra "too short" line. Returns each
    line's (known path, location, reason)."""
    lines = message.split("\n")
    assert len(lines) == len(set(lines)), message
    prefix = f"config error in {source}: "
    parsed = []
    for line in lines:
        assert line.startswith(prefix), line
        known, loc, reason = split_location(line[len(prefix):])
        if known is not None:
            assert all(p == known or p.startswith(known + ".") for p in named_paths(reason)), line
            if "should have at least" in reason:
                assert not any(other.startswith(f"{prefix}{loc}.") for other in lines), message
        parsed.append((known, loc, reason))
    return parsed


def alternatives(field: str) -> set[str]:
    """Fields that setting `field` may clear: a prompt set is given by name or by path, never both."""
    parent, _, leaf = field.rpartition(".")
    return {f"{parent}.name", f"{parent}.path"} if leaf in ("name", "path") and section_at(parent) is \
        PromptSetConfig else set()


def check_only_field_changed(cfg: Config, field: str) -> None:
    """A valid config that set one field differs from the defaults in that field only (and in the defaults of an
    optional section the setting switched on): no other field silently takes another value."""
    switched_on = [s for s in NULL_SECTIONS if field.startswith(s + ".")]
    now = flatten_tree(cfg.model_dump(mode="json"))
    changed = {k for k in now.keys() | DEFAULTS.keys() if now.get(k, 0) != DEFAULTS.get(k, 0)}
    unexplained = {k for k in changed - alternatives(field) if not (
        k == field or k.startswith(field + ".") or any(k == s or k.startswith(s + ".") for s in switched_on))}
    assert not unexplained, {k: (DEFAULTS.get(k), now.get(k)) for k in unexplained}


def yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("\n...").strip()


def nested(field: str, value) -> dict:
    tree: dict = {}
    node = tree
    *parents, leaf = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


@pytest.fixture(scope="module")
def config_dir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


DOC_KEYS = st.one_of(st.sampled_from(sorted({p.rsplit(".", 1)[-1] for p in PATHS})), st.text(max_size=8))
DOC_TREES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(DOC_KEYS, inner, max_size=4)),
                         max_leaves=14)
DOCUMENTS = st.one_of(st.dictionaries(st.one_of(st.sampled_from(SECTIONS), DOC_KEYS), DOC_TREES, max_size=5),
                      DOC_TREES)


@fuzz(300)
@given(doc=DOCUMENTS)
@example(doc={"run": {"name\nx": 1}})                 # an unknown key with a line break: one line, key escaped
@example(doc={"lora": {"target_modules": [1]}})       # a bad item: its line only, no "at least 1 item" line
@example(doc={"evaluation": {"attack": {"targets": {"limit": 2}}}})  # the section's check names its own fields
@example(doc={"evaluation": {"suite": {"q16": {"clip": {"batch_size": 4}}}}})  # keeps ViT-L-14 (checked below)
def test_a_random_yaml_document_is_a_config_or_one_line_per_problem(config_dir, doc):
    """Random nested mappings, lists and scalars as a config file: a config (one that set a single field differs
    from the defaults in that field only), or one line per problem naming the field or the file."""
    path = config_dir / "doc.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path)
    except ConfigError as err:
        message = str(err)
        if not isinstance(doc, dict) and doc is not None:
            assert one_line(message) == f"config error in {path}: the top level must be a mapping of sections"
            return
        for known, _, rest in check_config_error(message, str(path)):
            # a name the document gave (at the start, escaped when not printable), or the fields a check relates
            assert known or any(rest.startswith(shown(str(k)) + s) for k in doc for s in (":", ".")) or \
                named_paths(rest), message
    else:
        leaves = flatten_tree(doc or {})
        if len(leaves) == 1:
            check_only_field_changed(cfg, next(iter(leaves)))


@fuzz(150)
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
@example(text="[" * 1000)                           # nested too deeply for the YAML parser: was a RecursionError
@example(text="run: {name: " + "[" * 1000 + "]" * 1000 + "}")
@example(text=b"run:\n  name: \xff\xfe\n")           # not UTF-8
@example(text="run:\n  name: x\n grpo: [\n")
@example(text="\x00\x1b: 1")
def test_random_text_as_a_config_file_is_one_line_naming_the_file(config_dir, text):
    """Random text and bytes as a config file: a config, or an error naming the file, one line per problem."""
    path = config_dir / "text.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError as err:
        message = str(err)
        if "\n" in message:  # one line per field: validation problems only
            check_config_error(message, str(path))
        else:
            assert message.startswith((f"config error in {path}", f"config error: cannot read {path}")), message
            assert "\r" not in message


def every_field(value) -> list:
    return [value] * len(FIELDS)


@fuzz(4)
@given(values=st.lists(VALUES, min_size=len(FIELDS), max_size=len(FIELDS)))
@example(values=every_field("/models/ViT-L-14.pt"))  # evaluation.suite.q16.clip.weights: model became ViT-H-14, not L
@example(values=every_field(5))             # evaluation.suite.prompts.limit: "give exactly one of name and path"
@example(values=every_field([1]))           # a bad item: one line, not a second "at least 1 item" line
@example(values=every_field({"a\nb": 1}))   # a key with a line break inside a section
@example(values=every_field(math.nan))
def test_every_field_takes_any_value_through_an_override_and_a_file(values, config_dir):
    """Each field in turn set to its own random value (of any type), as `field=value` and in a YAML file: a config
    that differs from the defaults in that field only, or one line per problem, each about that field."""
    path = config_dir / "field.yaml"
    for field, value in zip(FIELDS, values):
        path.write_text(yaml.safe_dump(nested(field, value)))
        for source, load in ((SRC, lambda: load_config(None, [f"{field}={yaml_value(value)}"])),
                             (str(path), lambda: load_config(path))):
            try:
                cfg = load()
            except ConfigError as err:
                for known, loc, reason in check_config_error(str(err), source):
                    if known is None:  # a check across sections names the fields it relates
                        assert named_paths(reason), (field, reason)
                    else:  # the field or an item of it, a section above it, a required field of a section it made
                        assert loc == field or loc.startswith(field + ".") or field.startswith(loc + ".") or (
                            reason == "Field required" and field.startswith(loc.rsplit(".", 1)[0] + ".")), \
                            (field, loc, reason)
            else:
                check_only_field_changed(cfg, field)


PARTS = st.one_of(st.sampled_from(sorted({p for f in FIELDS for p in f.split(".")})),
                  st.sampled_from(["0", "1", "3", "00", "-1", "²", "٣", "", " ", "x", "sources"]),
                  st.text(max_size=4))
OVERRIDE_VALUES = st.one_of(st.text(max_size=12), VALUES.map(yaml_value),
                            st.sampled_from(["", "'", "[", "{a: ", "\x1a", "!!python/name:os.system",
                                             "=", "&a [*a]", "a: b: c"]))
OVERRIDES = st.one_of(
    st.builds(lambda parts, sep, value: ".".join(parts) + sep + value, st.lists(PARTS, max_size=5),
              st.sampled_from(["=", "=", "", "==", " = "]), OVERRIDE_VALUES),
    st.builds(lambda field, index, value: f"{field}.{index}={value}", st.sampled_from(FIELDS),
              st.sampled_from(["0", "1", "3", "²", "a"]), OVERRIDE_VALUES),
    st.builds(lambda field, value: f"{field}={value}", st.sampled_from(FIELDS), OVERRIDE_VALUES),
    st.text(max_size=30))


@fuzz(800)
@given(overrides=st.lists(OVERRIDES, min_size=1, max_size=3))
@example(overrides=["prompts.sources.3.weight=2"])         # an index past the list's end
@example(overrides=["prompts.sources=[{}]", "prompts.sources.0.path.0=x"])   # a required field indexed (fixed before)
@example(overrides=["prompts.sources.²=2"])                  # '²'.isdigit(): was a ValueError from int()
@example(overrides=["run.name='b"])                          # the YAML error was three lines
@example(overrides=["run.name=\x1a"])                        # a character YAML refuses: was two lines
@example(overrides=["run.name=" + "[" * 1000])               # was a RecursionError
@example(overrides=["a\nb.c=1"])                             # a line break in the key: one line
@example(overrides=["run\x1b.name=x"])                       # an escape sequence went raw into the message
@example(overrides=["novalue"])
def test_random_override_strings_are_a_config_or_one_line_naming_the_override(overrides):
    """Random `key.sub=value` strings (dotted paths with list indices, missing or doubled `=`, bad YAML values):
    a config, or a one-line error quoting the override, or one line per problem naming the field."""
    try:
        load_config(None, overrides)
    except ConfigError as err:
        message = str(err)
        keys = [item.partition("=")[0] for item in overrides]
        if message.startswith("override "):  # it quotes the override, or names its (printable) key
            one_line(message)
            assert any(message.startswith(f"override {item!r}: ") or
                       (key.isprintable() and message.startswith(f"override {key}: "))
                       for item, key in zip(overrides, keys)), message
            return
        for known, _, rest in check_config_error(message, SRC):
            assert known or any(rest.startswith(shown(key.split(".")[0]) + s) for key in keys for s in (":", ".")) \
                or named_paths(rest), message


# ---------------------------------------------------------------------------------------------
# 2. Prompt files

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\ufeff"), max_size=20)
ROW_TEXT = st.tuples(ANY_TEXT, st.sampled_from("aZ7é猫?"), ANY_TEXT).map("".join)   # at least one visible character
# blank rows: whitespace, or only control and zero-width characters (nothing a text encoder could read)
BLANK = st.text(" \t\x0b\x0c\x1c\xa0\u3000\u2003\x00\x01\x1b\x7f\u200b\u200d\u2060", max_size=4)
BAD_BYTES = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80",
                             b"\xe2\x82", b"\x80"])
LONG = st.sampled_from(["x" * 100_000, " ".join(["a very long prompt"] * 300), "word " * 2000])
ROWS = st.lists(st.one_of(
    st.tuples(st.just("text"), ROW_TEXT.map(lambda s: s.encode("utf-8"))),
    st.tuples(st.just("text"), LONG.map(str.encode)),
    st.tuples(st.just("blank"), BLANK.map(lambda s: s.encode("utf-8"))),
    st.tuples(st.just("bad"), st.tuples(ROW_TEXT, BAD_BYTES, ROW_TEXT).map(
        lambda t: t[0].encode() + t[1] + t[2].encode()))), max_size=8)


@pytest.fixture(scope="module")
def prompt_dir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@fuzz(200)
@given(rows=ROWS, endings=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=8, max_size=8),
       final=st.booleans(), bom=st.booleans())
@example(rows=[("blank", b"")], endings=[b"\n"] * 8, final=True, bom=True)   # a BOM alone was a one-char prompt
@example(rows=[("text", b"a cat"), ("blank", b"  ")], endings=[b"\n"] * 8, final=False, bom=True)
@example(rows=[], endings=[b"\n"] * 8, final=False, bom=False)
@example(rows=[("text", b"a cat"), ("blank", b"\x00"), ("blank", "\u200b".encode())], endings=[b"\n"] * 8,
         final=True, bom=False)   # rows of only a NUL or a zero-width space were prompts
def test_a_prompt_file_keeps_usable_rows_and_counts_bad_ones(prompt_dir, rows, endings, final, bom):
    """Rows of text (some of 100k characters or thousands of words), blank rows, rows that are not UTF-8, any line
    ends, with or without a final one and a byte-order mark: the text rows load stripped and in order, the others
    are counted by kind; a file with no text row is a one-line error naming the file and the counts."""
    ends = [b"\n" if end == b"\r" and i + 1 < len(rows) and not rows[i + 1][1] else end  # \r + "" + \n is one end
            for i, end in enumerate(endings[:len(rows)])]
    final = final or bool(rows and not rows[-1][1])  # a last empty row is there only if a line end comes after it
    raw = b"".join(row + (ends[i] if i < len(rows) - 1 or final else b"") for i, (_, row) in enumerate(rows))
    raw = (b"\xef\xbb\xbf" if bom else b"") + raw
    path = prompt_dir / "prompts.txt"
    path.write_bytes(raw)
    # what the file holds, from how it was built: text rows are kept stripped, blank and bad rows counted
    expected = [row.decode("utf-8").strip() for kind, row in rows if kind == "text"]
    empty = sum(kind == "blank" for kind, _ in rows)
    undecodable = sum(kind == "bad" for kind, _ in rows)
    if not expected:
        with pytest.raises(PromptFileError) as err:
            read_prompt_file(path)
        assert one_line(str(err.value)) == \
            f"prompt file {path}: no usable prompt ({empty} empty, {undecodable} not UTF-8 rows)"
        return
    loaded = read_prompt_file(path)
    assert list(loaded.prompts) == expected
    assert (loaded.skipped_empty, loaded.skipped_undecodable) == (empty, undecodable)


def test_a_missing_or_unreadable_prompt_file_is_one_line_naming_it(prompt_dir):
    for path in (prompt_dir / "missing.txt", prompt_dir):
        with pytest.raises(PromptFileError) as err:
            read_prompt_file(path)
        assert one_line(str(err.value)).startswith(f"prompt file {path}: cannot read")


def test_a_jsonl_prompt_file_reads_the_prompt_of_each_row_and_names_a_bad_line(prompt_dir):
    """The prompts.jsonl an attack writes trains as a prompt source: each row's "prompt" (other fields ignored,
    blank rows counted); a row that is not JSON, or has no string prompt, is one line naming the file and line."""
    path = prompt_dir / "prompts.jsonl"
    rows = [{"case_number": "0", "prompt": " tok\nens a square ", "seed": 3}, {"prompt": "a cat"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    loaded = read_prompt_file(path)
    assert list(loaded.prompts) == ["tok\nens a square", "a cat"] and loaded.skipped_empty == 1
    for bad, why in (('{"prompt": 3}', 'has no string field "prompt"'), ("[1]", 'has no string field "prompt"'),
                     ('{"prompt": "x"', "is not JSON")):
        path.write_text(json.dumps(rows[1]) + "\n" + bad + "\n")
        with pytest.raises(PromptFileError) as err:
            read_prompt_file(path)
        assert one_line(str(err.value)).startswith(f"prompt file {path}: line 2 {why}")


def test_prompts_far_longer_than_77_tokens_load_whole_and_are_truncated_by_both_text_encoders(prompt_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    from safediff.common.assets import resolve
    from safediff.common.config import ClipConfig
    from safediff.common.models import ModelBundle
    from safediff.reward_server.clip_model import load_clip

    long_rows = ["x" * 100_000, " ".join(["a red square"] * 400), "a cat"]
    path = prompt_dir / "long.txt"
    path.write_text("\n".join(long_rows) + "\n")
    assert list(read_prompt_file(path).prompts) == long_rows
    sd = resolve("pkg:world/weights/sd")
    bundle = ModelBundle(None, None, CLIPTextModel.from_pretrained(sd, subfolder="text_encoder"),
                         CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer"), None)
    conditions = bundle.encode_prompts(long_rows).states
    assert conditions.shape[:2] == (3, 77) and torch.isfinite(conditions).all()
    clip = load_clip(ClipConfig(model="local-dir:pkg:world/weights/clip"))
    embeddings = clip.encode_text(long_rows)
    assert embeddings.shape[0] == 3 and torch.isfinite(embeddings).all()


# ---------------------------------------------------------------------------------------------
# 3. Checkpoint folders

LORA_KEYS = [f"{block}.attentions.0.transformer_blocks.0.attn1.{proj}.lora_{ab}.weight"
             for block in ("down_blocks.0", "up_blocks.1") for proj in ("to_q", "to_v") for ab in "AB"]
STEPS = (1, 2)
MANIFEST = "checkpoints/manifest.json"
CHECKPOINT_FILES = [MANIFEST] + [f"checkpoints/step_{s}/{name}" for s in STEPS for name in (
    "config.yaml", "pytorch_lora_weights.safetensors", "state.json", "trainer.json", "trainer.safetensors",
    *(("replay.safetensors",) if s == 2 else ()))]


def _weights(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {k: torch.randn((4, 8) if k.endswith("lora_A.weight") else (8, 4), generator=gen) for k in LORA_KEYS}


def _trainer(step: int) -> ckpt.TrainerState:
    """AdamW's state after one step, and an RNG state, both made from `step` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step)
        param = torch.nn.Parameter(torch.randn(6))
        optimizer = torch.optim.AdamW([param], lr=0.1)
        param.sum().backward()
        optimizer.step()
        return ckpt.TrainerState.capture(optimizer.state_dict())


def _write(run_dir: Path, cfg: Config, step: int, replay: bool) -> Path:
    return ckpt.write_checkpoint(run_dir, cfg, step, step, _weights(step), [_trainer(step)], ckpt.Layout.TORCH,
                                 {"cursors": [[0, step]] * 3}, replay={0: _weights(0)} if replay else None)


class Events:
    """A CheckpointLog that keeps the events."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def add_checkpoint(self, path, step, version, files):
        pass

    def event(self, kind, **fields):
        self.events.append((kind, fields))


class Pristine(tuple):
    """(config, run dir), shown short in a failing example."""

    def __new__(cls, cfg: Config, run_dir: Path):
        return super().__new__(cls, (cfg, run_dir))

    def __repr__(self) -> str:
        return f"Pristine(world config, {self[1]})"


@pytest.fixture(scope="module")
def pristine():
    """A run dir holding step_1 and step_2 (with a replay of policy 0), written by the project's writer for the
    world config."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        cfg = load_config("world", [f"run.output_dir={folder}"])
        for step in STEPS:
            _write(run_dir, cfg, step, replay=step == 2)
        assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()) == \
            sorted(CHECKPOINT_FILES)
        yield Pristine(cfg, run_dir)


def check_is_the_written_checkpoint(checkpoint: ckpt.Checkpoint, step: int) -> None:
    """Exactly what the writer was given for `step`: weights, optimiser state, RNG, cursor, replay."""
    assert checkpoint.step == step and checkpoint.version == step and checkpoint.layout is ckpt.Layout.TORCH
    assert checkpoint.weights.keys() == _weights(step).keys()
    assert all(torch.equal(checkpoint.weights[k], v) for k, v in _weights(step).items())
    written = _trainer(step)
    (trainer,) = checkpoint.trainers
    assert trainer.skeleton == json.loads(json.dumps(written.skeleton)) and torch.equal(trainer.rng, written.rng)
    assert trainer.tensors.keys() == written.tensors.keys()
    assert all(torch.equal(trainer.tensors[k], v) for k, v in written.tensors.items())
    assert checkpoint.cursor == {"cursors": [[0, step]] * 3}
    assert checkpoint.replay.keys() == ({0} if step == 2 else set())
    for k, v in (_weights(0).items() if step == 2 else ()):
        assert torch.equal(checkpoint.replay[0][k], v)


def test_an_intact_run_resumes_from_its_newest_checkpoint_exactly(pristine):
    cfg, run_dir = pristine
    check_is_the_written_checkpoint(ckpt.resume_point(run_dir, cfg, ckpt.Layout.TORCH), 2)


DAMAGE = st.lists(st.tuples(st.sampled_from(CHECKPOINT_FILES + [MANIFEST] * 3),  # the manifest a quarter of the time
                            st.sampled_from(["truncate", "flip", "delete"]),
                            st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3)


@fuzz(100)
@given(damage=DAMAGE)
@example(damage=[(MANIFEST, "truncate", 0.5, 1)])     # was a JSONDecodeError traceback
@example(damage=[(MANIFEST, "truncate", 0.0, 1)])     # an empty manifest: the same
@example(damage=[(MANIFEST, "flip", 0.0, 0x80)])      # not UTF-8: was a UnicodeDecodeError traceback
@example(damage=[(MANIFEST, "flip", 0.469, 0x20)])    # the newest entry's "path" key as "patH": was a KeyError
@example(damage=[("checkpoints/step_2/trainer.safetensors", "flip", 0.9, 1)])
@example(damage=[("checkpoints/step_2/state.json", "delete", 0, 1),
                 ("checkpoints/step_1/config.yaml", "truncate", 0.3, 1)])
def test_damaged_checkpoint_files_fall_back_or_are_one_line_errors(pristine, damage):
    """Truncated, flipped or deleted files: the resume takes the newest checkpoint whose every file is intact,
    exactly as written (each newer one is rejected by name), or none; a damaged manifest is a one-line error
    naming it. Never a damaged checkpoint, never another exception type."""
    cfg, source = pristine
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(source, run_dir)
        for name, how, where, mask in damage:
            path = run_dir / name
            raw = path.read_bytes() if path.exists() else b""
            at = int(where * len(raw))
            if how == "delete":
                path.unlink(missing_ok=True)
            elif how == "truncate" and raw:
                path.write_bytes(raw[:at])
            elif raw:
                path.write_bytes(raw[:at] + bytes([raw[at] ^ mask]) + raw[at + 1:])
        changed = {name for name in CHECKPOINT_FILES if not (run_dir / name).exists() or
                   (run_dir / name).read_bytes() != (source / name).read_bytes()}
        store = Events()
        try:
            checkpoint = ckpt.resume_point(run_dir, cfg, ckpt.Layout.TORCH, store)
        except UserInputError as err:
            event("damaged manifest: one-line error")
            assert MANIFEST in changed, err
            assert one_line(str(err)).startswith(f"checkpoint manifest {run_dir / MANIFEST} ")
            return
        intact = [s for s in STEPS if not any(n.startswith(f"checkpoints/step_{s}/") for n in changed)]
        event(f"resumed from {checkpoint.step if checkpoint else None}, intact {intact}")
        if checkpoint is not None:
            assert checkpoint.step in intact, (checkpoint.step, changed)
            check_is_the_written_checkpoint(checkpoint, checkpoint.step)
        if MANIFEST not in changed:
            assert (checkpoint.step if checkpoint else None) == (max(intact) if intact else None)
            rejected = {Path(fields["path"]).name for kind, fields in store.events if kind == "checkpoint_rejected"}
            assert rejected == {f"step_{s}" for s in STEPS if s not in intact and s > max(intact, default=0)}


class Crash(OSError):
    """The injected failure."""


@fuzz(20)
@given(crash_at=st.integers(0, 5), keep=st.floats(0, 1))
@example(crash_at=0, keep=0.5)   # trainer.safetensors half-written
@example(crash_at=3, keep=0.0)   # the new manifest written but not renamed into place
def test_a_crash_while_writing_a_checkpoint_loses_nothing(pristine, crash_at, keep):
    """A write of step_3 that dies at any of its file operations (one of them leaving a file half-written) leaves
    the manifest as it was and step_2 loadable exactly; the next write of step_3 succeeds."""
    cfg, source = pristine
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(source, run_dir)
        manifest = (run_dir / MANIFEST).read_bytes()
        calls: list[str] = []

        def failing(name, real):
            def wrapper(*args, **kwargs):
                calls.append(name)
                if len(calls) - 1 != crash_at:
                    return real(*args, **kwargs)
                if name == "save_file":  # the file is on disk, cut short
                    real(*args, **kwargs)
                    target = Path(args[1])
                    target.write_bytes(target.read_bytes()[:int(keep * target.stat().st_size)])
                raise Crash(f"injected at file operation {crash_at} ({name})")
            return wrapper

        shim = mock.Mock(wraps=ckpt.os, replace=failing("replace", ckpt.os.replace),
                         fsync=failing("fsync", ckpt.os.fsync))
        with mock.patch.object(ckpt, "save_file", failing("save_file", ckpt.save_file)), \
                mock.patch.object(ckpt, "os", shim):
            try:
                _write(run_dir, cfg, 3, replay=True)
                crashed = False
            except Crash:
                crashed = True
        operations = ["save_file", "save_file", "replace", "fsync", "replace"]  # trainer, replay, folder, manifest
        assert crashed == (crash_at < len(operations)) and calls == operations[:crash_at + 1]
        newest = ckpt.load_latest(run_dir, ckpt.trainable_for(cfg))
        if crashed:
            assert (run_dir / MANIFEST).read_bytes() == manifest
            check_is_the_written_checkpoint(newest, 2)
        else:
            assert newest.step == 3
        _write(run_dir, cfg, 3, replay=False)
        again = ckpt.load_latest(run_dir, ckpt.trainable_for(cfg))
        assert again.step == 3 and all(torch.equal(again.weights[k], v) for k, v in _weights(3).items())
        assert [e["step"] for e in ckpt.read_manifest(run_dir)] == [1, 2, 3]
