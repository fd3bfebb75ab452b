"""mkdocs hook: writes the configuration reference into configuration.md at build time.

The rows come from `safediff.common.config.describe_fields`, the listing `safediff config --describe` prints, so the
page lists exactly the fields the pydantic models define. Each field's type is read from its section's model, which
`section_at` finds from the dotted path. One table per config section, in the order `describe_fields` gives.
"""

from __future__ import annotations

import html
import re
import typing
from pathlib import Path
from types import NoneType, UnionType

from mkdocs.exceptions import PluginError

from safediff.common import config as cfg

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lacks the marker {MARKER} that the configuration reference replaces")
    return markdown.replace(MARKER, reference_markdown())


def reference_markdown() -> str:
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for path, default, description in cfg.describe_fields():
        sections.setdefault(path.rpartition(".")[0], []).append((path, default, description))
    out = []
    for section, rows in sections.items():
        model = cfg.section_at(section)
        level = "###" if "." not in section else "####"  # under the page's "Every field"
        out += [f"{level} `{section}`", ""]
        if model.__doc__:
            out += [_text(" ".join(model.__doc__.split())), ""]
        out += ["| field | type | default | description |", "|---|---|---|---|"]
        for path, default, description in rows:
            kind = _type_name(model.model_fields[path.rpartition(".")[2]].annotation)
            out.append(f"| `{path}` | {_code(kind)} | {_code(default)} | {_text(description)} |")
        out.append("")
    return "\n".join(out)


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is NoneType:
        return "None"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type):
        return "Path" if issubclass(annotation, Path) else annotation.__name__
    return str(annotation).replace("typing.", "")


def _code(value: str) -> str:
    """`value` as inline code in a table cell (a longer fence when it holds a backtick). A `|` stays as it is: the
    tables extension does not split cells inside code spans, and a `\\|` there would show its backslash."""
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _text(value: str) -> str:
    """Prose for a table cell: code spans kept, everything else shown literally (no HTML, emphasis or links; a `|`
    escaped so that it does not end the cell)."""
    out, last = [], 0
    for m in _CODE_SPAN.finditer(value):
        out.append(_literal(value[last:m.start()]))
        out.append(_code(m.group(2)))
        last = m.end()
    out.append(_literal(value[last:]))
    return "".join(out)


def _literal(value: str) -> str:
    value = html.escape(value, quote=False)
    return re.sub(r"([\\*_\[\]|])", r"\\\1", value)
