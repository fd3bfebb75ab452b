"""Prompt files and the deterministic, resumable prompt stream a run trains on."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from safediff.common.assets import resolve
from safediff.common.config import PromptsConfig, PromptSource
from safediff.common.errors import UserInputError
from safediff.common.messages import PromptGroup
from safediff.common.seeds import derive_seed, generator

log = logging.getLogger(__name__)


class PromptFileError(UserInputError, ValueError):
    """A prompt file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class PromptFile:
    path: Path
    prompts: tuple[str, ...]
    skipped_empty: int
    skipped_undecodable: int


def read_prompt_file(path: str | Path) -> PromptFile:
    """One prompt per line; or, for a `.jsonl` file (the prompts.jsonl `safediff attack` writes, a prompt set in
    JSONL), the "prompt" field of each row. Empty rows (blank, or only control or zero-width characters) and rows
    that are not valid UTF-8 are skipped and counted (a warning names the file and the counts); a file with no
    usable row, or a JSONL row that is not an object with a string "prompt", is an error. A UTF-8 byte-order mark
    at the start (Windows editors write one) is not part of the first row."""
    path = Path(resolve(path))
    try:
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as err:
        raise PromptFileError(f"prompt file {path}: cannot read ({err.strerror or err})") from err
    prompts, empty, undecodable = [], 0, 0
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            undecodable += 1
            continue
        if path.suffix == ".jsonl" and text:
            text = _jsonl_prompt(path, number, text)
        if any(c.isprintable() and not c.isspace() for c in text):  # not only control or zero-width characters
            prompts.append(text)
        else:
            empty += 1
    if not prompts:
        raise PromptFileError(f"prompt file {path}: no usable prompt ({empty} empty, {undecodable} not UTF-8 rows)")
    if empty or undecodable:
        log.warning("prompt file %s: skipped %d empty and %d non-UTF-8 rows; %d prompts kept",
                    path, empty, undecodable, len(prompts))
    return PromptFile(path, tuple(prompts), empty, undecodable)


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    """The "prompt" of row `number` of a JSONL prompt file."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"prompt file {path}: line {number} is not JSON ({err.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise PromptFileError(f"prompt file {path}: line {number} has no string field \"prompt\"")
    return row["prompt"].strip()


@dataclass(frozen=True)
class AdversarialPool:
    """The adversarial source's prompts now, and what made them: the attack requested at `step` against policy
    `version` (runtime/redteam.py)."""

    prompts: tuple[str, ...]
    step: int
    version: int


class PromptStream:
    """Seeded prompt mixture, each source read without replacement in a per-epoch shuffled order.

    Group i of step s picks source k with probability weight_k / sum(weights), drawn from a generator
    seeded by (seed, s); source k's epoch e is the permutation randperm(n_k) seeded by (seed, k, e).
    With `prompts.adversarial`, one more source (index len(sources), labelled unsafe) reads the adversarial
    pool, whose weight is 0 until a pool is installed (`set_pool`); each pool is read from epoch 0 in orders
    seeded by (seed, the pool's request step, e).
    The state is one (epoch, position) cursor per source and the pool: `state_dict` / `load_state_dict` resume it.
    """

    def __init__(self, sources: tuple[PromptSource, ...], seed: int, adversarial_weight: float | None = None):
        self.sources = sources
        self.files = [read_prompt_file(s.path) for s in sources]
        self.seed = seed
        self.adversarial_weight = adversarial_weight
        self.pool: AdversarialPool | None = None
        self.cursors = [[0, 0] for _ in range(len(sources) + (adversarial_weight is not None))]  # [epoch, position]
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_config(cls, prompts: PromptsConfig, seed: int) -> PromptStream:
        adversarial = prompts.adversarial
        return cls(prompts.sources, seed, adversarial.weight if adversarial is not None else None)

    @property
    def adversarial_source(self) -> int:
        """The adversarial source's index in the mixture (its `PromptGroup.source`)."""
        return len(self.sources)

    def _prompts(self, source: int) -> tuple[str, ...]:
        return self.files[source].prompts if source < len(self.sources) else self.pool.prompts

    def _weights(self) -> torch.Tensor:
        weights = [s.weight for s in self.sources]
        if self.adversarial_weight is not None:
            weights.append(self.adversarial_weight if self.pool is not None and self.pool.prompts else 0.0)
        return torch.tensor(weights, dtype=torch.float64)

    def set_pool(self, pool: AdversarialPool) -> None:
        """Replace the adversarial source's prompts; it is read from the start of the new pool's first epoch."""
        if self.adversarial_weight is None:
            raise ValueError("this prompt stream has no adversarial source (prompts.adversarial is unset)")
        self.pool = pool
        self.cursors[self.adversarial_source] = [0, 0]
        self._orders = {k: v for k, v in self._orders.items() if k[0] != self.adversarial_source}

    def _order(self, source: int, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # keep one epoch per source
            n = len(self._prompts(source))
            seed = derive_seed("prompts", self.seed, source, epoch) if source < len(self.sources) else \
                derive_seed("adversarial", self.seed, self.pool.step, epoch)
            self._orders[key] = torch.randperm(n, generator=generator(seed))
        return self._orders[key]

    def _next_index(self, source: int) -> int:
        epoch, position = self.cursors[source]
        n = len(self._prompts(source))
        if position == n:
            epoch, position = epoch + 1, 0
        index = int(self._order(source, epoch)[position])
        self.cursors[source] = [epoch, position + 1]
        return index

    def next_groups(self, step: int, count: int) -> list[PromptGroup]:
        picks = torch.multinomial(self._weights(), count, replacement=True,
                                  generator=generator(derive_seed("mixture", self.seed, step)))
        groups = []
        for group_index, source in enumerate(picks.tolist()):
            row = self._next_index(source)
            unsafe = self.sources[source].unsafe if source < len(self.sources) else True
            groups.append(PromptGroup(step=step, group_index=group_index, prompt=self._prompts(source)[row],
                                      source=source, prompt_index=row, unsafe=unsafe))
        return groups

    def state_dict(self) -> dict:
        state = {"cursors": [list(c) for c in self.cursors]}
        if self.pool is not None:
            state["adversarial"] = {"prompts": list(self.pool.prompts), "step": self.pool.step,
                                    "version": self.pool.version}
        return state

    def load_state_dict(self, state: dict) -> None:
        cursors = state["cursors"]
        if len(cursors) != len(self.cursors):
            raise ValueError(f"prompt cursor has {len(cursors)} sources, config has {len(self.cursors)}")
        pool = state.get("adversarial")
        self.pool = None if pool is None else AdversarialPool(tuple(pool["prompts"]), pool["step"], pool["version"])
        self._orders = {}
        self.cursors = [list(map(int, c)) for c in cursors]
