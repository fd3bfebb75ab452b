"""Prompt files and the deterministic, resumable prompt stream a run trains on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from safediff.common.assets import resolve
from safediff.common.config import PromptSource
from safediff.common.errors import UserInputError
from safediff.common.seeds import derive_seed, generator
from safediff.common.types import PromptGroup

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
    """One prompt per line. Empty/blank rows and rows that are not valid UTF-8 are skipped and counted
    (a warning names the file and the counts); a file with no usable row is an error."""
    path = Path(resolve(path))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PromptFileError(f"prompt file {path}: cannot read ({err.strerror or err})") from err
    prompts, empty, undecodable = [], 0, 0
    for line in raw.splitlines():
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            undecodable += 1
            continue
        if text:
            prompts.append(text)
        else:
            empty += 1
    if not prompts:
        raise PromptFileError(f"prompt file {path}: no usable prompt ({empty} empty, {undecodable} not UTF-8 rows)")
    if empty or undecodable:
        log.warning("prompt file %s: skipped %d empty and %d non-UTF-8 rows; %d prompts kept",
                    path, empty, undecodable, len(prompts))
    return PromptFile(path, tuple(prompts), empty, undecodable)


class PromptStream:
    """Seeded prompt mixture, each source read without replacement in a per-epoch shuffled order.

    Group i of step s picks source k with probability weight_k / sum(weights), drawn from a generator
    seeded by (seed, s); source k's epoch e is the permutation randperm(n_k) seeded by (seed, k, e).
    The state is one (epoch, position) cursor per source: `state_dict` / `load_state_dict` resume it.
    """

    def __init__(self, sources: tuple[PromptSource, ...], seed: int):
        self.sources = sources
        self.files = [read_prompt_file(s.path) for s in sources]
        self.seed = seed
        self.weights = torch.tensor([s.weight for s in sources], dtype=torch.float64)
        self.cursors = [[0, 0] for _ in sources]  # [epoch, position] per source
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def _order(self, source: int, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # keep one epoch per source
            n = len(self.files[source].prompts)
            self._orders[key] = torch.randperm(n, generator=generator(derive_seed("prompts", self.seed, source, epoch)))
        return self._orders[key]

    def _next_index(self, source: int) -> int:
        epoch, position = self.cursors[source]
        n = len(self.files[source].prompts)
        if position == n:
            epoch, position = epoch + 1, 0
        index = int(self._order(source, epoch)[position])
        self.cursors[source] = [epoch, position + 1]
        return index

    def next_groups(self, step: int, count: int) -> list[PromptGroup]:
        picks = torch.multinomial(self.weights, count, replacement=True,
                                  generator=generator(derive_seed("mixture", self.seed, step)))
        groups = []
        for group_index, source in enumerate(picks.tolist()):
            row = self._next_index(source)
            groups.append(PromptGroup(step=step, group_index=group_index, prompt=self.files[source].prompts[row],
                                      source=source, prompt_index=row, unsafe=self.sources[source].unsafe))
        return groups

    def state_dict(self) -> dict:
        return {"cursors": [list(c) for c in self.cursors]}

    def load_state_dict(self, state: dict) -> None:
        cursors = state["cursors"]
        if len(cursors) != len(self.sources):
            raise ValueError(f"prompt cursor has {len(cursors)} sources, config has {len(self.sources)}")
        self.cursors = [list(map(int, c)) for c in cursors]
