"""Where output goes: a command's view through the formatter of ``--format`` (``table``,
coloured when stdout is a TTY; ``plain``; ``json``) to stdout; errors to stderr; messages
(connect, timing...) to stdout in the interactive shell, else to stderr.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, ContextManager, TextIO

from rich.console import Console
from rich.text import Text

from . import formatters
from .formatters import FORMATS
from .views import MessageView, StreamView, View

__all__ = ["FORMATS", "Renderer"]


class Renderer:
    def __init__(self, fmt: str = "table", out: TextIO | None = None, err: TextIO | None = None,
                 color: bool | None = None, interactive: bool = False, width: int | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.fmt = fmt
        self.out_file = out or sys.stdout
        self.err_file = err or sys.stderr
        self.interactive = interactive
        color = self.out_file.isatty() if color is None else color
        self.out = Console(file=self.out_file, force_terminal=color, no_color=not color,
                           highlight=False, soft_wrap=False, width=width,
                           color_system="auto" if color else None)
        ecolor = color and self.err_file.isatty()
        self.err = Console(file=self.err_file, force_terminal=ecolor, no_color=not ecolor,
                           highlight=False, color_system="auto" if ecolor else None, width=width)

    def render(self, view: View) -> None:
        if isinstance(view, StreamView):
            for item in view.items:  # each one as it comes
                self.render(item)
        elif isinstance(view, MessageView):
            self.info(view.message, view.style)
        elif self.fmt == "table":
            for renderable in formatters.table(view):
                self.out.print(renderable)
        else:
            lines = formatters.plain(view) if self.fmt == "plain" else formatters.json_lines(view)
            for line in lines:
                self.out_file.write(line + "\n")
        self.flush()

    def flush(self) -> None:
        for f in (self.out_file, self.err_file):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass

    def error(self, message: str) -> None:
        if self.err.is_terminal:
            self.err.print(Text("error: ", style="bold red") + Text(message))
        else:
            self.err_file.write(f"error: {message}\n")
        self.flush()

    def info(self, message: str, style: str = "cyan") -> None:
        """Information (connect, timing...): stdout when interactive, else stderr."""
        if self.interactive:
            self.out.print(Text(message, style=style))
        else:
            self.err_file.write(message + "\n")

    def progress(self, label: str, unit: str) -> ContextManager[Callable[[int, int | None], None] | None]:
        """A progress callback ``(done, total)`` for a long run (export, import): a rich
        progress bar when stdout is a terminal, else None (nothing is shown)."""
        if not self.out_file.isatty():
            return contextlib.nullcontext(None)
        return ProgressBar(self.out, label, unit)

    def timing(self, seconds: float, peer: str = "") -> None:
        msg = f"({seconds * 1000:.1f} ms" + (f" via {peer})" if peer else ")")
        if self.interactive:
            self.out.print(Text(msg, style="dim"))
        else:
            self.err_file.write(msg + "\n")


class ProgressBar:
    """A rich progress bar that shows up only once a run has lasted ``delay`` s (short runs
    print nothing but their result) and is removed when the run ends.  Call it with
    ``(done, total)``; ``total`` None: not known (a count and a pulsing bar)."""

    def __init__(self, console: Console, label: str, unit: str, delay: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.label = label
        self.unit = unit
        self.delay = delay
        self._clock = clock
        self._started = clock()
        self._bar = None
        self._task = None

    def __enter__(self) -> "ProgressBar":
        self._started = self._clock()
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            if self._clock() - self._started < self.delay:
                return
            from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)
            self._bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                                 BarColumn(), TextColumn("{task.fields[count]}"),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._task = self._bar.add_task(self.label, total=total, count="")
            self._bar.start()
        count = f"{done:,}/{total:,} {self.unit}" if total else f"{done:,} {self.unit}"
        self._bar.update(self._task, completed=done, total=total, count=count)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
