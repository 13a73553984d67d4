"""Griffe extension for the API reference: read this codebase's docstring conventions as Google style.

Two conventions of the ``jaxrlhf`` docstrings are not Google style as griffe parses it:

* Sphinx roles (``:func:`jaxrlhf.ops.gae```, ``:class:`~x.Y```). Markdown has no roles, so they would
  render as a stray ``:func:`` before the name (and a role inside a ``Returns:`` entry would be read as
  ``name: description``). They become inline code; ``~`` keeps only the last dotted component.
* One ``Args:`` entry for several parameters (``graphdef, state: ...`` or ``mean / std: ...``). Griffe
  would warn that no parameter is called ``graphdef, state``. The entry is repeated once per name, each
  with the shared description.

* reStructuredText's simple tables (rows between ``====  ====`` borders) become Markdown tables, and a
  paragraph ending in ``::`` (an RST literal block follows) ends in ``:``; the indented block after it
  is already a Markdown code block.

* A section title (``Returns:``, ``Raises:``, ...) directly under the previous section's last line gets
  the blank line above it that griffe needs to see a section (otherwise it renders as plain text).

These rewrites run on the docstring text before griffe parses it; the source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|exc|obj|const|ref|term):`(~?)([^`]+)`")
_PARAM_SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Params|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_MULTI_NAME = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*[,/]\s*\*{0,2}\w+)+)\s*:(.*)$")
_SECTION_TITLE = re.compile(
    r"^\s*(?:Args|Arguments|Params|Parameters|Keyword Args|Keyword Arguments|Other Parameters|Returns|Yields|"
    r"Receives|Raises|Warns|Attributes|Examples):\s*$")
_TABLE_BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$")


def _role(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_multi_name_params(text: str) -> str:
    """Repeat an ``a, b: description`` entry of a parameters section as ``a: ...`` and ``b: ...``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        header = _PARAM_SECTION.match(line)
        if not header:
            continue
        section_indent = len(header.group(1))
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > section_indent):
            if not lines[i].strip() and (i + 1 >= len(lines) or _indent(lines[i + 1]) <= section_indent):
                break  # a blank line that ends the section
            entry = _MULTI_NAME.match(lines[i])
            if not entry:
                out.append(lines[i])
                i += 1
                continue
            indent, names, first = entry.group(1), entry.group(2), entry.group(3)
            rest = []
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(indent):
                rest.append(lines[i])
                i += 1
            for name in re.split(r"\s*[,/]\s*", names):
                out.append(f"{indent}{name}:{first}")
                out.extend(rest)
    return "\n".join(out)


def _table_to_markdown(block: list[str]) -> list[str]:
    """An RST simple table (border, header, border, body, border) as a Markdown table."""
    spans = [m.start() for m in re.finditer(r"=+", block[0])]

    def cells(line: str) -> list[str]:
        ends = spans[1:] + [len(line)]
        return [line[a:b].strip().replace("|", "\\|") for a, b in zip(spans, ends)]

    rows: list[list[str]] = []
    header_rows = 0
    borders = 0
    for line in block:
        if _TABLE_BORDER.match(line):
            borders += 1
            if borders == 2:
                header_rows = len(rows)
            continue
        row = cells(line)
        if rows and not row[0] and (borders != 2 or len(rows) > header_rows):  # continuation line
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], row)]
        else:
            rows.append(row)
    header = [" ".join(c for c in col if c) for col in zip(*rows[:header_rows])] if header_rows else [""] * len(spans)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(spans)]
    out += ["| " + " | ".join(r) + " |" for r in rows[header_rows:]]
    return out


def _rst_blocks(text: str) -> str:
    """Simple tables -> Markdown tables; a trailing ``::`` -> ``:``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if _TABLE_BORDER.match(lines[i]):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            if sum(bool(_TABLE_BORDER.match(b)) for b in block) == 3 and _TABLE_BORDER.match(block[-1]):
                out.extend(_table_to_markdown(block))
            else:
                out.extend(block)
            continue
        out.append(_LITERAL_MARKER.sub(":", lines[i]))
        i += 1
    return "\n".join(out)


def _blank_line_above_sections(text: str) -> str:
    """Insert a blank line above a section title that follows a non-blank line and precedes an indented one."""
    lines = text.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        if (_SECTION_TITLE.match(line) and out and out[-1].strip() and i + 1 < len(lines)
                and _indent(lines[i + 1]) > _indent(line)):
            out.append("")
        out.append(line)
    return "\n".join(out)


class DocstringConventions(griffe.Extension):
    """Apply the rewrites above to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _rst_blocks(obj.docstring.value)
            text = _blank_line_above_sections(_ROLE.sub(_role, text))
            obj.docstring.value = _split_multi_name_params(text)
