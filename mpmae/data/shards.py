"""Parquet and FFCV shards of an MMEarth split, for multi-node training (`mpmae shard`).

Shards hold the *preprocessed* items (what :class:`~mpmae.data.mmearth.MMEarthDataset` returns), so a
reader only decodes. Shard ``k`` of ``n`` is named ``{split}-{k:05d}-of-{n:05d}.{parquet|beton}``; the
``-of-`` count lets a reader notice an incomplete or mixed set.

Parquet: one column per modality with Arrow's canonical ``arrow.fixed_shape_tensor`` extension type
(storage: a fixed-size list of the flattened values, so any Arrow reader can decode it; the shape and
dtype travel in the schema), plus a string column ``id``. The file's key-value metadata ``mpmae`` holds the
selection (modality -> bands), the registry entries used, the image size and the band statistics.
Rows are written one row group per read block, so memory is bounded by a block.

FFCV: one ``NDArrayField`` per modality (FFCV needs fixed shapes) plus ``id`` as zero-padded UTF-8 bytes.
FFCV stores field names in 16 bytes, so long modality names are truncated on disk and mapped back by
prefix (:func:`ffcv_field_modality`). FFCV's writer works from an indexable object in a forked process,
so each shard is first read into memory (memory bounded by one shard) and a failure surfaces in this
process instead of hanging FFCV's writer. The selection, band statistics and row count go to a
sidecar ``{split}-ffcv.json``, written last.

Every shard is written under a fresh hidden temporary name and renamed when complete; a failed shard leaves no file.
Overwriting replaces or removes only files mpmae wrote: Parquet shards carrying the ``mpmae`` metadata of
the same split, FFCV shards whose fields are all registry modalities plus ``id``, and the split's own
sidecar. Anything else under a shard's name refuses, naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mpmae.atomic import atomic_write, atomic_write_text
from mpmae.data.mmearth import Batch, MMEarthDataset
from mpmae.modalities import MODALITIES, Modality, ModalitySpec, Selection, get_modality

ShardFormat = Literal["parquet", "ffcv"]
EXTENSIONS: dict[str, str] = {"parquet": "parquet", "ffcv": "beton"}
METADATA_KEY = b"mpmae"
FORMAT_VERSION = 1
#: Tiles read (and, for Parquet, written as one row group) per h5 call: ~30 MB of 64 px all_mod tiles.
BLOCK_ROWS = 64
DEFAULT_TILES_PER_SHARD = 512
#: LZ4 decodes several times faster than snappy or zstd here at about the same size (label maps shrink,
#: float noise does not), and decoding is what a Parquet-fed training run pays per step.
PARQUET_COMPRESSION = "lz4"
#: FFCV's default page (8 MiB); larger when one item does not fit.
FFCV_PAGE_BYTES = 8 << 20
#: FFCV's on-disk field name length.
FFCV_NAME_BYTES = 16

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.(?P<ext>parquet|beton)$")


class ShardError(ValueError):
    """A shard set is missing, incomplete, mixed or not written by this module."""


# -- item layout ------------------------------------------------------------------------------------


def item_spec(selection: Selection, image_size: int | None) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Per modality, the dtype and per-item shape that :class:`MMEarthDataset` delivers."""
    spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for name, bands in selection.items():
        modality = get_modality(name)
        dtype = np.dtype(np.int64 if modality.is_label else np.float32)
        if modality.level == "pixel":
            if image_size is None:
                raise ValueError(f"pixel modality {name!r} needs an image size")
            spec[name] = (dtype, (len(bands), image_size, image_size))
        else:
            spec[name] = (dtype, (len(bands),))
    return spec


def arrow_schema(selection: Selection, image_size: int | None, metadata: Mapping[str, Any]) -> pa.Schema:
    """One fixed-shape tensor column per modality plus ``id``; ``metadata`` goes to the file metadata."""
    fields = [
        pa.field(
            name,
            pa.fixed_shape_tensor(pa.from_numpy_dtype(dtype), shape),
            nullable=False,
            metadata={b"bands": json.dumps(list(selection[name]))},
        )
        for name, (dtype, shape) in item_spec(selection, image_size).items()
    ]
    fields.append(pa.field("id", pa.string(), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata)})


def batch_to_table(batch: Batch, schema: pa.Schema) -> pa.Table:
    """A stacked batch as an Arrow table of ``schema`` (zero-copy for contiguous arrays)."""
    columns = []
    for field in schema:
        if field.name == "id":
            columns.append(pa.array(batch["id"], type=pa.string()))
            continue
        values = np.ascontiguousarray(batch[field.name])
        column = pa.FixedShapeTensorArray.from_numpy_ndarray(values)
        if column.type != field.type:
            raise ValueError(f"modality {field.name!r}: got {column.type}, schema expects {field.type}")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def table_to_batch(table: pa.Table) -> Batch:
    """Decode an Arrow table of shard rows into ``{modality: ndarray (N, ...), "id": list[str]}``."""
    batch: Batch = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "id":
            batch["id"] = column.to_pylist()
        elif isinstance(column.type, pa.FixedShapeTensorType):
            batch[name] = column.combine_chunks().to_numpy_ndarray()
        else:
            raise ShardError(f"column {name!r} has type {column.type}; expected a fixed-shape tensor")
    return batch


# -- metadata ---------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Registry values as strict JSON: tuples as lists, non-finite floats (no-data -inf) as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    return value


def _registry_entry(modality: Modality) -> dict[str, Any]:
    return {key: _json_safe(value) for key, value in dataclasses.asdict(modality).items()}


def shard_metadata(dataset: MMEarthDataset) -> dict[str, Any]:
    """What a shard records about its origin: selection, registry entries, image size, band stats."""
    with open(dataset.files.band_stats) as f:
        band_stats = json.load(f)
    return {
        "format_version": FORMAT_VERSION,
        "split": dataset.split,
        "source": dataset.files.h5.name,
        "image_size": dataset.image_size,
        "selection": {name: list(bands) for name, bands in dataset.selection.items()},
        "registry": {name: _registry_entry(get_modality(name)) for name in dataset.selection},
        "band_stats": band_stats,
    }


def read_shard_metadata(path: Path | str) -> dict[str, Any]:
    """The ``mpmae`` metadata of a Parquet shard (selection, registry entries, band stats, ...)."""
    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise ShardError(f"{path}: no {METADATA_KEY.decode()!r} metadata; not written by mpmae shard")
    return json.loads(metadata[METADATA_KEY])


# -- shard sets -------------------------------------------------------------------------------------


def shard_name(split: str, index: int, count: int, format: ShardFormat) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.{EXTENSIONS[format]}"


def _existing_shards(directory: Path, split: str, format: ShardFormat) -> list[Path]:
    """Every shard of ``split`` and ``format`` in ``directory``, whatever its count (sorted)."""
    ext = EXTENSIONS[format]
    return sorted(
        p for p in directory.glob(f"{split}-*-of-*.{ext}")
        if (m := _SHARD_RE.match(p.name)) and m["split"] == split
    )


def find_shards(source: Path | str | Sequence[Path | str], split: str = "train",
                format: ShardFormat = "parquet") -> list[Path]:
    """The shards of ``split`` in a folder (checked complete: indices 0..n-1 of one count ``n``), or
    the given list of shard paths as is."""
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(p) for p in source]
        if not paths:
            raise ShardError("empty list of shard paths")
        return paths
    directory = Path(source)
    if not directory.is_dir():
        raise ShardError(f"{directory}: not a directory of shards")
    paths = _existing_shards(directory, split, format)
    if not paths:
        raise ShardError(
            f"{directory}: no {format} shards of split {split!r} "
            f"(expected {shard_name(split, 0, 1, format).replace('00001', 'NNNNN')} ...)"
        )
    matches = [_SHARD_RE.match(p.name) for p in paths]
    counts = {int(m["count"]) for m in matches if m}
    indices = sorted(int(m["index"]) for m in matches if m)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        raise ShardError(
            f"{directory}: the {format} shards of split {split!r} are incomplete or mixed "
            f"(counts {sorted(counts)}, {len(indices)} files); rewrite them with overwrite"
        )
    return paths


# -- writing ----------------------------------------------------------------------------------------


def _blocks(positions: range, block_rows: int) -> Iterator[np.ndarray]:
    for start in range(positions.start, positions.stop, block_rows):
        yield np.arange(start, min(start + block_rows, positions.stop))


def _write_parquet(dataset: MMEarthDataset, positions: range, path: Path, schema: pa.Schema,
                   progress: tqdm) -> None:
    """Stream ``positions`` into one Parquet file, one row group per block."""
    with pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION, use_dictionary=False,
                          write_statistics=["id"]) as writer:
        for block in _blocks(positions, BLOCK_ROWS):
            writer.write_table(batch_to_table(dataset.read_batch(block), schema), row_group_size=len(block))
            progress.update(len(block))


def ffcv_field_modality(field_name: str) -> str:
    """The registry name (or ``id``) behind a possibly truncated FFCV field name."""
    names = [n for n in (*MODALITIES, "id") if n[:FFCV_NAME_BYTES] == field_name]
    if len(names) != 1:
        raise ShardError(f"FFCV field {field_name!r} matches no single modality ({names})")
    return names[0]


def _encode_ids(ids: Sequence[str]) -> np.ndarray:
    encoded = [i.encode() for i in ids]
    width = max(len(e) for e in encoded)
    return np.frombuffer(b"".join(e.ljust(width, b"\0") for e in encoded), dtype=np.uint8).reshape(-1, width)


class _ShardItems:
    """A shard held in memory, indexable as FFCV's writer wants: item -> tuple of field values."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        return tuple(a[index] for a in self.arrays)


def _read_shard(dataset: MMEarthDataset, positions: range, progress: tqdm) -> Batch:
    """Read ``positions`` block by block into preallocated arrays (peak: one shard plus one block)."""
    spec = item_spec(dataset.selection, dataset.image_size)
    arrays = {name: np.empty((len(positions), *shape), dtype) for name, (dtype, shape) in spec.items()}
    ids: list[str] = []
    for block in _blocks(positions, BLOCK_ROWS):
        batch = dataset.read_batch(block)
        rows = slice(block[0] - positions.start, block[-1] - positions.start + 1)
        for name in arrays:
            arrays[name][rows] = batch[name]
        ids.extend(batch["id"])
        progress.update(len(block))
    return {**arrays, "id": ids}


def _write_ffcv(dataset: MMEarthDataset, positions: range, path: Path, progress: tqdm) -> None:
    from ffcv.fields import NDArrayField
    from ffcv.writer import DatasetWriter

    batch = _read_shard(dataset, positions, progress)
    batch["id"] = _encode_ids(batch["id"])
    fields = {name[:FFCV_NAME_BYTES]: NDArrayField(dtype=a.dtype, shape=a.shape[1:]) for name, a in batch.items()}
    item_bytes = sum(a[0].nbytes for a in batch.values())
    # A whole item must fit in one FFCV page.
    page_size = max(FFCV_PAGE_BYTES, 1 << (item_bytes - 1).bit_length())
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=1)
    # FFCV always draws its own progress bar; ours already covers the shard.
    with contextlib.redirect_stderr(io.StringIO()):
        writer.from_indexed_dataset(_ShardItems(list(batch.values())), chunksize=BLOCK_ROWS)


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(content, indent=1))


def _parquet_problem(path: Path, split: str) -> str | None:
    """Why ``path`` is not a Parquet shard of ``split`` written by this module (None when it is)."""
    try:
        metadata = read_shard_metadata(path)
    except (ShardError, OSError, ValueError, pa.ArrowException):  # ArrowInvalid, JSONDecodeError: ValueErrors
        return "it carries no mpmae shard metadata"
    if not isinstance(metadata, dict) or metadata.get("split") != split:
        return f"its mpmae metadata is not that of split {split!r}"
    return None


def _ffcv_problem(path: Path) -> str | None:
    """Why ``path`` is not an FFCV shard written by this module: its header must declare only registry
    modalities and ``id`` as fields (read from the header alone; nothing is decoded)."""
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType

    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) != 1 or header[0]["version"] != CURRENT_VERSION or header[0]["num_fields"] > len(MODALITIES) + 1:
        return "it is not an FFCV file of mpmae's layout"
    count = int(header[0]["num_fields"])
    descriptors = np.fromfile(path, dtype=FieldDescType, count=count, offset=HeaderType.itemsize)
    names = [bytes(d["name"]).rstrip(b"\0").decode("utf-8", "replace") for d in descriptors]
    known = {n[:FFCV_NAME_BYTES] for n in (*MODALITIES, "id")}
    if len(names) != count or "id" not in names or not set(names) <= known:
        return "its fields are not mpmae's modalities and id"
    return None


def _check_own(path: Path, split: str, format: ShardFormat) -> None:
    """Refuse to replace or remove ``path`` unless it is a shard this module wrote for ``split``."""
    if path.is_symlink() or not path.is_file():
        problem: str | None = "it is not a regular file"
    else:
        problem = _parquet_problem(path, split) if format == "parquet" else _ffcv_problem(path)
    if problem is not None:
        raise FileExistsError(
            f"refusing to replace {path}: {problem}, so it is not a {format} shard that mpmae wrote for "
            f"split {split!r}; move it elsewhere first"
        )


def _check_sidecar(path: Path, split: str) -> None:
    """An existing FFCV sidecar is replaced only when it is this module's, for ``split``."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        content = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        content = None
    if not isinstance(content, dict) or "format_version" not in content or content.get("split") != split:
        raise FileExistsError(
            f"refusing to replace {path}: it is not the FFCV sidecar mpmae wrote for split {split!r}; "
            f"move it elsewhere first"
        )


def _check_ffcv_names(selection: Iterable[str]) -> None:
    truncated = [name[:FFCV_NAME_BYTES] for name in (*selection, "id")]
    if len(set(truncated)) != len(truncated):
        raise ValueError(f"modality names collide once truncated to FFCV's {FFCV_NAME_BYTES} bytes")


def _shard_writer(
    format: ShardFormat, dataset: MMEarthDataset, metadata: Mapping[str, Any]
) -> Callable[[range, Path, tqdm], None]:
    """A function writing the tiles at some positions of ``dataset`` to one shard file."""
    if format == "ffcv":
        _check_ffcv_names(dataset.selection)
        return lambda positions, path, bar: _write_ffcv(dataset, positions, path, bar)
    schema = arrow_schema(dataset.selection, dataset.image_size, metadata)
    return lambda positions, path, bar: _write_parquet(dataset, positions, path, schema, bar)


def write_shards(
    source_dir: Path | str,
    out_dir: Path | str,
    format: ShardFormat = "parquet",
    split: str = "train",
    tiles_per_shard: int = DEFAULT_TILES_PER_SHARD,
    modalities: ModalitySpec = "all_mod",
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Convert one split of an MMEarth folder into Parquet or FFCV shards; return the shard paths.

    Refuses an ``out_dir`` that already holds shards of this split and format unless ``overwrite``;
    with ``overwrite`` each new shard replaces the old one of the same name when complete, and old
    shards of this split and format not in the new set are removed once all new ones are written.
    A file under a shard's (or the sidecar's) name that mpmae did not write refuses before anything is
    written. Nothing else in ``out_dir`` is touched.
    """
    if format not in EXTENSIONS:
        raise ValueError(f"unknown shard format {format!r}; valid formats: {sorted(EXTENSIONS)}")
    if tiles_per_shard < 1:
        raise ValueError(f"tiles_per_shard must be >= 1, got {tiles_per_shard}")
    dataset = MMEarthDataset(source_dir, split=split, modalities=modalities)
    if len(dataset) == 0:
        raise ValueError(f"{source_dir}: split {split!r} holds no tiles; nothing to shard")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = _existing_shards(out, split, format)
    if old and not overwrite:
        raise FileExistsError(
            f"{out}: already holds {len(old)} {format} shard(s) of split {split!r} "
            f"(e.g. {old[0].name}); pass overwrite=True (--overwrite) to replace them"
        )
    for path in old:
        _check_own(path, split, format)
    sidecar = out / f"{split}-ffcv.json"
    if format == "ffcv":
        _check_sidecar(sidecar, split)
    metadata = shard_metadata(dataset)
    write = _shard_writer(format, dataset, metadata)
    count = math.ceil(len(dataset) / tiles_per_shard)
    written = []
    with tqdm(total=len(dataset), unit="tile", desc=f"{split} -> {format}", disable=not progress) as bar:
        for index in range(count):
            positions = range(index * tiles_per_shard, min(len(dataset), (index + 1) * tiles_per_shard))
            path = out / shard_name(split, index, count, format)

            def write_shard(tmp: Path, p: range = positions) -> None:
                write(p, tmp, bar)

            atomic_write(path, write_shard)
            written.append(path)
    for stale in sorted(set(old) - set(written)):
        _check_own(stale, split, format)  # again: it may have been swapped while shards were written
        stale.unlink()
    if format == "ffcv":
        _write_json(sidecar, {**metadata, "shards": [p.name for p in written], "rows": len(dataset)})
    return written
