"""The documentation: the mkdocs site builds in strict mode, its generated configuration reference lists every config
field, every page is in the nav, and the README stays short with working links into docs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safediff.common.config import describe_fields

REPO = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about MkDocs 2.0, not a warning
    built = subprocess.run([str(MKDOCS), "build", "--strict", "-f", "mkdocs.yml", "-d", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout[-3000:]}\n{built.stderr[-5000:]}"
    return out


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "configuration" / "index.html").is_file()


def test_configuration_reference_lists_every_field(site):
    page = (site / "configuration" / "index.html").read_text()
    assert "config-reference" not in page, "the marker was not replaced"
    missing = [path for path, _, _ in describe_fields() if f"<td><code>{path}</code></td>" not in page]
    assert not missing, f"fields missing from the configuration reference: {missing}"
    # every table row has its four cells: a `|` in a type, default or description did not split a cell
    body_rows = re.findall(r"<tr>(.*?)</tr>", page.split("<tbody>", 1)[1], re.S)
    widths = {len(re.findall(r"<td\b", row)) for row in body_rows if "<td" in row}
    assert widths == {4}, f"configuration table rows with other than 4 cells: {widths}"


def test_readme_is_short_and_its_docs_links_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 200
    links = [target.split("#", 1)[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)
             if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]  # relative links only: no scheme, no bare anchor
    docs_links = [link for link in links if link.startswith("docs/")]
    assert docs_links, "the README links to no docs page"
    broken = [link for link in links if not (REPO / link).exists()]
    assert not broken, f"README links to missing files: {broken}"


class _Loader(yaml.SafeLoader):
    """mkdocs.yml with its `!!python/name:` tags read as plain strings."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


def test_every_page_is_in_the_nav():
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_Loader)
    docs = REPO / config.get("docs_dir", "docs")
    in_nav = set(_nav_pages(config["nav"]))
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md") if "hooks" not in p.relative_to(docs).parts}
    assert pages - in_nav == set(), f"pages not in the nav of mkdocs.yml: {sorted(pages - in_nav)}"
    assert in_nav - pages == set(), f"nav entries without a page: {sorted(in_nav - pages)}"
