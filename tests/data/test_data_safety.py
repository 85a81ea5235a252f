"""The data layer under hostile or unlucky conditions: deletes of what mpmae did not write, a full disk,
huge declared shapes and damaged chunks (issue 11)."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpmae.cli import main
from mpmae.data import MMEarthDataset, MMEarthFormatError, synth
from mpmae.data.inspect import inspect_folder
from mpmae.data.shards import write_shards
from mpmae.data.synth import estimate_bytes, format_bytes, write_synthetic_mmearth
from tests.crafted.mmearth import write_corrupt_chunk, write_huge_side

DiskUsage = namedtuple("DiskUsage", "total used free")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# -- synth --overwrite replaces only what synth wrote ---------------------------------------------------


def test_synth_overwrite_keeps_a_folder_of_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The folder the fault test lost: a real-looking data folder, a CSV and a key file, all kept."""
    out = tmp_path / "out"
    (out / "data_1M_v001_64").mkdir(parents=True)
    (out / "data_1M_v001_64" / "data_1M_v001_64.h5").write_bytes(b"real data")
    (out / "data_export_2024.csv").write_text("a,b\n1,2\n")
    (out / "LICENSE_KEYS.txt").write_text("secret")
    before = _tree(out)
    with pytest.raises(FileExistsError, match=r"'LICENSE_KEYS.txt' was not written by mpmae synth"):
        write_synthetic_mmearth(out, 2, overwrite=True)
    assert main(["synth", str(out), "--tiles", "2", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpmae synth: error: refusing to overwrite {out}: 'LICENSE_KEYS.txt'")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging leftovers


@pytest.mark.parametrize("plant", ["folder", "link"])
def test_synth_overwrite_refuses_a_folder_or_link_under_its_own_name(tmp_path: Path, plant: str) -> None:
    out = write_synthetic_mmearth(tmp_path / "out", 2)
    target = tmp_path / "precious.h5"
    target.write_bytes(b"keep")
    planted = out / "data_synth_v001_128.h5"
    if plant == "folder":
        planted.mkdir()
        (planted / "inside.txt").write_text("keep")
    else:
        planted.symlink_to(target)
    before = _tree(out)
    with pytest.raises(FileExistsError, match=r"'data_synth_v001_128.h5' was not written by mpmae synth"):
        write_synthetic_mmearth(out, 2, seed=1, overwrite=True)
    assert _tree(out) == before and target.read_bytes() == b"keep"


def test_synth_overwrite_replaces_its_own_files_of_another_size(tmp_path: Path) -> None:
    out = write_synthetic_mmearth(tmp_path / "out", 2, size=64)
    write_synthetic_mmearth(out, 2, size=128, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(synth.file_names(128))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_synth_keeps_the_old_folder_when_a_foreign_file_appears_while_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target is checked again before the finished folder replaces it."""
    out = write_synthetic_mmearth(tmp_path / "out", 2)
    write_folder = synth._write_folder

    def write_then_plant(folder: Path, *args: object) -> None:
        write_folder(folder, *args)
        (out / "notes.txt").write_text("written meanwhile")

    monkeypatch.setattr(synth, "_write_folder", write_then_plant)
    with pytest.raises(FileExistsError, match="'notes.txt' was not written by mpmae synth"):
        write_synthetic_mmearth(out, 2, seed=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "written meanwhile" and len(list(out.iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- synth checks the free space first ------------------------------------------------------------------


def test_synth_refuses_when_the_disk_cannot_hold_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    needed = estimate_bytes(3, 64)
    free = needed // 2
    seen: list[Path] = []

    def small_disk(path: str | os.PathLike[str]) -> DiskUsage:
        seen.append(Path(path))
        return DiskUsage(10 * needed, 10 * needed - free, free)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    out = tmp_path / "new" / "out"
    message = f"need about {format_bytes(needed)}, {format_bytes(free)} free on {tmp_path}"
    with pytest.raises(ValueError, match=message):
        write_synthetic_mmearth(out, 3)
    assert seen == [tmp_path]  # the nearest existing folder: where the staged folder would go
    assert main(["synth", str(out), "--tiles", "3"]) == 2
    assert capsys.readouterr().err == f"mpmae synth: error: {out}: 3 synthetic tiles of 64 px {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_space_estimate_bounds_what_synth_writes(tmp_path: Path) -> None:
    """The estimate is above the real size, but not wildly (it would refuse disks that could hold it)."""
    out = write_synthetic_mmearth(tmp_path / "out", 64)
    written = sum(p.stat().st_size for p in out.iterdir())
    assert written < estimate_bytes(64, 64) < 1.6 * written
    assert format_bytes(13_207_024_435) == "12.3 GiB" and format_bytes(512) == "512.0 B"


# -- shard --overwrite replaces only mpmae's shards -----------------------------------------------------


def test_shard_overwrite_keeps_a_foreign_parquet_file_under_a_shard_name(mmearth10: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Hugging Face datasets name their files the same way: such a folder must not lose them."""
    foreign = tmp_path / "train-00000-of-00002.parquet"
    pq.write_table(pa.table({"text": ["not mpmae"]}), foreign)
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"refusing to replace .*train-00000-of-00002\.parquet: it carries "
                                              r"no mpmae shard metadata"):
        write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=4, overwrite=True, progress=False)
    assert main(["shard", str(mmearth10), str(tmp_path), "--tiles-per-shard", "4", "--overwrite"]) == 2
    assert "train-00000-of-00002.parquet" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_shard_overwrite_keeps_a_shard_of_another_split_renamed(mmearth10: Path, tmp_path: Path) -> None:
    """mpmae metadata alone is not enough: it must be that of the split being replaced."""
    source = tmp_path / "other"
    (path,) = write_shards(mmearth10, source, "parquet", progress=False)
    metadata = json.loads(pq.read_schema(path).metadata[b"mpmae"])
    metadata["split"] = "val"
    table = pq.read_table(path)
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table.replace_schema_metadata({b"mpmae": json.dumps(metadata)}), out / path.name)
    with pytest.raises(FileExistsError, match="not that of split 'train'"):
        write_shards(mmearth10, out, "parquet", overwrite=True, progress=False)


@pytest.mark.parametrize("planted", ["train-00000-of-00001.beton", "train-ffcv.json"])
def test_shard_overwrite_keeps_foreign_ffcv_files(planted: str, mmearth10: Path, tmp_path: Path) -> None:
    (tmp_path / planted).write_bytes(b"someone else's \x00\x01 bytes" * 100)
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=f"refusing to replace {tmp_path / planted}"):
        write_shards(mmearth10, tmp_path, "ffcv", tiles_per_shard=5, overwrite=True, progress=False)
    assert _tree(tmp_path) == before


# -- bounded reads ---------------------------------------------------------------------------------------


def test_huge_declared_image_side_is_refused_before_reading(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_huge_side(tmp_path / "huge", side=200_000)
    assert (folder / "data_synth_v001_64.h5").stat().st_size < 2 << 20  # declared, not stored
    message = r"data_synth_v001_64\.h5: dataset '\w+' declares image size \(200000, 200000\); at most 1024 px"
    with pytest.raises(MMEarthFormatError, match=message):
        MMEarthDataset(folder)
    assert main(["inspect", str(folder)]) == 2
    assert "declares image size (200000, 200000)" in capsys.readouterr().err


# -- a damaged chunk -------------------------------------------------------------------------------------


def test_damaged_chunk_names_file_dataset_and_row(tmp_path: Path) -> None:
    damage = write_corrupt_chunk(tmp_path / "corrupt")
    dataset = MMEarthDataset(damage.folder, modalities=["sentinel2", "sentinel1"])
    expected = f"{damage.h5}: dataset 'sentinel2', row {damage.row}: cannot be read (corrupt file"
    for read in (lambda: dataset.read_batch([damage.position]), lambda: dataset[damage.position]):
        with pytest.raises(MMEarthFormatError) as caught:
            read()
        assert str(caught.value).startswith(expected)
    assert isinstance(caught.value, ValueError)  # Ray's retry policy tells it apart from I/O faults
    neighbours = dataset.read_batch([damage.position - 1, damage.position + 1])
    assert np.isfinite(neighbours["sentinel1"]).any()  # only the damaged tile fails


def test_inspect_of_a_damaged_chunk_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damage = write_corrupt_chunk(tmp_path / "corrupt")
    with pytest.raises(MMEarthFormatError, match=r"dataset 'sentinel2', rows \d+\.\.\d+: cannot be read"):
        inspect_folder(damage.folder)
    assert main(["inspect", str(damage.folder)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"mpmae inspect: error: {damage.h5}: dataset 'sentinel2', rows ")
