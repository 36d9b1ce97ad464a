"""Small shared pieces of the on-disk contracts: hashing, atomic JSON, chunked memory-mapped reads
(of plain chunk files, and of the raw inner chunks of zarr v3 shard files)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
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


def read_manifest(path: Path, kind: str, version: int | tuple[int, ...]) -> dict:
    """Read a store's manifest.json and check its kind and format version (one of `version`), naming the
    file on failure."""
    versions = version if isinstance(version, tuple) else (version,)
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise StoreError(f"{path} is not a {kind}: {file} does not exist")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{file} is not valid JSON ({e})") from None
    if manifest.get("kind") != kind:
        raise StoreError(f"{path} is not a {kind}: {file} says kind={manifest.get('kind')!r}")
    if manifest.get("format_version") not in versions:
        raise StoreError(
            f"{file} has format_version {manifest.get('format_version')!r}; "
            f"this cocomix reads version {' or '.join(map(str, versions))}"
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


# -- sharded arrays -------------------------------------------------------------------------------
# A zarr v3 shard file (codec sharding_indexed) is its inner chunks' encoded bytes, then (index_location
# "end", zarr's default) an index: one (offset, nbytes) little-endian uint64 pair per inner chunk in C order
# of the chunk grid, and a crc32c of those pairs when index_codecs say so. With raw inner chunks (a plain
# bytes codec) each chunk's bytes are the array's bytes, so a chunk is a view into a memory map of the file.

MISSING = 2**64 - 1  # the index's (offset, nbytes) of an inner chunk that was never written (all fill value)


@dataclass(frozen=True)
class ShardLayout:
    """What a zero-copy reader needs of a sharded array's codec."""

    per_shard: int
    """Inner chunks per shard (along axis 0; an inner chunk spans the other axes whole)."""
    crc: bool
    """The index ends with a crc32c of its pairs."""

    @property
    def index_nbytes(self) -> int:
        return 16 * self.per_shard + 4 * self.crc


def _raw_bytes(codec: dict) -> bool:
    return codec.get("name") == "bytes" and codec.get("configuration", {}).get("endian", "little") == "little"


def shard_layout(array_dir: Path) -> ShardLayout | None:
    """The shard layout from a zarr v3 array's zarr.json; None when it is not sharded.

    StoreError (naming the file) for a sharded layout this reader does not memory-map: inner chunks that
    are compressed or big-endian, an index at the start of the shard, or inner chunks splitting a row.
    """
    file = Path(array_dir) / "zarr.json"
    meta = json.loads(file.read_text())
    codecs = meta["codecs"]
    if codecs[0]["name"] != "sharding_indexed":
        return None
    cfg, shard_shape = codecs[0]["configuration"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    index = cfg.get("index_codecs", [])
    names = [c.get("name") for c in index]
    inner = cfg["chunk_shape"]
    if (len(codecs) != 1 or [_raw_bytes(c) for c in cfg["codecs"]] != [True] or cfg.get("index_location", "end") != "end"
            or not index or not _raw_bytes(index[0]) or names[1:] not in ([], ["crc32c"]) or inner[1:] != shard_shape[1:]):
        raise StoreError(f"{file}: a shard layout this reader cannot memory-map (expected raw little-endian inner "
                         "chunks spanning whole rows, the index at the end); read it with zarr or re-export it")
    return ShardLayout(per_shard=shard_shape[0] // inner[0], crc=names[1:] == ["crc32c"])


def _crc32c(data: bytes) -> int:
    import google_crc32c  # zarr 3's own crc32c (its Crc32cCodec imports it): no dependency of ours

    return google_crc32c.value(data)


def read_shard_index(path: Path, layout: ShardLayout, size: int) -> np.ndarray:
    """(per_shard, 2) uint64 (offset, nbytes) of every inner chunk of the shard file at path, of `size`
    bytes; StoreError naming the file when it is too short, its crc32c fails, or a chunk lies outside it."""
    n = layout.index_nbytes
    if size < n:
        raise StoreError(f"shard file {path} has {size} bytes, less than its {n}-byte index; "
                         "run `cocomix shards validate`")
    with open(path, "rb") as f:
        f.seek(size - n)
        raw = f.read(n)
    if layout.crc and _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise StoreError(f"shard file {path}: its index fails its crc32c (corrupt); run `cocomix shards validate`")
    index = np.frombuffer(raw[: 16 * layout.per_shard], "<u8").reshape(layout.per_shard, 2)
    written = index[:, 0] != MISSING
    if (index[written, 0] + index[written, 1] > size - n).any():
        raise StoreError(f"shard file {path}: its index points past the chunk data; run `cocomix shards validate`")
    return index


class ShardedChunks:
    """Inner chunk c of a sharded array with raw inner chunks, as a zero-copy view of its shard file.

    Each shard file is memory-mapped once (one map per shard, not per chunk) and its index read once. An
    inner chunk the index marks as never written reads as zeros (the label store's fill value).
    """

    def __init__(self, array_dir: Path, layout: ShardLayout, dtype: np.dtype, chunk_shape: tuple[int, ...]):
        self.array_dir, self.layout, self.dtype, self.chunk_shape = Path(array_dir), layout, np.dtype(dtype), chunk_shape
        self.nbytes = int(np.prod(chunk_shape)) * self.dtype.itemsize
        self._shards: dict[int, tuple[np.memmap, np.ndarray]] = {}

    def _shard(self, s: int) -> tuple[np.memmap, np.ndarray]:
        if s not in self._shards:
            path = chunk_file(self.array_dir, s, len(self.chunk_shape))
            if not path.exists():
                raise StoreError(f"shard file {path} is missing; run `cocomix shards validate`")
            size = path.stat().st_size
            self._shards[s] = (np.memmap(path, np.uint8, mode="r", shape=(size,)),
                               read_shard_index(path, self.layout, size))
        return self._shards[s]

    def __call__(self, c: int) -> np.ndarray:
        data, index = self._shard(c // self.layout.per_shard)
        offset, nbytes = (int(x) for x in index[c % self.layout.per_shard])
        if offset == MISSING:
            return np.zeros(self.chunk_shape, self.dtype)
        if nbytes != self.nbytes:
            raise StoreError(f"{chunk_file(self.array_dir, c // self.layout.per_shard, len(self.chunk_shape))}: "
                             f"inner chunk {c % self.layout.per_shard} has {nbytes} bytes, expected {self.nbytes}")
        return data[offset : offset + nbytes].view(self.dtype).reshape(self.chunk_shape)  # a memmap view: no copy


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
