"""Label store: sparse top-k concept labels aligned 1:1 with a token store (row i labels token i).

Layout of a label store folder:
    manifest.json                    kind, format version, fingerprint, spec (everything it hashes), split sizes,
                                     array dtypes and, once consolidated, every unit's completion record
    <split>/<array>                  zarr v3 arrays chunked along rows, one chunk = one work unit; or, with
                                     shard_chunks = N > 1, sharded: one shard file of N chunks = one work unit
    units/<split>-<unit>.json        completion record, written (atomically) only after that unit's data is on disk
    parquet/<split>-<unit>.parquet   optional, one file per unit: token_index, token, ids, scores, valid, ...
Arrays: ids (N,k) uint16|uint32, scores (N,k) float16, valid (N,) bool; optional sae_ids/sae_vals (N,k_sae)
and teacher_ids/teacher_logprobs (N,K).

Files: one per array per unit, one completion record per unit (and one Parquet file per unit), so a store
of T tokens holds ceil(T / unit_rows) x (arrays + 1 [+ 1]) files (`LabelSpec.files`). With 1024-token
windows and 64 windows per chunk, the unsharded layout writes 15,259 units per billion tokens: 61,036
files per billion for ids/scores/valid, 91,554 with the teacher's top-K (1.8 million at 20B tokens);
--shard-chunks 64 divides that by 64 (239 units per billion: 956 or 1,434 files; 28,614 at 20B tokens),
and the trainer still memory-maps every chunk in place (storage_schemas/io.py `ShardedChunks`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from .errors import StoreError
from .io import (
    ChunkedArray,
    ShardedChunks,
    ShardLayout,
    chunk_file,
    fingerprint_json,
    fsync_path,
    memmap_chunk,
    read_manifest,
    sha256_file,
    shard_layout,
    write_json_atomic,
)

KIND = "cocomix.label_store"
FORMAT_VERSION = 1
# Sharded stores say format_version 2 in their manifest, so that a cocomix that predates sharding refuses
# them by name instead of misreading them; the fingerprint keeps hashing FORMAT_VERSION, as it names the
# label set, not how it is stored.
SHARDED_FORMAT_VERSION = 2
STORAGE_FIELDS = ("chunk_windows", "codec", "formats", "shard_chunks")


@dataclass(frozen=True)
class LabelSpec:
    """Everything that determines a label set (hashed into its fingerprint) plus how it is stored."""

    token_fingerprint: str
    """Fingerprint of the token store the labels are aligned with."""
    window: int
    """Length W of the window grid the labels were computed on."""
    k: int
    """Labels per token."""
    n_latents: int
    """Number of SAE latents (concept ids are in [0, n_latents))."""
    inputs: dict = field(default_factory=dict)
    """Teacher, SAE, hook and score definition: whatever else determines the labels."""
    offset: int = 0
    """Offset of the window grid."""
    sae_k: int | None = None
    """Also store the SAE's own top-k code (sae_ids/sae_vals) with this many entries."""
    teacher_k: int | None = None
    """Also store the teacher's top-K next-token log-probabilities (for the KD baseline)."""
    chunk_windows: int = 64
    """Windows per chunk (= per work unit); storage only, not part of the fingerprint."""
    codec: str = "raw"
    """raw (memory-mappable) or zstd (Blosc-zstd, bit-shuffle); storage only."""
    formats: tuple[str, ...] = ("zarr",)
    """zarr and/or parquet; storage only."""
    shard_chunks: int = 1
    """Chunks per zarr shard file (= per work unit); 1: unsharded, today's layout. Storage only."""

    def __post_init__(self):
        if self.shard_chunks < 1 or self.chunk_windows < 1:
            raise StoreError(f"bad label spec: chunk_windows={self.chunk_windows} shard_chunks={self.shard_chunks}")
        if self.codec not in ("raw", "zstd"):
            raise StoreError(f"unknown codec {self.codec!r}: use raw or zstd")
        if not self.formats or set(self.formats) - {"zarr", "parquet"}:
            raise StoreError(f"formats must be zarr and/or parquet, got {self.formats}")
        if self.window < 2 or self.k < 1 or self.n_latents < 1:
            raise StoreError(f"bad label spec: window={self.window} k={self.k} n_latents={self.n_latents}")

    @property
    def ids_dtype(self) -> str:
        return "uint16" if self.n_latents <= 1 << 16 else "uint32"

    @property
    def chunk_rows(self) -> int:
        return self.chunk_windows * self.window

    @property
    def unit_rows(self) -> int:
        """Rows of one work unit: one chunk, or one shard of shard_chunks chunks."""
        return self.chunk_rows * self.shard_chunks

    def files(self, tokens: int) -> int:
        """Data files of a split of `tokens` rows: per unit, one per array, a completion record and
        (with Parquet) a Parquet file; the few zarr.json files and the manifest aside."""
        per_unit = len(self.arrays()) * ("zarr" in self.formats) + 1 + ("parquet" in self.formats)
        return -(-tokens // self.unit_rows) * per_unit

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, row shape) of every array this spec stores."""
        out = {"ids": (self.ids_dtype, (self.k,)), "scores": ("float16", (self.k,)), "valid": ("bool", ())}
        if self.sae_k:
            out |= {"sae_ids": (self.ids_dtype, (self.sae_k,)), "sae_vals": ("float16", (self.sae_k,))}
        if self.teacher_k:
            out |= {"teacher_ids": ("uint32", (self.teacher_k,)),
                    "teacher_logprobs": ("float16", (self.teacher_k,))}
        return out

    @property
    def fingerprint(self) -> str:
        ident = {k: v for k, v in asdict(self).items() if k not in STORAGE_FIELDS}
        return fingerprint_json({"format_version": FORMAT_VERSION, **ident, "arrays": self.arrays()})

    @property
    def format_version(self) -> int:
        """The manifest's format version: unsharded stores keep today's, byte for byte."""
        return SHARDED_FORMAT_VERSION if self.shard_chunks > 1 else FORMAT_VERSION

    def to_json(self) -> dict:
        d = {**asdict(self), "formats": list(self.formats)}
        if self.shard_chunks == 1:  # unsharded manifests stay exactly as they were before sharding existed
            del d["shard_chunks"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> LabelSpec:
        return cls(**{**d, "formats": tuple(d["formats"])})  # no shard_chunks (older manifests): unsharded


class LabelStore:
    """A label store on disk: create or reopen it, write units, read arrays."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.spec = LabelSpec.from_json(manifest["spec"])
        self.fingerprint = manifest["fingerprint"]
        self._arrays: dict[tuple[str, str], ChunkedArray] = {}
        self._layouts: dict[tuple[str, str], ShardLayout] = {}

    @classmethod
    def open(cls, path: Path) -> LabelStore:
        return cls(path, read_manifest(Path(path), KIND, (FORMAT_VERSION, SHARDED_FORMAT_VERSION)))

    @classmethod
    def create(cls, path: Path, spec: LabelSpec, split_tokens: dict[str, int]) -> LabelStore:
        """Create an empty store, or reopen the one already there when it is the same label set."""
        path = Path(path)
        if (path / "manifest.json").exists():
            store = cls.open(path)
            if store.spec != spec:
                raise StoreError(f"{path} holds a different label store (fingerprint {store.fingerprint[:12]}, "
                                 f"asked for {spec.fingerprint[:12]}); choose another --out or remove it")
            if store.manifest["splits"] != _splits(spec, split_tokens):
                raise StoreError(f"{path} holds this label set for other splits ({store.manifest['splits']}); "
                                 f"choose another --out or remove it")
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} exists and is not a label store; choose another --out or remove it")
        path.mkdir(parents=True, exist_ok=True)
        (path / "units").mkdir()
        if "zarr" in spec.formats:
            _create_arrays(path, spec, split_tokens)
        if "parquet" in spec.formats:
            (path / "parquet").mkdir()
        manifest = {"kind": KIND, "format_version": spec.format_version, "fingerprint": spec.fingerprint,
                    "spec": spec.to_json(), "splits": _splits(spec, split_tokens), "units": {},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(path / "manifest.json", manifest)
        return cls(path, manifest)

    # -- units --------------------------------------------------------------------------------------
    def units(self, split: str) -> list[tuple[int, int, int]]:
        """(unit, row_start, row_stop) of every work unit of a split; a unit is one chunk (or one shard) of
        every array, so exactly one writer ever touches each chunk (or shard) file."""
        n, rows = self.num_rows(split), self.spec.unit_rows
        return [(u, u * rows, min((u + 1) * rows, n)) for u in range(-(-n // rows))]

    def num_rows(self, split: str) -> int:
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.path} has no split {split!r} (it has {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]["rows"]

    def record_path(self, split: str, unit: int) -> Path:
        return self.path / "units" / f"{split}-{unit:06d}.json"

    def record(self, split: str, unit: int) -> dict | None:
        p = self.record_path(split, unit)
        return json.loads(p.read_text()) if p.exists() else None

    def is_complete(self, split: str, unit: int) -> bool:
        return self.record_path(split, unit).exists()

    def missing_units(self) -> list[tuple[str, int]]:
        return [(s, u) for s in self.manifest["splits"] for u, _, _ in self.units(s) if not self.is_complete(s, u)]

    @property
    def complete(self) -> bool:
        return not self.missing_units()

    def write_unit(self, split: str, unit: int, arrays: dict[str, np.ndarray], tokens: np.ndarray,
                   seconds: float) -> dict:
        """Write one unit's rows of every array (and its Parquet file), fsync, then its completion record."""
        _, start, stop = self.units(split)[unit]
        expected = self.spec.arrays()
        if set(arrays) != set(expected):
            raise StoreError(f"unit arrays {sorted(arrays)} differ from the store's {sorted(expected)}")
        arrays = {n: np.ascontiguousarray(a, dtype=expected[n][0]) for n, a in arrays.items()}
        for n, a in arrays.items():
            if a.shape != (stop - start, *expected[n][1]):
                raise StoreError(f"unit {split}/{unit}: {n} has shape {a.shape}, expected {(stop - start, *expected[n][1])}")
        checksums = {}
        try:
            if "zarr" in self.spec.formats:
                checksums |= self._write_zarr(split, unit, start, stop, arrays)
            if "parquet" in self.spec.formats:
                checksums["parquet"] = self._write_parquet(split, unit, start, arrays, tokens)
        except OSError as e:  # disk full mid-unit: no record is written, and the error names the store
            e.filename = e.filename or str(self.path / split)
            raise
        record = {"split": split, "unit": unit, "rows": [start, stop], "valid": int(arrays["valid"].sum()),
                  "checksums": checksums, "seconds": round(float(seconds), 3)}
        write_json_atomic(self.record_path(split, unit), record)
        return record

    def _write_zarr(self, split, unit, start, stop, arrays) -> dict[str, str]:
        out = {}
        for name, a in arrays.items():
            arr_dir = self.path / split / name
            f = chunk_file(arr_dir, unit, a.ndim)
            if self.spec.shard_chunks > 1:
                # zarr rewrites a split's last (short) shard by reading it first: a leftover of a killed
                # write would fail that read. The shard is this unit's alone, so it is rewritten whole.
                f.unlink(missing_ok=True)
            # write_empty_chunks is runtime config (not stored): without it, a unit whose rows are all fill
            # values (a split's tail shorter than a window) would get no chunk (or inner chunk) at all
            zarr.open_array(arr_dir, mode="r+").with_config({"write_empty_chunks": True})[start:stop] = a
            fsync_path(f)
            out[name] = sha256_file(f)
        return out

    def _write_parquet(self, split, unit, start, arrays, tokens) -> str:
        n = len(arrays["valid"])
        cols = {"token_index": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "token": pa.array(np.asarray(tokens, dtype=np.uint32))}
        for name, a in arrays.items():
            flat = pa.array(a.reshape(-1))
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, a.shape[1]) if a.ndim == 2 else flat
        f = self.path / "parquet" / f"{split}-{unit:06d}.parquet"
        tmp = f.with_name(f".{f.name}.tmp")
        pq.write_table(pa.table(cols), tmp)
        fsync_path(tmp)
        tmp.replace(f)
        return sha256_file(f)

    def consolidate(self) -> None:
        """Copy every completion record into manifest.json (the driver calls this; workers never touch it)."""
        units = {}
        for s in self.manifest["splits"]:
            for u, _, _ in self.units(s):
                if rec := self.record(s, u):
                    units[f"{s}-{u:06d}"] = rec
        self.manifest["units"] = units
        write_json_atomic(self.path / "manifest.json", self.manifest)

    # -- reads --------------------------------------------------------------------------------------
    def array(self, split: str, name: str) -> ChunkedArray:
        """Rows of one array of a split, read from raw memory maps, zstd chunks, or Parquet files."""
        if name not in self.spec.arrays():
            raise StoreError(f"{self.path} stores no {name!r} (it has {', '.join(self.spec.arrays())})")
        key = (split, name)
        if key not in self._arrays:
            self._arrays[key] = self._open_array(split, name)
        return self._arrays[key]

    def shard_layout(self, split: str, name: str) -> ShardLayout:
        """The shard index layout of a sharded raw array, from its zarr.json (read once per store object)."""
        key = (split, name)
        if key not in self._layouts:
            arr_dir = self.path / split / name
            layout = shard_layout(arr_dir)
            if layout is None or layout.per_shard != self.spec.shard_chunks:
                raise StoreError(f"{arr_dir}/zarr.json is not sharded by {self.spec.shard_chunks} chunks as "
                                 f"{self.path}/manifest.json says; the store was altered")
            self._layouts[key] = layout
        return self._layouts[key]

    def _open_array(self, split: str, name: str) -> ChunkedArray:
        dtype, row_shape = self.spec.arrays()[name]
        dtype, rows, n = np.dtype(dtype).newbyteorder("<"), self.spec.chunk_rows, self.num_rows(split)
        arr_dir = self.path / split / name
        if "zarr" in self.spec.formats and self.spec.codec == "raw" and self.spec.shard_chunks > 1:
            load = ShardedChunks(arr_dir, self.shard_layout(split, name), dtype, (rows, *row_shape))
            return ChunkedArray(n, rows, row_shape, dtype, load, cache=1 << 30)
        if "zarr" in self.spec.formats and self.spec.codec == "raw":
            load = lambda c: memmap_chunk(chunk_file(arr_dir, c, 1 + len(row_shape)), dtype, (rows, *row_shape))  # noqa: E731
            return ChunkedArray(n, rows, row_shape, dtype, load, cache=1 << 30)
        if "zarr" in self.spec.formats:  # zarr reads one inner chunk of a shard without the rest
            z = zarr.open_array(arr_dir, mode="r")
            return ChunkedArray(n, rows, row_shape, dtype, lambda c: z[c * rows : (c + 1) * rows])
        pdir, rows = self.path / "parquet", self.spec.unit_rows  # one Parquet file per unit
        load = lambda c: _parquet_column(pdir / f"{split}-{c:06d}.parquet", name, row_shape, dtype)  # noqa: E731
        return ChunkedArray(n, rows, row_shape, dtype, load)


def _splits(spec: LabelSpec, split_tokens: dict[str, int]) -> dict:
    return {s: {"rows": int(n), "windows": (int(n) - spec.offset) // spec.window} for s, n in split_tokens.items()}


def _create_arrays(path: Path, spec: LabelSpec, split_tokens: dict[str, int]) -> None:
    group = zarr.open_group(path, mode="a")
    compressors = None if spec.codec == "raw" else BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
    for split, n in split_tokens.items():
        for name, (dtype, row_shape) in spec.arrays().items():
            # shards=None writes exactly the metadata of stores made before sharding existed
            shards = (spec.unit_rows, *row_shape) if spec.shard_chunks > 1 else None
            group.create_array(f"{split}/{name}", shape=(n, *row_shape), chunks=(spec.chunk_rows, *row_shape),
                               shards=shards, dtype=dtype, compressors=compressors, fill_value=0,
                               config={"write_empty_chunks": True})


def _parquet_column(file: Path, name: str, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not file.exists():
        raise StoreError(f"{file} is missing; the label store is incomplete (run `cocomix shards validate`)")
    col = pq.read_table(file, columns=[name]).column(name).combine_chunks()
    if row_shape:
        col = col.flatten()
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, *row_shape)
