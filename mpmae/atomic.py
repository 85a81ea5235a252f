"""Files that appear whole or not at all: written under ``<name>.tmp``, renamed when complete.

A crash, a failed shard or an interrupted run never leaves a half-written checkpoint, shard, table or
picture where a reader (or a resumed run) would take it for a finished one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write`` on a temporary path next to ``path``, then rename; on failure remove the partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Text, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, content: Any, **dumps_kwargs: Any) -> Path:
    """Indented JSON, atomically; ``dumps_kwargs`` go to :func:`json.dumps`."""
    return atomic_write_text(path, json.dumps(content, indent=2, **dumps_kwargs))
