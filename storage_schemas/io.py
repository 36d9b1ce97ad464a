"""Small shared pieces of the on-disk contracts: hashing, atomic JSON, chunked memory-mapped reads."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import StoreError


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_json(obj) -> str:
    """sha256 of the canonical JSON of obj (sorted keys, no whitespace): equal inputs, equal fingerprint."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only: leave no temporary file, and say which file it was
        tmp.unlink(missing_ok=True)
        e.filename = e.filename or str(path)
        raise


def read_manifest(path: Path, kind: str, version: int) -> dict:
    """Read a store's manifest.json and check its kind and format version, naming the file on failure."""
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise StoreError(f"{path} is not a {kind}: {file} does not exist")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{file} is not valid JSON ({e})") from None
    if manifest.get("kind") != kind:
        raise StoreError(f"{path} is not a {kind}: {file} says kind={manifest.get('kind')!r}")
    if manifest.get("format_version") != version:
        raise StoreError(
            f"{file} has format_version {manifest.get('format_version')!r}; "
            f"this cocomix reads version {version}"
        )
    return manifest


def chunk_file(array_dir: Path, chunk: int, ndim: int) -> Path:
    """Path of chunk `chunk` (along axis 0) of a zarr v3 array with the default '/' key encoding."""
    return Path(array_dir, "c", str(chunk), *(["0"] * (ndim - 1)))


def memmap_chunk(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-copy view of a raw (uncompressed) zarr chunk file."""
    expected = int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise StoreError(f"chunk file {path} has {size} bytes, expected {expected}; run `cocomix shards validate`")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class ChunkedArray:
    """Rows [0, n_rows) of an array stored as fixed-size chunks along axis 0.

    Reads never go through zarr per sample: raw chunks are memory-mapped once and sliced (zero copy
    when a slice lies inside one chunk); compressed or Parquet chunks are decoded a chunk at a time
    and the last few are cached.
    """

    def __init__(self, n_rows: int, chunk_rows: int, row_shape: tuple[int, ...], dtype,
                 load_chunk: Callable[[int], np.ndarray], cache: int = 4):
        self.n_rows, self.chunk_rows, self.row_shape = n_rows, chunk_rows, tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self._load, self._cache, self._cache_size = load_chunk, {}, cache

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, *self.row_shape)

    @property
    def num_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def __len__(self) -> int:
        return self.n_rows

    def chunk(self, i: int) -> np.ndarray:
        """Chunk i, trimmed to the rows that exist (the last zarr chunk is padded on disk)."""
        if i not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            rows = min(self.chunk_rows, self.n_rows - i * self.chunk_rows)
            self._cache[i] = self._load(i)[:rows]
        return self._cache[i]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            key = int(key) + self.n_rows if key < 0 else int(key)
            if not 0 <= key < self.n_rows:
                raise IndexError(key)
            return self.chunk(key // self.chunk_rows)[key % self.chunk_rows]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ChunkedArray supports integers and contiguous slices")
        start, stop, _ = key.indices(self.n_rows)
        if stop <= start:
            return np.empty((0, *self.row_shape), self.dtype)
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        if first == last:
            base = first * self.chunk_rows
            return self.chunk(first)[start - base : stop - base]
        parts = []
        for c in range(first, last + 1):
            base = c * self.chunk_rows
            parts.append(self.chunk(c)[max(start, base) - base : min(stop, base + self.chunk_rows) - base])
        return np.concatenate(parts)

    def read_all(self) -> np.ndarray:
        return self[0 : self.n_rows]
