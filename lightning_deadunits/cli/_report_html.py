"""One self-contained HTML page for ``deadunits report --html``: inline style, figures as base64 PNG, no script."""

import base64
import html
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["HtmlRun", "HtmlSection", "render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; } caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
figure { margin: 0.5em 0 1.5em; } img { max-width: 100%; border: 1px solid #eee; }
.none { color: #777; font-style: italic; } .scroll { overflow-x: auto; }
"""


class HtmlSection(NamedTuple):
    """One heading of a run: its figures (``(caption, PNG bytes)``) and tables (``(title, columns, rows)``)."""

    heading: str
    figures: list[tuple[str, bytes]]
    tables: list[tuple[str, list[str], list[list[str]]]]


class HtmlRun(NamedTuple):
    """One run: its name, where its files are, a one-line summary and its sections."""

    name: str
    path: str
    summary: str
    sections: list[HtmlSection]


def render_html(title: str, runs: Sequence[HtmlRun]) -> str:
    """The page: a title, then per run its sections; every text escaped, every image a ``data:`` URI.

    Args:
        title: the page's title and first heading.
        runs: the runs, in order.

    Returns:
        The HTML text.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
    ]
    for run in runs:
        parts += [f"<h2>run {_text(run.name)}</h2>", f"<p>{_text(run.path)}<br>{_text(run.summary)}</p>"]
        for section in run.sections:
            parts.append(f"<h3>{_text(section.heading)}</h3>")
            for caption, png in section.figures:
                data = base64.b64encode(png).decode("ascii")
                parts.append(
                    f'<figure><img alt="{_text(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_text(caption)}</figcaption></figure>"
                )
            for table in section.tables:
                parts.append(_table(*table))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return f'<p class="none">{_text(title)}: none</p>'
    header = "".join(f"<th>{_text(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><caption>{_text(title)}</caption><tr>{header}</tr>{body}</table></div>'


def _text(value: str) -> str:
    return html.escape(value, quote=True)
