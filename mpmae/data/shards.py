"""Parquet and FFCV shards of an MMEarth split, for multi-node training (`mpmae shard`).

Shards hold the items *as stored* (what :meth:`MMEarthDataset.read_raw <mpmae.data.mmearth.MMEarthDataset.read_raw>`
returns: the h5's own dtypes, the selected bands, and the per-tile Sentinel-2 level), so a reader only
decodes and ships half the bytes of float32 values; the training workers normalise (on the GPU when there is
one) with the :class:`~mpmae.data.normalize.Normalizer` that the metadata and manifest record. Shard ``k``
of ``n`` is named ``{split}-{k:05d}-of-{n:05d}.{parquet|beton}``. The output folder may be local or an
object-store URI (``s3://bucket/prefix``; see :mod:`mpmae.storage`).

Parquet: one column per modality, a plain fixed-size list of the flattened values in the file's dtype (any
Arrow reader decodes it without an extension type; the field metadata holds ``shape`` and ``bands``), a bool
column ``s2_l2a`` when Sentinel-2 is selected, and a string column ``id``. Decoding is a zero-copy view of the
column's buffer (:func:`table_to_raw`). The file's key-value metadata ``mpmae`` holds the selection (modality ->
bands), the registry entries used, the image size, the band statistics, the normalisation and the
fingerprint of the run that wrote it. Rows are written one row group per read block, so memory is bounded
by a block.

FFCV: one ``NDArrayField`` per modality in the file's dtype (FFCV needs fixed shapes), ``s2_l2a`` as one byte,
and ``id`` as zero-padded UTF-8 bytes.
FFCV stores field names in 16 bytes, so long modality names are truncated on disk and mapped back by
prefix (:func:`ffcv_field_modality`). FFCV's writer works from an indexable object in a forked process,
so each shard is first read into memory (memory bounded by one shard) and a failure surfaces in this
process instead of hanging FFCV's writer. FFCV reads local files only: a URI output gets each shard
written to a local temporary file first, then uploaded.

The manifest ``{split}-{parquet|ffcv}.json`` is written last, after every shard: the selection, registry
entries, image size, band statistics and source, the run's fingerprint, and each shard's name, rows and
bytes. Readers (:func:`find_shards`, :func:`open_shard_set`) trust only what a manifest lists, so a set
being written, or left by an interrupted run, is refused rather than read in part.

Every shard appears whole or not at all: a local shard is written under a fresh hidden temporary name and
renamed when complete; an object appears when its upload ends (pyarrow cannot abort an upload, so a shard
that fails midway is deleted at once). A rerun of an interrupted `mpmae shard` (shards, no manifest)
resumes: Parquet shards carrying this run's fingerprint (source h5 name and size, split, selection,
tiles per shard, shard count) are kept, a shard of any other run refuses; FFCV shards carry no
fingerprint, so they are all written again. Overwriting replaces or removes only files mpmae wrote:
Parquet shards carrying the ``mpmae`` metadata of the same split, FFCV shards whose fields are all registry
modalities plus ``id``, and the split's own manifest (removed first, so the old set is never read mixed
with the new one). Anything else under a shard's name refuses, naming it.

With Ray initialised (or ``parallel=True``), each shard is one Ray task that opens the h5 itself and writes
its shard straight into the output. The h5 is a local path of the machine that runs `mpmae shard`, so the
tasks are pinned to the driver's node (``NodeAffinitySchedulingStrategy(soft=False)``); the driver writes
the manifest once all of them succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

import mpmae.storage as storage
from mpmae.atomic import atomic_write
from mpmae.data.mmearth import Batch, MMEarthDataset
from mpmae.data.normalize import S2_LEVEL_KEY, Normalizer, RawBatch
from mpmae.modalities import MODALITIES, Modality, ModalitySpec, Selection, get_modality

log = logging.getLogger(__name__)

ShardFormat = Literal["parquet", "ffcv"]
#: Shard locations: local paths, or URIs (``s3://...``) as strings.
ShardPaths = list[Path] | list[str]
EXTENSIONS: dict[str, str] = {"parquet": "parquet", "ffcv": "beton"}
METADATA_KEY = b"mpmae"
#: 2: the file's raw dtypes, normalised by the reader (1, refused now: preprocessed float32/int64 values).
FORMAT_VERSION = 2
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
#: Shard footers or headers read at once when a manifest is checked (a store answers them in parallel).
CHECK_THREADS = 16
#: A manifest larger than this is not one mpmae wrote.
MANIFEST_MAX_BYTES = 64 << 20

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.(?P<ext>parquet|beton)$")


class ShardError(ValueError):
    """A shard set is missing, incomplete, mixed or not written by this module."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# -- item layout ------------------------------------------------------------------------------------


def raw_spec(dataset: MMEarthDataset) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Per column of ``dataset``'s raw batches (modalities, then ``s2_l2a`` with Sentinel-2), its dtype and
    per-item shape."""
    spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    dtypes, size = dataset.raw_dtypes, dataset.image_size
    for name, bands in dataset.selection.items():
        pixel = get_modality(name).level == "pixel"
        if pixel and size is None:
            raise ValueError(f"pixel modality {name!r} needs an image size")
        spec[name] = (np.dtype(dtypes[name]), (len(bands), size, size) if pixel and size else (len(bands),))
    if "sentinel2" in dataset.selection:
        spec[S2_LEVEL_KEY] = (np.dtype(bool), ())
    return spec


def dataset_schema(dataset: MMEarthDataset, metadata: Mapping[str, Any]) -> pa.Schema:
    """The Arrow schema of ``dataset``'s raw rows: one fixed-size list column per modality (shape and bands in
    its field metadata), ``s2_l2a``, ``id``; ``metadata`` goes to the file metadata."""
    fields = []
    for name, (dtype, shape) in raw_spec(dataset).items():
        if name == S2_LEVEL_KEY:
            fields.append(pa.field(name, pa.bool_(), nullable=False))
            continue
        described = {b"shape": json.dumps(list(shape)), b"bands": json.dumps(list(dataset.selection[name]))}
        fields.append(pa.field(name, pa.list_(pa.from_numpy_dtype(dtype), math.prod(shape)), nullable=False,
                               metadata=described))
    fields.append(pa.field("id", pa.string(), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata)})


def batch_to_table(batch: RawBatch, schema: pa.Schema) -> pa.Table:
    """A raw batch as an Arrow table of ``schema`` (zero-copy for contiguous arrays)."""
    columns = []
    for field in schema:
        if field.name == "id":
            columns.append(pa.array(batch["id"], type=pa.string()))
            continue
        values = np.ascontiguousarray(batch[field.name])
        if field.name == S2_LEVEL_KEY:
            columns.append(pa.array(values, type=pa.bool_()))
            continue
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), field.type.list_size)
        if column.type != field.type:
            raise ValueError(f"modality {field.name!r}: got {column.type}, schema expects {field.type}")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def column_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """Per-item shapes of a raw table's fixed-size list columns, from their field metadata."""
    shapes = {}
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            if not field.metadata or b"shape" not in field.metadata:
                raise ShardError(f"column {field.name!r} has no shape in its field metadata; not an mpmae shard")
            shapes[field.name] = tuple(json.loads(field.metadata[b"shape"]))
    return shapes


def table_to_raw(table: pa.Table) -> RawBatch:
    """A raw batch of a table of shard rows: ``{modality: ndarray (N, ...), "s2_l2a": bool (N,), "id": list}``.

    Modalities are zero-copy, read-only views of the table's buffers when a column is one chunk (Arrow's
    memory, possibly Ray's object store: never write to them); shapes come from the field metadata.
    """
    shapes = column_shapes(table.schema)
    batch: RawBatch = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "id":
            batch["id"] = column.to_pylist()
        elif name == S2_LEVEL_KEY:
            batch[name] = column.to_numpy()
        elif name in shapes:
            array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            values = array.flatten().to_numpy(zero_copy_only=False)  # flatten honours a sliced array's offset
            batch[name] = values.reshape(len(array), *shapes[name])
        else:
            raise ShardError(f"column {name!r} has type {column.type}; expected a fixed-size list of a modality")
    return batch


def table_to_batch(table: pa.Table) -> Batch:
    """A table of shard rows, normalised with the normalisation its ``mpmae`` metadata records: the batch
    :meth:`MMEarthDataset.read_batch <mpmae.data.mmearth.MMEarthDataset.read_batch>` returns."""
    metadata = table.schema.metadata or {}
    if METADATA_KEY not in metadata:
        raise ShardError(f"no {METADATA_KEY.decode()!r} metadata in the table; not written by mpmae shard")
    normalizer = Normalizer.from_dict(json.loads(metadata[METADATA_KEY])["normalization"])
    return normalizer.numpy(table_to_raw(table))


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
        "normalization": dataset.normalizer.to_dict(),
    }


def run_fingerprint(dataset: MMEarthDataset, format: ShardFormat, tiles_per_shard: int) -> dict[str, Any]:
    """What makes two `mpmae shard` runs write the same shards: source h5 (name and size), split, format,
    selection, tiles per shard and shard count. Its digest is :func:`fingerprint_digest`."""
    return {
        "format_version": FORMAT_VERSION,
        "source": dataset.files.h5.name,
        "source_bytes": dataset.files.h5.stat().st_size,
        "split": dataset.split,
        "format": format,
        "selection": {name: list(bands) for name, bands in dataset.selection.items()},
        "tiles_per_shard": tiles_per_shard,
        "shards": math.ceil(len(dataset) / tiles_per_shard),
    }


def fingerprint_digest(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]


def _parquet_footer(path: Path | str) -> pq.FileMetaData:
    store, inner = storage.resolve(path)
    return pq.read_metadata(inner, filesystem=store)


def read_shard_metadata(path: Path | str) -> dict[str, Any]:
    """The ``mpmae`` metadata of a Parquet shard, local or a URI (selection, registry entries, band stats, ...)."""
    metadata = _parquet_footer(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise ShardError(f"{path}: no {METADATA_KEY.decode()!r} metadata; not written by mpmae shard")
    content = json.loads(metadata[METADATA_KEY])
    _check_version(path, content)
    return content


def _check_version(where: Path | str, content: Mapping[str, Any]) -> None:
    """Refuse a shard or manifest of another shard format, saying how to get this one."""
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{where}: shard format {version}, this mpmae reads format {FORMAT_VERSION} (the h5's own dtypes, "
            f"normalised in the training workers; format 1 held preprocessed values): rewrite the set with "
            f"`mpmae shard --overwrite`"
        )


# -- shard sets -------------------------------------------------------------------------------------


def shard_name(split: str, index: int, count: int, format: ShardFormat) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.{EXTENSIONS[format]}"


def manifest_name(split: str, format: ShardFormat) -> str:
    """The manifest of a shard set, written after all its shards: ``train-parquet.json``, ``train-ffcv.json``."""
    return f"{split}-{format}.json"


def _location(folder: str, name: str) -> Path | str:
    """A file in ``folder``: a Path when local (what callers always got), the URI string otherwise."""
    return storage.join(folder, name) if storage.is_uri(folder) else Path(folder) / name


def _shard_names(files: Iterable[str], split: str, format: ShardFormat) -> list[str]:
    """The names of every shard of ``split`` and ``format`` among ``files``, whatever its count (sorted)."""
    ext = EXTENSIONS[format]
    return sorted(n for n in files if (m := _SHARD_RE.match(n)) and m["split"] == split and m["ext"] == ext)


def _ffcv_header(path: Path | str) -> tuple[np.ndarray, list[str]] | None:
    """The header and field names of an FFCV file (read from its first bytes alone), None if it has none."""
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType

    most = len(MODALITIES) + 2  # every modality, s2_l2a and id
    raw = storage.read_bytes(path, limit=HeaderType.itemsize + most * FieldDescType.itemsize)
    if len(raw) < HeaderType.itemsize:
        return None
    header = np.frombuffer(raw, dtype=HeaderType, count=1)[0]
    count = int(header["num_fields"])
    if header["version"] != CURRENT_VERSION or count > most:
        return None
    if len(raw) < HeaderType.itemsize + count * FieldDescType.itemsize:
        return None
    descriptors = np.frombuffer(raw, dtype=FieldDescType, count=count, offset=HeaderType.itemsize)
    return header, [bytes(d["name"]).rstrip(b"\0").decode("utf-8", "replace") for d in descriptors]


def _shard_rows(path: Path | str, format: ShardFormat) -> int:
    """The rows a shard file holds, from its Parquet footer or FFCV header."""
    try:
        if format == "parquet":
            return int(_parquet_footer(path).num_rows)
        header = _ffcv_header(path)
    except (pa.ArrowInvalid, ValueError) as err:
        raise ShardError(f"{path}: not a readable {format} shard ({_first_line(err)})") from None
    if header is None:
        raise ShardError(f"{path}: not an FFCV file of mpmae's layout")
    return int(header[0]["num_samples"])


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """A complete shard set: its shard locations, checked against its manifest, and the manifest."""

    folder: str
    format: ShardFormat
    paths: ShardPaths
    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def selection(self) -> Selection:
        return {name: tuple(bands) for name, bands in self.manifest["selection"].items()}

    @property
    def image_size(self) -> int | None:
        size = self.manifest.get("image_size")
        return None if size is None else int(size)


def _read_manifest(path: Path | str, split: str, format: ShardFormat) -> dict[str, Any] | None:
    """A manifest's content if it is one mpmae wrote for ``split`` and ``format``, else None."""
    try:
        content = json.loads(storage.read_bytes(path, limit=MANIFEST_MAX_BYTES + 1))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if (not isinstance(content, dict) or "format_version" not in content or content.get("split") != split
            or content.get("format", format) != format or not isinstance(content.get("shards"), list)):
        return None  # ("format" is absent from the FFCV sidecars older mpmae wrote)
    return content


def _incomplete(folder: str, split: str, format: ShardFormat, found: int) -> ShardError:
    return ShardError(
        f"{folder}: the {format} shard set of split {split!r} is incomplete: {found} shard file(s) but no "
        f"manifest {manifest_name(split, format)} (written by an interrupted `mpmae shard`: rerun it to resume, "
        f"or pass --overwrite)"
    )


def open_shard_set(folder: Path | str, split: str = "train", format: ShardFormat = "parquet") -> ShardSet:
    """The shard set of ``split`` in a local folder or under a URI, as its manifest lists it.

    Refused (:class:`ShardError`, one line): no shards, shards without a manifest (an interrupted
    `mpmae shard`), a manifest that is not mpmae's, a listed shard that is missing, of another size than
    recorded or holding another number of rows than the manifest says (each shard's footer or header is
    read, in parallel threads). Store errors are :mod:`mpmae.storage`'s, naming the URI.
    """
    if format not in EXTENSIONS:
        raise ValueError(f"unknown shard format {format!r}; valid formats: {sorted(EXTENSIONS)}")
    where = str(folder)
    if not storage.is_uri(where) and not Path(where).is_dir():
        raise ShardError(f"{where}: not a directory of shards")
    files = storage.listing(where)
    name = manifest_name(split, format)
    if name not in files:
        found = _shard_names(files, split, format)
        if found:
            raise _incomplete(where, split, format, len(found))
        raise ShardError(
            f"{where}: no {format} shards of split {split!r} "
            f"(expected {shard_name(split, 0, 1, format).replace('00001', 'NNNNN')} ... and {name})"
        )
    manifest_path = _location(where, name)
    manifest = _read_manifest(manifest_path, split, format)
    if manifest is None:
        raise ShardError(f"{manifest_path}: not a manifest mpmae shard wrote for {format} shards of split {split!r}")
    _check_version(manifest_path, manifest)
    entries = [{"name": e} if isinstance(e, str) else e for e in manifest["shards"]]  # older FFCV sidecars
    if not entries or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise ShardError(f"{manifest_path}: lists no shards")
    paths = [_location(where, e["name"]) for e in entries]
    for entry, path in zip(entries, paths, strict=True):
        info = files.get(entry["name"])
        if info is None or info.type != pafs.FileType.File:
            raise ShardError(f"{path}: listed in {manifest_path} but missing; the shard set is damaged (rewrite it "
                             f"with `mpmae shard --overwrite`)")
        if "bytes" in entry and info.size != entry["bytes"]:
            raise ShardError(f"{path}: {info.size} bytes, {manifest_path} says {entry['bytes']}: replaced after the "
                             f"set was written (rewrite it with `mpmae shard --overwrite`)")
    with ThreadPoolExecutor(max_workers=max(1, min(CHECK_THREADS, len(paths)))) as pool:
        rows = list(pool.map(lambda p: _shard_rows(p, format), paths))
    for entry, path, count in zip(entries, paths, rows, strict=True):
        if "rows" in entry and count != entry["rows"]:
            raise ShardError(f"{path}: holds {count} rows, {manifest_path} says {entry['rows']} (rewrite the set "
                             f"with `mpmae shard --overwrite`)")
    if "rows" in entries[0] and sum(rows) != manifest.get("rows"):
        raise ShardError(f"{manifest_path}: its shards hold {sum(rows)} rows, it says {manifest.get('rows')}")
    return ShardSet(where, format, paths, manifest)  # type: ignore[arg-type]


def find_shards(source: Path | str | Sequence[Path | str], split: str = "train",
                format: ShardFormat = "parquet") -> ShardPaths:
    """The shards of ``split`` in a folder or under a URI, as its manifest lists them (see
    :func:`open_shard_set`), or the given list of shard paths as is. Local shards are ``Path``s, URIs ``str``s."""
    if not isinstance(source, (str, os.PathLike)):
        given = [str(p) if storage.is_uri(p) else Path(p) for p in source]
        if not given:
            raise ShardError("empty list of shard paths")
        if len({isinstance(p, str) for p in given}) > 1:
            raise ShardError("a list of shard paths mixes local paths and URIs")
        return given  # type: ignore[return-value]
    return open_shard_set(source, split, format).paths


# -- writing ----------------------------------------------------------------------------------------


def _blocks(positions: range, block_rows: int) -> Iterator[np.ndarray]:
    for start in range(positions.start, positions.stop, block_rows):
        yield np.arange(start, min(start + block_rows, positions.stop))


def _parquet_writer(sink: Path | pa.NativeFile, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(sink, schema, compression=PARQUET_COMPRESSION, use_dictionary=False,
                            write_statistics=["id"])


def _write_parquet(dataset: MMEarthDataset, positions: range, path: Path, schema: pa.Schema,
                   progress: tqdm) -> None:
    """Stream ``positions`` into one local Parquet file, one row group per block."""
    with _parquet_writer(path, schema) as writer:
        for block in _blocks(positions, BLOCK_ROWS):
            writer.write_table(batch_to_table(dataset.read_raw(block), schema), row_group_size=len(block))
            progress.update(len(block))


def _store_failure(uri: str, err: OSError) -> storage.StoreUnavailableError:
    return storage.StoreUnavailableError(f"{uri}: writing to the store failed ({_first_line(err)})")


def _write_parquet_to_store(dataset: MMEarthDataset, positions: range, uri: str, schema: pa.Schema,
                            progress: tqdm) -> None:
    """Stream ``positions`` into one object (it appears when the upload completes, at the end).

    pyarrow cannot abort an upload (closing the stream completes it, with what was sent), so a shard that
    fails midway is deleted at once; it has no Parquet footer, so nothing would read it meanwhile.
    """
    store, inner = storage.resolve(uri)
    try:
        stream = store.open_output_stream(inner)
    except OSError as err:
        raise _store_failure(uri, err) from None
    writer = None
    try:
        writer = _parquet_writer(stream, schema)
        for block in _blocks(positions, BLOCK_ROWS):
            table = batch_to_table(dataset.read_raw(block), schema)  # h5 errors pass as they are
            try:
                writer.write_table(table, row_group_size=len(block))
            except OSError as err:
                raise _store_failure(uri, err) from None
            progress.update(len(block))
        try:
            writer.close()
            stream.close()
        except OSError as err:
            raise _store_failure(uri, err) from None
    except BaseException:
        if writer is not None:
            writer.is_open = False  # no footer: its __del__ would otherwise write one into the stream
        with contextlib.suppress(Exception):
            stream.close()
        with contextlib.suppress(Exception):
            store.delete_file(inner)
        raise


@contextlib.contextmanager
def ffcv_quiet() -> Iterator[None]:
    """FFCV 1.0 predates torch's uint16 and warns at every uint16 field; torch 2.14 reads them as they are."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Pytorch currently doesn't support uint16")
        yield


def ffcv_field_modality(field_name: str) -> str:
    """The registry name (or ``id``) behind a possibly truncated FFCV field name."""
    names = [n for n in (*MODALITIES, S2_LEVEL_KEY, "id") if n[:FFCV_NAME_BYTES] == field_name]
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


def _read_shard(dataset: MMEarthDataset, positions: range, progress: tqdm) -> RawBatch:
    """Read ``positions`` raw, block by block, into preallocated arrays (peak: one shard plus one block)."""
    spec = raw_spec(dataset)
    arrays = {name: np.empty((len(positions), *shape), dtype) for name, (dtype, shape) in spec.items()}
    ids: list[str] = []
    for block in _blocks(positions, BLOCK_ROWS):
        batch = dataset.read_raw(block)
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
    if S2_LEVEL_KEY in batch:
        batch[S2_LEVEL_KEY] = batch[S2_LEVEL_KEY].astype(np.uint8).reshape(-1, 1)  # FFCV: arrays of a fixed shape
    with ffcv_quiet():
        fields = {name[:FFCV_NAME_BYTES]: NDArrayField(dtype=a.dtype, shape=a.shape[1:]) for name, a in batch.items()}
    item_bytes = sum(a[0].nbytes for a in batch.values())
    # A whole item must fit in one FFCV page.
    page_size = max(FFCV_PAGE_BYTES, 1 << (item_bytes - 1).bit_length())
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=1)
    # FFCV always draws its own progress bar; ours already covers the shard.
    with contextlib.redirect_stderr(io.StringIO()):
        writer.from_indexed_dataset(_ShardItems(list(batch.values())), chunksize=BLOCK_ROWS)


def _write_ffcv_to_store(dataset: MMEarthDataset, positions: range, uri: str, progress: tqdm) -> None:
    """FFCV writes local files only: the shard goes to a local temporary folder, then is uploaded whole."""
    with tempfile.TemporaryDirectory(prefix="mpmae-shard-") as tmp:
        _write_ffcv(dataset, positions, Path(tmp, storage.name_of(uri)), progress)
        storage.upload(Path(tmp), storage.parent_of(uri), overwrite=True)


def _parquet_problem(metadata: Any, split: str) -> str | None:
    """Why a file of ``metadata`` (its decoded ``mpmae`` metadata, None if it has none) is not a Parquet
    shard of ``split`` written by this module (None when it is)."""
    if metadata is None:
        return "it carries no mpmae shard metadata"
    if not isinstance(metadata, dict) or metadata.get("split") != split:
        return f"its mpmae metadata is not that of split {split!r}"
    return None


def _parquet_shard_metadata(path: Path | str) -> tuple[Any, int]:
    """A Parquet file's decoded ``mpmae`` metadata (None if it has none or is not Parquet) and its rows."""
    try:
        footer = _parquet_footer(path)
        return json.loads((footer.metadata or {})[METADATA_KEY]), int(footer.num_rows)
    except (KeyError, FileNotFoundError, pa.ArrowInvalid, ValueError):  # JSONDecodeError is a ValueError
        return None, 0


def _ffcv_problem(path: Path | str) -> str | None:
    """Why ``path`` is not an FFCV shard written by this module: its header must declare only registry
    modalities and ``id`` as fields (read from the header alone; nothing is decoded)."""
    try:
        header = _ffcv_header(path)
    except (OSError, ValueError):
        header = None
    if header is None:
        return "it is not an FFCV file of mpmae's layout"
    names = header[1]
    known = {n[:FFCV_NAME_BYTES] for n in (*MODALITIES, S2_LEVEL_KEY, "id")}
    if "id" not in names or not set(names) <= known:
        return "its fields are not mpmae's modalities and id"
    return None


def _not_a_file(path: Path | str, info: pafs.FileInfo | None) -> bool:
    if isinstance(path, Path):
        return path.is_symlink() or not path.is_file()
    return info is None or info.type != pafs.FileType.File


def _check_own(path: Path | str, info: pafs.FileInfo | None, split: str, format: ShardFormat) -> None:
    """Refuse to replace or remove ``path`` unless it is a shard this module wrote for ``split``."""
    if _not_a_file(path, info):
        problem: str | None = "it is not a regular file"
    elif format == "parquet":
        problem = _parquet_problem(_parquet_shard_metadata(path)[0], split)
    else:
        problem = _ffcv_problem(path)
    if problem is not None:
        raise FileExistsError(
            f"refusing to replace {path}: {problem}, so it is not a {format} shard that mpmae wrote for "
            f"split {split!r}; move it elsewhere first"
        )


def _check_manifest(path: Path | str, info: pafs.FileInfo | None, split: str, format: ShardFormat) -> None:
    """An existing manifest is replaced or removed only when it is this module's, for ``split`` and ``format``."""
    if _not_a_file(path, info) or _read_manifest(path, split, format) is None:
        raise FileExistsError(
            f"refusing to replace {path}: it is not the {format} manifest mpmae wrote for split {split!r}; "
            f"move it elsewhere first"
        )


def _check_ffcv_names(selection: Iterable[str]) -> None:
    truncated = [name[:FFCV_NAME_BYTES] for name in (*selection, S2_LEVEL_KEY, "id")]
    if len(set(truncated)) != len(truncated):
        raise ValueError(f"modality names collide once truncated to FFCV's {FFCV_NAME_BYTES} bytes")


ShardWriter = Callable[[range, Path | str, tqdm], None]


def _shard_writer(format: ShardFormat, dataset: MMEarthDataset, metadata: Mapping[str, Any]) -> ShardWriter:
    """A function writing the tiles at some positions of ``dataset`` to one shard, local (atomically: a
    temporary file renamed when complete) or a URI."""
    if format == "ffcv":
        _check_ffcv_names(dataset.selection)

        def write_ffcv(positions: range, target: Path | str, bar: tqdm) -> None:
            if isinstance(target, str):
                _write_ffcv_to_store(dataset, positions, target, bar)
            else:
                atomic_write(target, lambda tmp: _write_ffcv(dataset, positions, tmp, bar))

        return write_ffcv
    schema = dataset_schema(dataset, metadata)

    def write_parquet(positions: range, target: Path | str, bar: tqdm) -> None:
        if isinstance(target, str):
            _write_parquet_to_store(dataset, positions, target, schema, bar)
        else:
            atomic_write(target, lambda tmp: _write_parquet(dataset, positions, tmp, schema, bar))

    return write_parquet


def _shard_task(source_dir: str, split: str, selection: Selection, format: ShardFormat,
                metadata: dict[str, Any], start: int, stop: int, target: Path | str) -> str:
    """One shard written in a Ray task: the task opens the h5 itself. Returns the node it ran on."""
    import ray

    dataset = MMEarthDataset(source_dir, split=split, modalities=dict(selection))
    with tqdm(disable=True) as bar:
        _shard_writer(format, dataset, metadata)(range(start, stop), target, bar)
    return str(ray.get_runtime_context().get_node_id())


def _use_ray(parallel: bool | Literal["auto"]) -> bool:
    if parallel == "auto":
        ray = sys.modules.get("ray")  # never imported: never initialised
        return ray is not None and bool(ray.is_initialized())
    return bool(parallel)


def _write_with_ray(jobs: Sequence[tuple[range, Path | str]], source_dir: str, dataset: MMEarthDataset,
                    format: ShardFormat, metadata: dict[str, Any], bar: tqdm) -> None:
    """Each shard one Ray task on this (the driver's) node, where the h5 is; the first failure cancels the
    rest and is raised as the task raised it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init()
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    if cpus < 1:  # a head that declares no CPU: the pinned tasks would wait forever
        raise ShardError(f"this node ({node[:12]}) offers Ray no CPU, and the shard tasks must run where the h5 "
                         "is: run `mpmae shard --ray` on a node with CPUs, or without --ray")
    here = NodeAffinitySchedulingStrategy(node, soft=False)
    task = ray.remote(num_cpus=1)(_shard_task)
    pending = {
        task.options(name=f"mpmae shard {storage.name_of(target)}", scheduling_strategy=here).remote(
            source_dir, dataset.split, dataset.selection, format, metadata, positions.start, positions.stop, target
        ): len(positions)
        for positions, target in jobs
    }
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            rows = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                for other in pending:
                    ray.cancel(other)
                cause = err.cause
                raise (cause if isinstance(cause, Exception) else err) from err
            bar.update(rows)


def _plan_rerun(out: str, files: Mapping[str, pafs.FileInfo], split: str, format: ShardFormat, overwrite: bool,
                fingerprint: str, plans: Mapping[str, range]) -> set[str]:
    """Check what ``out`` already holds of this split and format; return the shards kept (a resume).

    A complete set (its manifest) refuses unless ``overwrite``; shards without a manifest are an interrupted
    run's: with the same fingerprint (Parquet) they are kept, of another run they refuse. Files mpmae did not
    write refuse in every case, before anything is written.
    """
    manifest = manifest_name(split, format)
    old = _shard_names(files, split, format)
    if manifest in files:
        _check_manifest(_location(out, manifest), files[manifest], split, format)
        if not overwrite:
            raise FileExistsError(
                f"{out}: already holds a complete {format} shard set of split {split!r} ({len(old)} shard(s), "
                f"{manifest}); pass overwrite=True (--overwrite) to replace it"
            )
    if overwrite or format == "ffcv":  # FFCV shards carry no fingerprint: an interrupted run's are rewritten
        for name in old:
            _check_own(_location(out, name), files[name], split, format)
        return set()
    kept = set()
    for name in old:
        path = _location(out, name)
        _check_own(path, files[name], split, format)  # not mpmae's: refused whatever the run
        metadata, rows = _parquet_shard_metadata(path)
        if metadata.get("fingerprint") != fingerprint or name not in plans or rows != len(plans[name]):
            raise FileExistsError(
                f"{path}: written by a different `mpmae shard` run (another source, selection or tiles per shard, "
                f"or an older mpmae) that did not finish; use --overwrite to replace its shards, or another OUT"
            )
        kept.add(name)
    return kept


def write_shards(
    source_dir: Path | str,
    out_dir: Path | str,
    format: ShardFormat = "parquet",
    split: str = "train",
    tiles_per_shard: int = DEFAULT_TILES_PER_SHARD,
    modalities: ModalitySpec = "all_mod",
    overwrite: bool = False,
    progress: bool = True,
    parallel: bool | Literal["auto"] = "auto",
) -> ShardPaths:
    """Convert one split of a local MMEarth folder into Parquet or FFCV shards in ``out_dir`` (a folder or
    a URI); write the manifest last; return the shard paths (``Path``s, or URI ``str``s).

    Refuses an ``out_dir`` that already holds a complete set of this split and format (its manifest)
    unless ``overwrite``. Shards without a manifest, left by an interrupted run, are resumed: those of this
    very run (Parquet: same fingerprint) are kept and the rest written; a Parquet shard of another run
    refuses, naming it (``overwrite`` replaces them). With ``overwrite`` the old manifest is removed first,
    each new shard replaces the old one of the same name when complete, and old shards of this split and
    format not in the new set are removed once all new ones are written. A file under a shard's (or the
    manifest's) name that mpmae did not write refuses before anything is written. Nothing else in
    ``out_dir`` is touched.

    ``parallel``: ``"auto"`` writes each shard as a Ray task when Ray is initialised, else in this process;
    ``True`` uses Ray (``ray.init()`` first if needed), ``False`` never. The tasks run on the driver's node,
    which holds the source h5.
    """
    if format not in EXTENSIONS:
        raise ValueError(f"unknown shard format {format!r}; valid formats: {sorted(EXTENSIONS)}")
    if tiles_per_shard < 1:
        raise ValueError(f"tiles_per_shard must be >= 1, got {tiles_per_shard}")
    if storage.is_uri(source_dir):
        raise ValueError(f"{source_dir}: the MMEarth folder must be local (its h5 is read in place); the output "
                         f"may be a URI")
    dataset = MMEarthDataset(source_dir, split=split, modalities=modalities)
    if len(dataset) == 0:
        raise ValueError(f"{source_dir}: split {split!r} holds no tiles; nothing to shard")
    if format == "ffcv":
        _check_ffcv_names(dataset.selection)
    out = str(out_dir)
    storage.check_reachable(out, "OUT")
    if not storage.is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    params = run_fingerprint(dataset, format, tiles_per_shard)
    fingerprint = fingerprint_digest(params)
    count = params["shards"]
    plans = {
        shard_name(split, i, count, format): range(i * tiles_per_shard, min(len(dataset), (i + 1) * tiles_per_shard))
        for i in range(count)
    }
    files = storage.listing(out)
    kept = _plan_rerun(out, files, split, format, overwrite, fingerprint, plans)
    manifest = manifest_name(split, format)
    if manifest in files:  # checked mpmae's by _plan_rerun: the old set is unreadable from here on
        storage.delete_file(_location(out, manifest))
    if kept:
        log.info("%s: resuming an interrupted run, %d of %d shard(s) kept", out, len(kept), count)
        if progress:
            tqdm.write(f"{out}: resuming an interrupted run: {len(kept)} of {count} shard(s) already written",
                       file=sys.stderr)
    origin = shard_metadata(dataset)
    metadata = {**origin, "fingerprint": fingerprint}
    source = str(Path(source_dir).resolve())  # Ray tasks do not start in this process's folder
    jobs = [(positions, _target(out, name)) for name, positions in plans.items() if name not in kept]
    with tqdm(total=len(dataset), unit="tile", desc=f"{split} -> {format}", disable=not progress) as bar:
        bar.update(sum(len(plans[name]) for name in kept))
        if jobs and _use_ray(parallel):
            _write_with_ray(jobs, source, dataset, format, metadata, bar)
        else:
            write = _shard_writer(format, dataset, metadata)
            for positions, target in jobs:
                write(positions, target, bar)
    now = storage.listing(out)
    for stale in sorted(set(_shard_names(files, split, format)) - set(plans)):
        path = _location(out, stale)
        if stale not in now:
            continue  # gone meanwhile
        _check_own(path, now.get(stale), split, format)  # again: it may have been swapped while shards were written
        storage.delete_file(path)
    content = {
        **origin,
        "format": format,
        "fingerprint": fingerprint,
        "run": params,
        "rows": len(dataset),
        "shards": [{"name": name, "rows": len(positions), "bytes": int(now[name].size)}
                   for name, positions in plans.items()],
    }
    storage.write_bytes(_location(out, manifest), json.dumps(content, indent=1).encode(), overwrite=True)
    return [_location(out, name) for name in plans]  # type: ignore[return-value]


def _target(out: str, name: str) -> Path | str:
    """Where a shard is written: the URI, or the absolute local path (for Ray tasks)."""
    return storage.join(out, name) if storage.is_uri(out) else Path(out).resolve() / name
