"""The package's layers import one way, with no cycles, and everything imports the project as `safediff.*`.

Layers, lowest first (a module may import its own folder and any lower layer, never a higher one or a
sibling at its own level):

    common (core)  <  actors, reward_server, learner, redteam (roles)  <  runtime  <  world  <  evaluation
                   <  cli, bench
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"common": 0, "actors": 1, "reward_server": 1, "learner": 1, "redteam": 1, "runtime": 2, "world": 3,
         "evaluation": 4, "cli": 5, "bench": 5}
PROJECT = set(LAYER) - {"cli", "bench"}


def _imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = (package or "").split(".")[: len((package or "").split(".")) - node.level + 1]
                out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                out.append((node.lineno, node.module))
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) if parts[:1] == ("bench",) else ".".join(("safediff",) + parts)


def _sources() -> list[Path]:
    return sorted([REPO / "cli.py", REPO / "__init__.py"] +
                  [p for folder in LAYER if (REPO / folder).is_dir() for p in (REPO / folder).rglob("*.py")])


def _layer(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] == "bench":
        return "bench", LAYER["bench"]
    if parts[0] != "safediff" or len(parts) < 2:
        return None
    return (parts[1], LAYER[parts[1]]) if parts[1] in LAYER else None


def _violations(path: Path, name: str) -> list[str]:
    """Imports of module `name` (file `path`) that are bare, or go up or sideways in the layers."""
    own, problems = _layer(name), []
    for line, target in _imports(path, name):
        if target.split(".")[0] in PROJECT:
            problems.append(f"{path.name}:{line}: bare import of {target} (use safediff.{target})")
            continue
        theirs = _layer(target)
        if own is not None and theirs is not None and theirs[0] != own[0] and theirs[1] >= own[1]:
            problems.append(f"{name}:{line}: {own[0]} (layer {own[1]}) imports {target} (layer {theirs[1]})")
    return problems


def test_imports_point_down_the_layers():
    problems = [p for path in _sources() for p in _violations(path, _module_name(path))]
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in _sources()}
    graph = {name: sorted({t for _, t in _imports(path, name) if t in modules and t != name})
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_tests_import_the_project_only_through_safediff():
    problems = [f"{path.name}:{line}: {target}" for path in sorted((REPO / "tests").glob("*.py"))
                for line, target in _imports(path)
                if target.split(".")[0] in PROJECT | {"tests", "conftest"}]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_upward_sideways_and_bare_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom safediff.common import seeds\n\ndef f():\n"
                   "    from safediff.runtime.controller import run\n    import " + "common.config\n"
                   "    from safediff.learner.update import GRPOUpdate\n")
    assert len(_violations(bad, "safediff.common.bad")) == 3  # two lazy upward imports and the bare one
    assert len(_violations(bad, "safediff.actors.bad")) == 3  # upward, a role importing another role, bare
    assert len(_violations(bad, "safediff.evaluation.bad")) == 1  # only the bare one
