"""Loaders that deliver raw batches, and the aligned random crop.

The training feeds ship what the file stores (:meth:`MMEarthDataset.read_raw
<mpmae.data.mmearth.MMEarthDataset.read_raw>`: its own dtypes, the selected bands, the per-tile Sentinel-2
level ``s2_l2a``): a *raw batch* ``{modality: torch.Tensor (N, ...), "s2_l2a": bool (N,), "id": list[str]}``,
"id" only when asked for. The training worker moves it to its device, crops it and normalises it there
(:class:`~mpmae.data.normalize.Normalizer`); :func:`iter_ray_batches` does the last step on the CPU for
callers that want the canonical batch of :meth:`MMEarthDataset.read_batch`.

- :func:`ray_dataset`: a Ray Data pipeline over an MMEarth folder (:class:`MMEarthDatasource`: read tasks
  over contiguous runs of split positions, each read block by block through the batched h5 API) or over
  Parquet shards, local or streamed from an object store (Ray's own Parquet reader). Iterate it with
  :func:`iter_raw_batches` (Arrow blocks decoded by zero-copy views, :class:`RawArrowCollate`, then pinned and
  copied to the device by Ray's prefetch threads) or :func:`iter_ray_batches`.
- :func:`ffcv_loader`: FFCV over local ``.beton`` shards, one FFCV ``Loader`` per shard, built once a run.
- :func:`aligned_random_crop`: one offset per sample, shared by all its pixel-level modalities
  (docs/method.md, Encoder and masking), on any dtype.

Raw tensors may share read-only memory (Arrow buffers in Ray's object store, FFCV's reused batch buffers):
nothing writes to them; the crop and the normalisation make new tensors.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.block import BlockMetadata
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.datasource import Datasource, ReadTask

import mpmae.storage as storage
from mpmae.data.mmearth import MMEarthDataset
from mpmae.data.normalize import S2_LEVEL_KEY, Normalizer
from mpmae.data.shards import (
    BLOCK_ROWS,
    ShardError,
    batch_to_table,
    dataset_schema,
    ffcv_field_modality,
    ffcv_quiet,
    find_shards,
    open_shard_set,
    read_shard_metadata,
    table_to_raw,
)
from mpmae.modalities import MODALITIES, ModalitySpec, Selection, resolve_selection

TensorBatch = dict[str, Any]


# -- raw batches as tensors -------------------------------------------------------------------------


def _ids(value: Any) -> list[str]:
    """Tile ids from a list, a numpy string/object array or FFCV's zero-padded uint8 rows."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return [bytes(row).rstrip(b"\0").decode() for row in value]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


def _tensor(value: Any) -> torch.Tensor:
    """A tensor over ``value``'s memory, no copy (read-only memory included: see the module docstring)."""
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # torch warns about read-only arrays, which nothing here writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(value))


def raw_tensors(batch: Mapping[str, Any]) -> TensorBatch:
    """Whatever a loader yields (a raw numpy batch, FFCV fields) as a raw tensor batch: ``s2_l2a`` a bool (N,)
    tensor, ``id`` (last, only if present) a list of str."""
    out: TensorBatch = {key: _tensor(value) for key, value in batch.items() if key not in ("id", S2_LEVEL_KEY)}
    if S2_LEVEL_KEY in batch:
        out[S2_LEVEL_KEY] = _tensor(batch[S2_LEVEL_KEY]).reshape(-1).bool()
    if "id" in batch:
        out["id"] = _ids(batch["id"])
    return out


class RawArrowCollate(ArrowBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: an Arrow batch of raw rows as a raw tensor batch, the tensors
    viewing the block's buffers. Without ``id`` the result is a dict of tensors, which Ray pins and moves to
    the device in its prefetch threads."""

    # Ray annotates the result with a TypeVar bound to nothing else (``CollatedData``): no override matches it.
    def __call__(self, batch: pa.Table) -> TensorBatch:  # type: ignore[override]
        return raw_tensors(table_to_raw(batch))


# -- Ray Data from an MMEarth folder ----------------------------------------------------------------

#: Row runs (blocks) one read task reads at least: each Ray task pays its scheduling and start, and a task's
#: runs are read one after another from one open h5.
RUNS_PER_TASK = 8


@functools.lru_cache(maxsize=4)
def _cached_dataset(root: str, split: str, selection: tuple[tuple[str, tuple[str, ...]], ...]) -> MMEarthDataset:
    """One dataset per worker process: read tasks stay small to ship and the JSON files load once."""
    return MMEarthDataset(root, split=split, modalities=dict(selection))


def _read_blocks(root: str, split: str, selection: tuple[tuple[str, tuple[str, ...]], ...],
                 blocks: list[tuple[int, int]], schema: pa.Schema) -> Iterator[pa.Table]:
    dataset = _cached_dataset(root, split, selection)
    for start, stop in blocks:
        yield batch_to_table(dataset.read_raw(np.arange(start, stop)), schema)


def _row_bytes(schema: pa.Schema) -> int:
    """In-memory bytes of one row's fixed-size list columns."""
    return sum(
        f.type.list_size * f.type.value_type.byte_width for f in schema if pa.types.is_fixed_size_list(f.type)
    )


class MMEarthDatasource(Datasource):
    """An MMEarth split as a Ray Data source of raw rows: each read task covers runs of ``block_rows``
    consecutive split positions and yields one Arrow block per run, read with one batched h5 call per
    modality and no preprocessing (the workers normalise).

    With ``shuffle``, the runs are dealt to tasks in a random order (seeded by ``seed``); rows inside a
    run stay consecutive, so mix further with ``local_shuffle_buffer_size`` when iterating.
    """

    def __init__(self, root: Path | str, split: str = "train", modalities: ModalitySpec = "all_mod",
                 block_rows: int = BLOCK_ROWS, shuffle: bool = False, seed: int | None = None,
                 include_id: bool = True) -> None:
        super().__init__()
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        dataset = MMEarthDataset(root, split=split, modalities=modalities)
        self.root = str(Path(root).resolve())
        self.split = split
        self.selection = tuple(dataset.selection.items())
        self.num_rows = len(dataset)
        self.normalizer = dataset.normalizer
        schema = dataset_schema(dataset, {})
        self.schema = schema if include_id else schema.remove(schema.get_field_index("id"))
        self.row_bytes = _row_bytes(self.schema)
        self.block_rows = block_rows
        self.shuffle = shuffle
        self.seed = seed

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * self.row_bytes

    def _runs(self) -> list[tuple[int, int]]:
        runs = [(s, min(s + self.block_rows, self.num_rows)) for s in range(0, self.num_rows, self.block_rows)]
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(len(runs))
            runs = [runs[i] for i in order]
        return runs

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        runs = self._runs()
        num_tasks = max(1, min(parallelism, math.ceil(len(runs) / RUNS_PER_TASK)))
        tasks = []
        for group in np.array_split(np.arange(len(runs)), num_tasks):
            blocks = [runs[i] for i in group]
            num_rows = sum(stop - start for start, stop in blocks)
            metadata = BlockMetadata(num_rows=num_rows, size_bytes=num_rows * self.row_bytes,
                                     input_files=None, exec_stats=None)
            read = functools.partial(_read_blocks, self.root, self.split, self.selection, blocks, self.schema)
            tasks.append(ReadTask(read, metadata, schema=self.schema, per_task_row_limit=per_task_row_limit))
        return tasks


# -- Ray Data entry point ---------------------------------------------------------------------------


def _is_mmearth_folder(source: Any) -> TypeGuard[Path | str]:
    return (isinstance(source, (str, Path)) and not storage.is_uri(source)
            and any(Path(source).glob("data_*.h5")))


def _parquet_columns(where: str, stored: Selection, modalities: ModalitySpec | None) -> list[str]:
    """The columns to read: all stored modalities, or the requested ones if stored with those bands."""
    if modalities is None:
        return list(stored)
    wanted = resolve_selection(modalities)
    for name, bands in wanted.items():
        if stored.get(name) != bands:
            raise ShardError(
                f"{where}: modality {name!r} with bands {list(bands)} is not in the shards "
                f"(they hold {stored}); write shards with this selection"
            )
    return list(wanted)


@dataclass(frozen=True)
class _ParquetSource:
    """Parquet shards to read: the files (paths inside ``filesystem`` when it is a store's, None: local), where
    they are (for messages) and what their manifest (or, for a list of shards, the first one's metadata) says."""

    files: list[str]
    filesystem: Any
    where: str
    metadata: Mapping[str, Any]

    @property
    def selection(self) -> Selection:
        return {m: tuple(b) for m, b in self.metadata["selection"].items()}


def _parquet_source(source: Path | str | Sequence[Path | str], split: str) -> _ParquetSource:
    if isinstance(source, (str, os.PathLike)):
        shards = open_shard_set(source, split, "parquet")
        paths, where, metadata = shards.paths, shards.folder, shards.manifest
    else:
        paths = find_shards(source, split, "parquet")
        metadata = read_shard_metadata(paths[0])
        where = storage.parent_of(str(paths[0]))
    if not isinstance(paths[0], str):
        return _ParquetSource([str(p) for p in paths], None, where, metadata)
    # The store's filesystem (endpoint and credentials of this environment) travels with Ray's read tasks.
    filesystem = storage.resolve(paths[0])[0]
    return _ParquetSource([storage.resolve(p)[1] for p in paths], filesystem, where, metadata)


def feed_normalizer(source: Path | str | Sequence[Path | str], split: str = "train",
                    modalities: ModalitySpec | None = None) -> Normalizer:
    """The normalisation of what :func:`ray_dataset` yields for the same arguments: the folder's band
    statistics, or the one the shards' manifest records."""
    if _is_mmearth_folder(source):
        return MMEarthDataset(source, split, modalities or "all_mod").normalizer
    parquet = _parquet_source(source, split)
    stored = Normalizer.from_dict(parquet.metadata["normalization"])
    return stored.subset(_parquet_columns(parquet.where, parquet.selection, modalities))


def ray_dataset(
    source: Path | str | Sequence[Path | str],
    split: str = "train",
    modalities: ModalitySpec | None = None,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    include_id: bool = True,
    block_rows: int = BLOCK_ROWS,
    override_num_blocks: int | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of raw rows (the file's dtypes, ``s2_l2a`` with Sentinel-2) from an MMEarth folder or
    from Parquet shards; :func:`feed_normalizer` gives their normalisation.

    ``source`` is an MMEarth folder (read through :class:`MMEarthDatasource`), a folder or object-store URI
    of Parquet shards (those of ``split`` that its manifest lists, checked) or a list of shard paths or
    URIs. Shards in a store are streamed from it by the read tasks. ``modalities`` defaults to
    ``all_mod`` for a folder and to every stored column for shards. ``shuffle`` randomises the order
    of row runs (folder) or files (shards); rows are not shuffled individually. Blocks hold about
    ``block_rows`` rows.
    """
    if _is_mmearth_folder(source):
        datasource = MMEarthDatasource(source, split, modalities or "all_mod", block_rows=block_rows,
                                       shuffle=shuffle, seed=seed, include_id=include_id)
        data = ray.data.read_datasource(datasource, override_num_blocks=override_num_blocks)
        row_bytes = datasource.row_bytes
    else:
        parquet = _parquet_source(source, split)
        columns = _parquet_columns(parquet.where, parquet.selection, modalities)
        extra = ([S2_LEVEL_KEY] if "sentinel2" in columns else []) + (["id"] if include_id else [])
        file_shuffle: ray.data.FileShuffleConfig | Literal["files"] | None = (
            ray.data.FileShuffleConfig(seed=seed) if shuffle and seed is not None else ("files" if shuffle else None))
        data = ray.data.read_parquet(parquet.files, filesystem=parquet.filesystem, shuffle=file_shuffle,
                                     override_num_blocks=override_num_blocks)
        data = data.select_columns(columns + extra)  # pushed down into the Parquet read
        row_bytes = _row_bytes(data.schema(fetch_if_missing=True).base_schema)
    # Ray's default 128 MiB blocks are ~500 tiles of 64 px: a few of them fill a small object store and
    # spill. Blocks of ``block_rows`` keep the pipeline streaming (this dataset's context only).
    data.context.target_max_block_size = max(1, block_rows * row_bytes)
    return data


def iter_raw_batches(
    data: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    prefetch_batches: int = 1,
    device: str | torch.device = "cpu",
) -> Iterable[TensorBatch]:
    """Raw tensor batches from a Ray Dataset or a Ray Train dataset shard. Ray's prefetch threads decode them
    and, for a CUDA ``device`` (datasets without ``id``), pin them and start their copy to the device."""
    cuda = torch.device(device).type == "cuda"
    return data.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=RawArrowCollate(),
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        prefetch_batches=prefetch_batches,
        device=device,
        pin_memory=cuda,
    )


def iter_ray_batches(data: ray.data.Dataset | ray.data.DataIterator, batch_size: int, normalizer: Normalizer,
                     **options: Any) -> Iterator[TensorBatch]:
    """Canonical batches (those of :meth:`MMEarthDataset.read_batch`, as tensors) from a Ray Dataset:
    :func:`iter_raw_batches` (``options`` are its keywords) normalised with ``normalizer``."""
    for raw in iter_raw_batches(data, batch_size, **options):
        yield normalizer(raw)


# -- FFCV -------------------------------------------------------------------------------------------


class FFCVBatches:
    """Raw tensor batches from FFCV ``.beton`` shards, shard after shard (in a new random order every
    epoch with ``shuffle``; items shuffled within a shard too). A batch never spans two shards.

    FFCV compiles each loader's pipeline when it first runs: build this once a run and iterate it every
    epoch (:meth:`set_epoch` picks the epoch, so a resumed run draws the orders it would have drawn). A
    batch's tensors are FFCV's buffers, valid until the next batch is drawn.
    """

    def __init__(self, paths: Sequence[Path | str], batch_size: int, *, num_workers: int, shuffle: bool,
                 seed: int, drop_last: bool, os_cache: bool, modalities: Sequence[str] | None) -> None:
        from ffcv.fields.decoders import NDArrayDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import ToTensor

        self.paths = list(paths)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        keep = None
        if modalities is not None:
            keep = {*modalities, "id", *([S2_LEVEL_KEY] if "sentinel2" in modalities else [])}
        self.loaders: list[Any] = []
        self.names: list[list[str]] = []
        for index, path in enumerate(self.paths):
            fields = {f: ffcv_field_modality(f) for f in Reader(str(path)).handlers}
            if keep is not None and not keep <= set(fields.values()):
                raise ShardError(f"{path}: holds {sorted(fields.values())}, not all of {sorted(keep)}")
            pipelines = {
                f: [NDArrayDecoder(), ToTensor()] if keep is None or name in keep else None
                for f, name in fields.items()
            }
            self.names.append([fields[f] for f, p in pipelines.items() if p is not None])
            order = OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL
            with ffcv_quiet():
                self.loaders.append(Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                                           os_cache=os_cache, order=order, seed=seed + index, drop_last=drop_last,
                                           pipelines=pipelines))

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (its shard order and each shard's item order)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[TensorBatch]:
        order = np.arange(len(self.loaders))
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(order)
        for loader in self.loaders:
            loader.next_epoch = self.epoch  # FFCV seeds a shard's item order with seed + epoch
        self.epoch += 1
        for index in order:
            for fields in self.loaders[index]:
                yield raw_tensors(dict(zip(self.names[index], fields, strict=True)))


def ffcv_loader(
    paths: Path | str | Sequence[Path | str],
    batch_size: int,
    *,
    split: str = "train",
    num_workers: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    os_cache: bool = False,
    modalities: Sequence[str] | None = None,
) -> FFCVBatches:
    """An FFCV loader over local ``.beton`` shards (a folder: those of ``split`` its manifest lists; or a list).

    ``os_cache=False`` makes FFCV read through its own bounded page cache instead of mapping whole
    files, so resident memory does not grow with the dataset. ``modalities`` picks a subset of fields.
    FFCV reads local files only: shards in an object store are refused (copy them to node-local disk).
    """
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    remote = [p for p in given if storage.is_uri(p)]
    if remote:
        raise ShardError(f"{remote[0]}: FFCV reads local shards only; copy them to node-local disk first")
    return FFCVBatches(find_shards(paths, split, "ffcv"), batch_size, num_workers=num_workers,
                       shuffle=shuffle, seed=seed, drop_last=drop_last, os_cache=os_cache,
                       modalities=modalities)


# -- aligned random crop ----------------------------------------------------------------------------


#: gather is not implemented for every unsigned type on every device: a same-size signed view moves the same bits.
_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _crop_rows_cols(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per sample, rows ``rows[n]`` then columns ``cols[n]`` of ``x`` (N, C, H, W): exact slicing, any dtype."""
    if x.dtype in _SIGNED_VIEW:
        return _crop_rows_cols(x.view(_SIGNED_VIEW[x.dtype]), rows, cols).view(x.dtype)
    n, c, _, w = x.shape
    size = rows.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, size, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, size, size))


def aligned_random_crop(batch: Mapping[str, Any], size: int,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
    """Crop every pixel-level modality to ``size`` x ``size`` at one random offset per sample, the same
    for all modalities of that sample (64->56, 128->112). Image-level modalities, ``id`` and
    keys outside the registry pass through untouched. Offsets are drawn on the CPU from ``generator``."""
    pixel = [k for k in batch if k in MODALITIES and MODALITIES[k].level == "pixel"]
    if not pixel:
        return dict(batch)
    shapes = {(batch[k].shape[0], *batch[k].shape[2:]) for k in pixel}
    if len(shapes) != 1 or any(batch[k].dim() != 4 for k in pixel):
        raise ValueError(
            f"pixel modalities must be (N, C, H, W) tensors of one N, H, W; got "
            f"{ {k: tuple(batch[k].shape) for k in pixel} }"
        )
    n, height, width = next(iter(shapes))
    if not 0 < size <= min(height, width):
        raise ValueError(f"crop size {size} does not fit images of {height}x{width}")
    top = torch.randint(0, height - size + 1, (n,), generator=generator)
    left = torch.randint(0, width - size + 1, (n,), generator=generator)
    offsets = torch.arange(size)
    out = dict(batch)
    for key in pixel:
        x = batch[key]
        rows = (top[:, None] + offsets).to(x.device)
        cols = (left[:, None] + offsets).to(x.device)
        out[key] = _crop_rows_cols(x, rows, cols)
    return out
