"""Files that appear whole or not at all: written under a fresh hidden temporary name, renamed when complete.

A crash, a failed shard or an interrupted run never leaves a half-written checkpoint, shard, table or
picture where a reader (or a resumed run) would take it for a finished one. The temporary file is created
by :func:`tempfile.mkstemp` (exclusive, unpredictable name) in the target's folder, so a link planted
under a guessable name in a shared folder is never followed, and the rename stays on one filesystem.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write`` on a new temporary path next to ``path``, then rename; on failure remove the partial file.

    The final file gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask),
    not mkstemp's owner-only 0o600.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask. Reading it means setting it: the stand-in is strict, so a file another thread
    creates meanwhile is never more open than intended."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    """Text, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, content: Any, **dumps_kwargs: Any) -> Path:
    """Indented JSON, atomically; ``dumps_kwargs`` go to :func:`json.dumps`."""
    return atomic_write_text(path, json.dumps(content, indent=2, **dumps_kwargs))
