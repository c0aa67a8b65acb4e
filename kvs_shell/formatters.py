"""Three formatters, each a function from any view (``views.py``) to output:

- :func:`table`: rich renderables, for people at a terminal;
- :func:`plain`: lines of TAB-separated fields, no header; backslash, TAB, CR and newline
  inside a field are written ``\\\\`` ``\\t`` ``\\r`` ``\\n``, so a record is one line;
- :func:`json_lines`: one JSON object per line (JSON Lines).

They know the kinds of view, never the commands.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from .views import Cell, StackView, StreamView, TableView, TextView, View, fields

FORMATS = ("table", "plain", "json")
TABLE_ROWS = 1000  # rows shown in a table before "… N more"

_FRAMES: dict[str, dict[str, Any]] = {
    "box": {},
    "bare": {"box": None, "show_edge": False, "pad_edge": False},
    "rules": {"box": box.SIMPLE_HEAD, "pad_edge": False, "collapse_padding": True},
}


def table(view: View) -> Iterator[RenderableType]:
    if isinstance(view, (StackView, StreamView)):
        for part in _parts(view):
            yield from table(part)
    elif isinstance(view, TableView):
        yield rich_table(view)
        caption = table_caption(view)
        if caption:  # not rich's caption: that one wraps at the table's width
            yield caption
    elif isinstance(view, TextView) and view.text is not None:
        yield view.text


def plain(view: View) -> Iterator[str]:
    if isinstance(view, (StackView, StreamView)):
        for part in _parts(view):
            yield from plain(part)
    elif isinstance(view, TableView):
        lines = view.lines if view.lines is not None else (
            [_value(c) for c in row] for row in view.rows)
        for line in lines:
            yield fields(*line)
    elif isinstance(view, TextView):
        yield from view.plain


def json_lines(view: View) -> Iterator[str]:
    for record in records(view):
        yield json.dumps(record, ensure_ascii=False)


def records(view: View) -> Iterator[dict]:
    """The view's JSON objects: ``records`` when given, else a table's rows as objects
    (by column name) or the records of a stack's or stream's parts."""
    if view.records is not None:
        yield from view.records
    elif isinstance(view, TableView):
        for row in view.rows:
            yield {c.name: _value(x) for c, x in zip(view.columns, row)}
    elif isinstance(view, (StackView, StreamView)):
        for part in _parts(view):
            yield from records(part)


def _parts(view: StackView | StreamView) -> Iterable[View]:
    return view.parts if isinstance(view, StackView) else view.items


def rich_table(view: TableView) -> Table:
    """The table itself, its first TABLE_ROWS rows (the caption says how many more)."""
    t = Table(title=Text(view.title, style="table.title") if view.title else None,
              title_justify="left", show_header=view.header, header_style="bold",
              **_FRAMES[view.frame])
    for c in view.columns:
        t.add_column(c.name, justify=c.justify, style=c.style or None, no_wrap=c.no_wrap,
                     min_width=c.min_width)
    for row in view.rows[:TABLE_ROWS]:
        t.add_row(*(_table_cell(c) for c in row))
    return t


def table_caption(view: TableView) -> Text:
    notes = [Text(view.caption) if isinstance(view.caption, str) else view.caption]
    more = len(view.rows) - TABLE_ROWS
    if more > 0:
        notes.append(Text(f"… {more} more {view.noun}s not shown (use --format plain or json)"))
    return Text("\n", style="table.caption").join(n for n in notes if n)


def _table_cell(cell: Cell) -> Text:
    if isinstance(cell, Text):
        return cell
    return Text("" if cell is None else str(cell))  # never markup: keys are user data


def _value(cell: Cell) -> Any:
    """A cell outside table mode: its text without the styles."""
    return cell.plain if isinstance(cell, Text) else cell
