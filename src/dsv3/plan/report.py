"""Render plan results: rich tables for people, JSON for machines. Each section is (title, rows)."""
from __future__ import annotations

import json
import sys
from typing import Any

Section = tuple[str, list[tuple[str, Any]]]


def fmt(v: Any) -> str:
    """Human form of one value: thousands separators for ints, 4 significant decimals for floats."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def emit(sections: list[Section], as_json: bool, out=None) -> None:
    """Print sections as rich tables, or one JSON object {title: {row: value}}."""
    out = out or sys.stdout
    if as_json:
        obj = {title: {k: v for k, v in rows} for title, rows in sections}
        out.write(json.dumps(obj, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=120)
    for title, rows in sections:
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("quantity")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, fmt(v))
        console.print(table)
