"""Append-only JSON-lines files that survive a crash mid-write: a cut last line is skipped on reading,
and the next append starts on a fresh line."""

from __future__ import annotations

import json
from pathlib import Path


def append(path: Path, records: list[dict]) -> None:
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as r:
                r.seek(-1, 2)
                if r.read(1) != b"\n":
                    f.write(b"\n")  # a line cut by a crash stays cut (and is skipped), it does not swallow ours
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: its record is produced again
    return out
