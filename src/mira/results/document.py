"""One document model for every table, report and summary mira writes, and its two renderings.

A document is a list of blocks (:class:`Heading`, :class:`Paragraph`, :class:`Code`,
:class:`Table`, :class:`Figure`). :func:`render_markdown` gives ``report.md`` and
``comparison.md``; :func:`render_html` gives ``report.html``, one self-contained file: real
tables, the plots embedded as PNG data URIs, and its own style sheet. Both renderings read the
same blocks, so the tables of ``comparison.md`` and of the report cannot drift apart.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------ cells
def fmt(value: Any) -> str:
    """One number on its own: 4 significant digits (trailing zeros kept), no exponent for
    large numbers; '-' for missing. Numbers that are read together (a column, a panel) take
    one :func:`number_format` instead."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    rounded = float(f"{value:.4g}")
    if abs(rounded) >= 1e3:
        return f"{rounded:.0f}"  # '1037', not '1037.'
    return f"{rounded:#.4g}"


def fmt_pm(mean: Any, std: Any) -> str:
    """'mean ± std' (std over seeds), or the mean alone when there is one seed."""
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


SPREAD_DIGITS = 1
"""Significant digits the spread of a quantity's values always gets (its leading digit
shows, so the largest and the smallest value never print alike)."""
MAX_EXTRA_DIGITS = 2
"""How many digits past the magnitude's the spread may ask for (values that differ by
rounding noise do not get a dozen decimals)."""


def _leading(value: float) -> int:
    """The power of ten of a positive number's leading digit: 0.0123 -> -2, 45.6 -> 1
    (0.5934 - 0.5933, 9.99...e-05 in floating point, counts as 1e-04)."""
    return math.floor(math.log10(value) + 1e-9)


def decimals_for(values: Iterable[Any], digits: int = 4) -> int:
    """Decimals that show every value of one quantity alike: ``digits`` significant digits
    of the largest magnitude, more where the values lie closer together than that shows
    (``SPREAD_DIGITS`` significant digits of their spread, at most ``MAX_EXTRA_DIGITS``
    more). Missing, non-finite and text values are ignored; 0 when none is left, or all
    are 0."""
    finite = [
        float(v)
        for v in values
        if v is not None and not isinstance(v, str) and math.isfinite(float(v))
    ]
    magnitude = max((abs(v) for v in finite), default=0.0)
    if magnitude == 0.0:
        return 0
    decimals = max(0, digits - 1 - _leading(magnitude))
    spread = max(finite) - min(finite)
    if spread > 1e-9 * magnitude:
        by_spread = SPREAD_DIGITS - 1 - _leading(spread)
        decimals = max(decimals, min(by_spread, decimals + MAX_EXTRA_DIGITS))
    return decimals


@dataclass(frozen=True)
class NumberFormat:
    """One fixed-decimals format for every value of one quantity (a column, a table of one
    quantity, the dots of one panel), so that no cell reads 0.000 beside 0.5000 or
    -2.007e-05: :func:`number_format` picks the decimals from all the values."""

    decimals: int

    def __call__(self, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        value = float(value)
        if not math.isfinite(value):
            return fmt(value)
        text = f"{value:.{self.decimals}f}"
        # -0.0000 is a value that rounds to zero: no sign.
        return text[1:] if text.startswith("-") and float(text) == 0.0 else text

    def pm(self, mean: Any, std: Any) -> str:
        """'mean ± std' in this format, or the mean alone without a std (one seed)."""
        return self(mean) if std is None else f"{self(mean)} ± {self(std)}"


def number_format(values: Iterable[Any], digits: int = 4) -> NumberFormat:
    """The :class:`NumberFormat` of one quantity whose values are ``values``
    (:func:`decimals_for`)."""
    return NumberFormat(decimals_for(values, digits))


# ------------------------------------------------------------------------------ blocks
@dataclass(frozen=True)
class Table:
    """A titled table of already formatted cells; columns from ``numeric_from`` on are
    right-aligned."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    numeric_from: int = 1


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text; `backticks` mark code in both renderings."""

    text: str


@dataclass(frozen=True)
class Code:
    """Lines shown verbatim (command lines)."""

    lines: tuple[str, ...]


@dataclass(frozen=True)
class Figure:
    """A PNG: ``file`` is read to embed it in HTML, ``href`` (relative to the document) is
    where markdown links to it."""

    file: Path
    href: str
    caption: str


Block = Heading | Paragraph | Code | Table | Figure


# ------------------------------------------------------------------------------ markdown
def markdown_table(table: Table) -> str:
    """A GitHub markdown table padded so that it is aligned as plain text too."""
    widths = [
        max([3, len(table.header[i]), *(len(r[i]) for r in table.rows)])
        for i in range(len(table.header))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i >= table.numeric_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (w - 1) + ":" if i >= table.numeric_from else "-" * w for i, w in enumerate(widths)
    ]
    return "\n".join([line(table.header), "| " + " | ".join(rule) + " |", *map(line, table.rows)])


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown; every table is a level-2 section, figures link to their PNG files."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Code):
            parts.append("\n".join(f"    {line}" for line in block.lines))
        elif isinstance(block, Table):
            parts += [f"## {block.title}", markdown_table(block)]
            if block.note:
                parts.append(block.note)
        else:
            parts.append(f"![{block.caption}]({block.href})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ html
STYLE = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --link: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
main { max-width: 88rem; margin: 0 auto; padding: 2rem 1.5rem 4rem; }
h1 { font-size: 1.75rem; margin: 0 0 0.8rem; }
h2 { font-size: 1.2rem; margin: 2.4rem 0 0.7rem; padding-bottom: 0.3rem;
     border-bottom: 1px solid var(--line); }
p { margin: 0.5rem 0; max-width: 62rem; }
a { color: var(--link); }
code { font: 0.88em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: var(--soft); padding: 0.05em 0.25em; border-radius: 4px; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
      padding: 0.7rem 1rem; overflow-x: auto; }
pre code { background: none; padding: 0; }
nav.contents { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
               padding: 0.6rem 1rem; margin: 1.2rem 0; font-size: 0.92rem; }
nav.contents ol { margin: 0.3rem 0 0; padding-left: 1.4rem; columns: 2; column-gap: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.3rem 0 0.5rem; }
th, td { border: 1px solid var(--line); padding: 0.3rem 0.7rem; white-space: nowrap; }
th { background: var(--soft); font-weight: 600; text-align: left; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef4ff; }
p.note { color: var(--muted); font-size: 0.88rem; }
figure { margin: 1.2rem 0 2.4rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 6px; }
figcaption { color: var(--muted); font-size: 0.9rem; margin-top: 0.45rem; max-width: 62rem; }
"""

_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    return _CODE.sub(r"<code>\1</code>", html.escape(text))


def _anchor(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "section"
    anchor, n = base, 2
    while anchor in used:
        anchor, n = f"{base}-{n}", n + 1
    used.add(anchor)
    return anchor


def html_table(table: Table) -> str:
    """The ``<table>`` of one table (numeric columns right-aligned)."""

    def cell(tag: str, index: int, text: str) -> str:
        numeric = ' class="num"' if index >= table.numeric_from else ""
        return f"<{tag}{numeric}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(table.header))
    body = "\n".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: a contents list of the sections, real tables, and every
    figure embedded as a data URI (the page needs no other file)."""
    used: set[str] = set()
    sections: list[tuple[str, str]] = []
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = _anchor(block.text, used)
            if block.level == 2:
                sections.append((anchor, block.text))
            parts.append(
                f'<h{block.level} id="{anchor}">{html.escape(block.text)}</h{block.level}>'
            )
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Code):
            parts.append("<pre><code>" + html.escape("\n".join(block.lines)) + "</code></pre>")
        elif isinstance(block, Table):
            anchor = _anchor(block.title, used)
            sections.append((anchor, block.title))
            note = f'\n<p class="note">{_inline(block.note)}</p>' if block.note else ""
            parts.append(
                f'<section>\n<h2 id="{anchor}">{html.escape(block.title)}</h2>\n'
                f'<div class="scroll">\n{html_table(block)}\n</div>{note}\n</section>'
            )
        else:
            caption = html.escape(block.caption)
            parts.append(
                f'<figure>\n<img src="{_data_uri(block.file)}" alt="{caption}">\n'
                f"<figcaption>{caption}</figcaption>\n</figure>"
            )
    contents = ""
    if len(sections) > 2:
        items = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in sections)
        contents = f'<nav class="contents"><strong>Contents</strong><ol>{items}</ol></nav>\n'
    # The contents go after the opening heading and paragraphs, before the first section.
    first = next(
        (i for i, b in enumerate(blocks) if isinstance(b, Table | Figure) or _h2(b)),
        len(blocks),
    )
    body = "\n".join([*parts[:first], contents, *parts[first:]])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )


def _h2(block: Block) -> bool:
    return isinstance(block, Heading) and block.level == 2
