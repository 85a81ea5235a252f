"""Results as people read them (a plain-text table) and as programs do (a JSON file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpmae.atomic import atomic_write_json


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` for the terminal."""
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_results(path: Path, content: Any) -> None:
    """Results JSON (numpy and tensor scalars as floats), written atomically into a created folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, content, default=float)
