"""The atomic writer: fresh unpredictable temporary files, no link followed, usual permissions, no leftovers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mpmae.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_a_link_planted_at_the_old_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shared"
    out.mkdir()
    (out / "rows.json.tmp").symlink_to(victim)
    atomic_write_json(out / "rows.json", [1, 2])
    assert victim.read_text() == "precious"
    assert (out / "rows.json").read_text() == "[\n  1,\n  2\n]" and not (out / "rows.json").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["rows.json", "rows.json.tmp"]  # the planted link untouched


def test_the_temporary_file_is_new_hidden_and_beside_the_target(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_size == 0
        tmp.write_bytes(b"x")

    atomic_write(tmp_path / "a.bin", write)
    atomic_write(tmp_path / "a.bin", write)
    assert all(t.parent == tmp_path and t.name.startswith(".a.bin.") and t.name.endswith(".tmp") for t in seen)
    assert seen[0] != seen[1]
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_final_file_has_the_usual_permissions(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "t.txt", "hi")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        assert os.umask(umask) == umask  # the writer put the umask back
    finally:
        os.umask(previous)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "t.txt", "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
