"""Where a user's path points: a local folder, or an object store (``s3://``, ``gs://``, whatever
``pyarrow.fs.FileSystem.from_uri`` resolves).

Every path a user gives (data, run storage, exports, sweep folders, plots) goes through this module, so
each command treats ``s3://bucket/x`` like ``/data/x``. Endpoint and credentials come only from the standard
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...), which ``from_uri`` reads (a directly built ``S3FileSystem`` ignores
``AWS_ENDPOINT_URL``), so MinIO or any S3-compatible store works like AWS.

An object store has no rename, but an object appears whole when its upload ends. A set of files (a
shard set, a checkpoint, an export) is therefore made visible by a marker written last, and readers
trust only what a marker lists. Calls to a store are retried with backoff; a store that stays away is
one :class:`StoreUnavailableError` naming the URI.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from mpmae.atomic import atomic_write

T = TypeVar("T")

#: Tries of one store call, and the first pause between them (doubled each time). pyarrow's S3 client
#: retries each call itself too (about 6 s before it gives up on a closed port).
STORE_TRIES = 3
STORE_BACKOFF_S = 1.0


class StorageError(ValueError):
    """A URI that cannot be used (unknown scheme, missing bucket, refused credentials); names the URI."""


class StoreUnavailableError(OSError):
    """The store did not answer after :data:`STORE_TRIES` tries; the message names the URI."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an object store (``s3://bucket/prefix``) rather than a filesystem path."""
    return "://" in str(path)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base`` and ``parts`` joined with ``/`` (a URI keeps its ``scheme://``; a local path stays local)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(path: str | os.PathLike[str]) -> str:
    """The last part of a path or URI (``s3://b/runs/demo/`` -> ``demo``)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent_of(path: str) -> str:
    """The folder that holds ``path`` (a URI's parent is a URI)."""
    if not is_uri(path):
        return str(Path(path).parent)
    return path.rstrip("/").rsplit("/", 1)[0]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@functools.lru_cache(maxsize=16)
def _store(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def resolve(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it of a local path or a URI.

    One filesystem per ``scheme://bucket`` is kept (from_uri looks up an S3 bucket's region each time).
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    uri = str(path)
    parts = urlsplit(uri)
    if not parts.netloc:
        raise StorageError(f"{uri}: not a URI of the form scheme://bucket/path")
    try:
        store = _store(f"{parts.scheme}://{parts.netloc}")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        raise StorageError(f"{uri}: {_first_line(err)}") from None
    except OSError as err:
        raise _refusal(uri, err) from None
    return store, f"{parts.netloc}{parts.path}".rstrip("/")


def _refusal(uri: str, err: OSError) -> StorageError | StoreUnavailableError:
    """What a store's error means for the user, as one line naming ``uri``."""
    text = _first_line(err)
    squeezed = text.lower().replace("_", "").replace(" ", "")
    if any(word in squeezed for word in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")):
        return StorageError(f"{uri}: access refused with the credentials of the environment ({text})")
    if "nosuchbucket" in squeezed or "bucketdoesnotexist" in squeezed:
        return StorageError(f"{uri}: the bucket does not exist ({text})")
    return StoreUnavailableError(f"{uri}: the store did not answer ({text})")


def _retrying(uri: str, call: Callable[[], T]) -> T:
    """``call()``, retried with backoff while the store does not answer; a refusal is not retried, nor is
    anything on a local disk."""
    if not is_uri(uri):
        return call()
    pause = STORE_BACKOFF_S
    for attempt in range(STORE_TRIES):
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as err:
            problem = _refusal(uri, err)
            if isinstance(problem, StorageError) or attempt == STORE_TRIES - 1:
                if isinstance(problem, StoreUnavailableError):
                    problem = StoreUnavailableError(f"{problem} after {STORE_TRIES} tries")
                raise problem from None
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def check_reachable(path: str, key: str) -> None:
    """For a URI, that its bucket exists and the environment's credentials may list it: one line naming
    ``key`` and the URI otherwise. Local paths pass (the callers check them their own way)."""
    if not is_uri(path):
        return
    store, inner = resolve(path)
    bucket = inner.split("/", 1)[0]
    try:
        info = _retrying(path, lambda: store.get_file_info(bucket))
    except (StorageError, StoreUnavailableError) as err:
        raise StorageError(f"{key}: {err}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{key}: {path}: the bucket {bucket!r} does not exist")
    try:
        _retrying(path, lambda: store.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))
    except (StorageError, StoreUnavailableError) as err:
        raise StorageError(f"{key}: {err}") from None


def info(path: str) -> pafs.FileInfo:
    store, inner = resolve(path)
    return _retrying(str(path), lambda: store.get_file_info(inner))


def exists(path: str | os.PathLike[str]) -> bool:
    return info(str(path)).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike[str]) -> bool:
    return info(str(path)).type == pafs.FileType.Directory


def is_file(path: str | os.PathLike[str]) -> bool:
    return info(str(path)).type == pafs.FileType.File


def listing(folder: str | os.PathLike[str]) -> dict[str, pafs.FileInfo]:
    """The entries directly in ``folder`` by name (files and folders); empty when it does not exist."""
    store, inner = resolve(folder)
    found = _retrying(str(folder), lambda: store.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))
    return {entry.base_name: entry for entry in found}


def file_sizes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """The files directly in ``folder`` and their sizes."""
    return {name: int(e.size) for name, e in listing(folder).items() if e.type == pafs.FileType.File}


def read_bytes(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The content of a file (at most ``limit`` bytes); FileNotFoundError naming it when there is none."""
    store, inner = resolve(path)

    def read() -> bytes:
        with store.open_input_stream(inner) as stream:
            return stream.read() if limit is None else stream.read(limit)

    try:
        return _retrying(str(path), read)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None


def write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> None:
    """Write a whole file (atomically: a local file is renamed into place, an object appears when complete).

    Without ``overwrite``, an existing file is refused, naming it.
    """
    if not overwrite and exists(path):
        raise FileExistsError(f"{path} already exists; nothing was overwritten")
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
        return
    store, inner = resolve(path)

    def write() -> None:
        with store.open_output_stream(inner) as stream:
            stream.write(data)

    _retrying(str(path), write)


def make_dirs(path: str | os.PathLike[str]) -> None:
    store, inner = resolve(path)
    _retrying(str(path), lambda: store.create_dir(inner, recursive=True))


def delete_file(path: str | os.PathLike[str]) -> None:
    store, inner = resolve(path)
    _retrying(str(path), lambda: store.delete_file(inner))


def download(source: str, target: Path, names: Iterable[str] | None = None) -> Path:
    """Copy the files directly in folder ``source`` (or only ``names``) into local folder ``target``."""
    store, inner = resolve(source)
    wanted = sorted(file_sizes(source)) if names is None else list(names)
    target.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        _copy(join(source, name), f"{inner}/{name}", store, str(target / name), pafs.LocalFileSystem())
    return target


def _copy(uri: str, source: str, source_store: pafs.FileSystem, target: str, target_store: pafs.FileSystem) -> None:
    def copy() -> None:
        pafs.copy_files(source, target, source_filesystem=source_store, destination_filesystem=target_store)

    _retrying(uri, copy)


def upload(folder: Path, target: str, *, last: Sequence[str] = (), overwrite: bool = False) -> str:
    """Copy the files of local ``folder`` (recursively) under ``target``, the names in ``last`` after the rest
    (markers: their presence means the rest is whole). Without ``overwrite`` nothing there is replaced:
    an existing file refuses the whole upload before anything is written."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda name: name in last)
    if not overwrite:
        taken = [name for name in files if exists(join(target, name))]
        if taken:
            raise FileExistsError(f"{join(target, taken[0])} already exists; nothing was overwritten")
    if not is_uri(target):
        for name in files:
            destination = Path(target, name)
            destination.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(destination, functools.partial(shutil.copyfile, folder / name))
        return target
    store, inner = resolve(target)
    for name in files:
        _copy(join(target, name), str(folder / name), pafs.LocalFileSystem(), f"{inner}/{name}", store)
    return target


@contextmanager
def output_folder(target: str | os.PathLike[str], *, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local folder to write ``target``'s files into: ``target`` itself when local (created), else a
    temporary folder uploaded to the URI when the block ends without error (``last`` uploaded last;
    nothing already there is replaced)."""
    if not is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="mpmae-out-") as tmp:
        yield Path(tmp)
        upload(Path(tmp), str(target), last=last)


@contextmanager
def local_folder(source: str | os.PathLike[str], names: Iterable[str] | None = None) -> Iterator[Path]:
    """A local folder holding ``source``'s files: ``source`` itself when local, else a temporary download
    of its files (or only ``names``), removed when the block ends."""
    if not is_uri(source):
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="mpmae-in-") as tmp:
        yield download(str(source), Path(tmp), names)


def renamed(err: BaseException, local: Path, uri: str) -> str:
    """``err``'s message with the temporary folder ``local`` shown as the URI it was downloaded from."""
    return str(err).replace(str(local), str(uri).rstrip("/"))


def absolute(path: str | os.PathLike[str]) -> str:
    """A URI as is, a local path made absolute (Ray and Tune run code in other working directories)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())
