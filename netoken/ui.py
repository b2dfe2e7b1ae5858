"""Terminal output: rich on a terminal, plain aligned text when piped."""

from __future__ import annotations

import sys
from typing import Any


class Console:
    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.rich = None
        if self.stream.isatty():
            from rich.console import Console as RichConsole

            self.rich = RichConsole(file=self.stream)

    def step(self, msg: str) -> None:
        if self.rich:
            self.rich.print(f"[bold cyan]==>[/] {msg}")
        else:
            print(f"==> {msg}", file=self.stream, flush=True)

    def warn(self, msg: str) -> None:
        if self.rich:
            self.rich.print(f"[bold yellow]warning:[/] {msg}")
        else:
            print(f"warning: {msg}", file=self.stream, flush=True)

    def table(self, title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
        if self.rich:
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for c in columns:
                t.add_column(c)
            for r in rows:
                t.add_row(*(_cell(r.get(c)) for c in columns))
            self.rich.print(t)
            return
        cells = [[_cell(r.get(c)) for c in columns] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        print(title, file=self.stream)
        print(
            "  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=self.stream
        )
        for row in cells:
            print(
                "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=self.stream
            )
        self.stream.flush()


def _cell(v: Any) -> str:
    if v is True:
        return "yes"
    if v is False:
        return "NO"
    return "" if v is None else str(v)
