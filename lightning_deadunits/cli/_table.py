"""Terminal tables for the ``deadunits`` commands, fitted to the terminal without ever breaking a cell across lines."""

import shutil
import textwrap
from collections.abc import Sequence

from lightning_deadunits.panels.render import shorten

__all__ = ["print_table"]

_SHORTEST_NAME = 24  # characters a shortened name keeps (its start and end around "…")
_SHORTENED_NOTE = "Names shortened in the middle (…) to fit the terminal; `--json` has them in full."


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    footer: str | None = None,
    width: int | None = None,
) -> None:
    """Print a table to stdout (with ``rich`` when it is installed, as aligned plain text otherwise).

    The first column holds names (layers, series). No cell is ever broken across lines: when the table is wider
    than the terminal, names are first shortened in the middle (to no fewer than 24 characters, with a note under
    the table), then the other columns are folded into several tables, each repeating the names. When stdout is no
    terminal and ``COLUMNS`` is unset, nothing is shortened or folded. Columns whose filled cells are all numbers
    are right-aligned.

    Args:
        title: printed above the table (it may wrap; cells do not).
        columns: the header, names column first.
        rows: the cells, one list per row, as long as ``columns``.
        footer: printed under the table.
        width: the width to fit (default: the terminal's).

    Raises:
        ValueError: if a row's length differs from ``columns``'s.

    Example:
        >>> print_table("dead filters", ["layer", "dead"], [["backbone.layer4.1.conv2", "3"]], width=80)
        dead filters
        layer                    dead
        backbone.layer4.1.conv2     3
    """
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"every row of `rows` must have {len(columns)} cells like `columns`, got {list(row)!r}.")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        use_rich = False
    else:
        use_rich = True
    # rich draws "│ a │ b │": 3 characters per column and 1; plain text puts 2 spaces between columns.
    per_column, frame = (3, 1) if use_rich else (2, -2)
    limit = width if width is not None else shutil.get_terminal_size((0, 0)).columns
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=True)]
    name_width = widths[0]
    beside_names = sum(widths[1:]) + per_column * len(widths) + frame
    if limit and name_width + beside_names > limit:
        # Names are shortened as far as one table needs, down to a length that still tells them apart, then folded.
        name_width = max(min(name_width, _SHORTEST_NAME), limit - beside_names)
    parts = _fold([name_width, *widths[1:]], per_column, frame, limit)
    shortened = name_width < widths[0]
    notes = "\n".join(note for note in (footer, _SHORTENED_NOTE if shortened else None) if note) or None
    numeric = [all(_is_number(cell) for cell in column if cell) for column in zip(*rows, strict=True)] or [False]
    for number, part in enumerate(parts):
        indices = [0, *part]
        part_title = title if len(parts) == 1 else f"{title} (columns part {number + 1} of {len(parts)})"
        part_rows = [[shorten(row[0], name_width), *(row[index] for index in part)] for row in rows]
        part_columns = [columns[index] for index in indices]
        part_numeric = [numeric[index] if index < len(numeric) else False for index in indices]
        part_notes = notes if number == len(parts) - 1 else None
        if not use_rich:
            _print_plain(part_title, part_columns, part_rows, part_numeric, part_notes, limit)
            continue
        table = Table(title=part_title, caption=part_notes, title_justify="left", caption_justify="left")
        for column, right in zip(part_columns, part_numeric, strict=True):
            table.add_column(column, justify="right" if right else "left", no_wrap=True)
        for row in part_rows:
            table.add_row(*row)
        part_widths = [max(len(cell) for cell in column) for column in zip(part_columns, *part_rows, strict=True)]
        Console(width=sum(part_widths) + per_column * len(part_widths) + frame).print(table)


def _fold(widths: list[int], per_column: int, frame: int, limit: int) -> list[list[int]]:
    """The indices of the columns after the first, in groups that fit in ``limit`` beside it (one group if no limit).

    A column too wide to fit even alone gets a group of its own.
    """
    groups: list[list[int]] = [[]]
    used = frame + per_column + widths[0]
    for index in range(1, len(widths)):
        need = per_column + widths[index]
        if limit and groups[-1] and used + need > limit:
            groups.append([])
            used = frame + per_column + widths[0]
        groups[-1].append(index)
        used += need
    return groups


def _print_plain(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    numeric: Sequence[bool],
    footer: str | None,
    limit: int,
) -> None:
    """Aligned columns two spaces apart; the title and footer wrap between words at ``limit`` (0: never)."""
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=True)]
    print(_wrap(title, limit))
    for line in (columns, *rows):
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, numeric, strict=True)
        ]
        print("  ".join(cells).rstrip())
    if footer:
        print(_wrap(footer, limit))


def _wrap(text: str, limit: int) -> str:
    return "\n".join(textwrap.fill(line, limit) if limit else line for line in text.splitlines())


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
