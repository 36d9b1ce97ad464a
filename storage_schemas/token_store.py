"""Token store: the whole corpus as token ids, split train/val by document.

Layout of a token store folder:
    manifest.json            kind, format version, fingerprint, tokenizer, sources, per-split counts and chunk checksums
    tokenizer/               the tokenizer's files (transformers `save_pretrained` layout)
    <split>/tokens           zarr v3, 1-D uint16|uint32, raw chunks of `chunk_tokens` (memory-mappable)
    <split>/doc_offsets      zarr v3, int64 (documents + 1): document d is tokens[off[d]:off[d+1]] incl. its eos
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from .errors import StoreError
from .io import (
    ChunkedArray,
    chunk_file,
    fingerprint_json,
    fsync_path,
    memmap_chunk,
    read_manifest,
    sha256_file,
    write_json_atomic,
)

KIND = "cocomix.token_store"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the files that define the vocabulary (tokenizer.json, else vocab/merges files)."""
    files = [Path(tokenizer_dir, n) for n in TOKENIZER_FILES if Path(tokenizer_dir, n).is_file()]
    if not files:
        raise StoreError(f"{tokenizer_dir} holds none of {', '.join(TOKENIZER_FILES)}")
    if files[0].name == "tokenizer.json":
        files = files[:1]  # the full definition; the others are redundant when present
    return fingerprint_json({f.name: sha256_file(f) for f in files})


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenStoreWriter:
    """Streams documents into a new token store, built in a temporary folder and renamed on finish."""

    def __init__(self, out_dir: Path, *, dtype: str, eos_id: int, vocab_size: int,
                 tokenizer_dir: Path, chunk_tokens: int = 1 << 20):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise StoreError(f"{self.out_dir} already exists; remove it or choose another --out")
        if dtype not in ("uint16", "uint32") or np.iinfo(dtype).max < vocab_size - 1:
            raise StoreError(f"dtype {dtype} cannot hold a vocabulary of {vocab_size}")
        self.tmp = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.dtype, self.eos_id, self.vocab_size = np.dtype(dtype), eos_id, vocab_size
        self.chunk_tokens = chunk_tokens
        self.group = zarr.open_group(self.tmp, mode="w")  # "w" empties the folder: copy the tokenizer after
        shutil.copytree(tokenizer_dir, self.tmp / "tokenizer")
        self.splits: dict[str, dict] = {}

    def _split(self, name: str) -> dict:
        if name not in self.splits:
            arr = self.group.create_array(
                f"{name}/tokens", shape=(0,), chunks=(self.chunk_tokens,), dtype=self.dtype,
                compressors=None, fill_value=0, config={"write_empty_chunks": True})
            self.splits[name] = {"array": arr, "buffer": [], "buffered": 0, "written": 0, "offsets": [0]}
        return self.splits[name]

    def add_document(self, split: str, ids: np.ndarray) -> None:
        """Append one document's token ids; an eos id is appended after it."""
        s = self._split(split)
        doc = np.empty(len(ids) + 1, self.dtype)
        doc[:-1], doc[-1] = ids, self.eos_id
        s["buffer"].append(doc)
        s["buffered"] += len(doc)
        s["offsets"].append(s["offsets"][-1] + len(doc))
        if s["buffered"] >= self.chunk_tokens:
            self._flush(s, final=False)

    def _flush(self, s: dict, final: bool) -> None:
        """Write whole chunks (and on finish the remainder) so every chunk file is written exactly once."""
        data = np.concatenate(s["buffer"]) if s["buffer"] else np.empty(0, self.dtype)
        n = len(data) if final else len(data) // self.chunk_tokens * self.chunk_tokens
        if n:
            arr, start = s["array"], s["written"]
            arr.resize((start + n,))
            arr[start : start + n] = data[:n]
            s["written"] += n
        s["buffer"], s["buffered"] = [data[n:]], len(data) - n

    def finish(self, extra: dict) -> dict:
        """Flush, checksum, write the manifest, and rename the temporary folder into place."""
        if not any(s["offsets"][-1] for s in self.splits.values()):
            self.abort()
            raise StoreError("no tokens to write: the corpus is empty")
        splits = {name: self._finish_split(name, s) for name, s in self.splits.items()}
        manifest = {
            "kind": KIND, "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
            "eos_id": self.eos_id, "vocab_size": self.vocab_size, "chunk_tokens": self.chunk_tokens,
            "codec": "raw", "tokenizer_fingerprint": tokenizer_fingerprint(self.tmp / "tokenizer"),
            "splits": splits, **extra,
        }
        manifest["fingerprint"] = token_fingerprint(manifest)
        write_json_atomic(self.tmp / "manifest.json", manifest)
        if self.out_dir.exists():
            self.abort()
            raise StoreError(f"{self.out_dir} appeared while writing; remove it or choose another --out")
        os.replace(self.tmp, self.out_dir)
        return manifest

    def _finish_split(self, name: str, s: dict) -> dict:
        self._flush(s, final=True)
        offsets = np.asarray(s["offsets"], np.int64)
        off = self.group.create_array(f"{name}/doc_offsets", shape=offsets.shape, chunks=(max(len(offsets), 1),),
                                      dtype="int64", compressors=None, fill_value=0,
                                      config={"write_empty_chunks": True})
        off[:] = offsets
        arr_dir = self.tmp / name / "tokens"
        n_chunks = -(-s["written"] // self.chunk_tokens)
        files = [chunk_file(arr_dir, c, 1) for c in range(n_chunks)]
        for f in files:
            fsync_path(f)
        return {"tokens": int(s["written"]), "documents": len(offsets) - 1,
                "chunks": [sha256_file(f) for f in files]}

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def token_fingerprint(manifest: dict) -> str:
    """Content fingerprint: tokenizer, dtype, eos and every chunk's checksum (not paths or dates)."""
    keys = ("format_version", "dtype", "eos_id", "vocab_size", "chunk_tokens", "tokenizer_fingerprint")
    splits = {n: {"tokens": s["tokens"], "chunks": s["chunks"]} for n, s in manifest["splits"].items()}
    return fingerprint_json({**{k: manifest[k] for k in keys}, "splits": splits})


class TokenStore:
    """Read-only view of a token store; token reads are zero-copy memory maps of the raw chunks."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.eos_id, self.vocab_size = manifest["eos_id"], manifest["vocab_size"]
        self.chunk_tokens = manifest["chunk_tokens"]
        self.fingerprint, self.tokenizer_fingerprint = manifest["fingerprint"], manifest["tokenizer_fingerprint"]
        self._tokens: dict[str, ChunkedArray] = {}

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        return cls(path, read_manifest(Path(path), KIND, FORMAT_VERSION))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def _check_split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.path} has no split {split!r} (it has {', '.join(self.splits)})")
        return self.manifest["splits"][split]

    def num_tokens(self, split: str) -> int:
        return self._check_split(split)["tokens"]

    def tokens(self, split: str) -> ChunkedArray:
        """All token ids of a split, shape (N,)."""
        if split not in self._tokens:
            n, ct, arr_dir = self.num_tokens(split), self.chunk_tokens, self.path / split / "tokens"
            self._tokens[split] = ChunkedArray(
                n, ct, (), self.dtype, lambda c: memmap_chunk(chunk_file(arr_dir, c, 1), self.dtype, (ct,)),
                cache=1 << 30)  # memmaps cost nothing to keep
        return self._tokens[split]

    def num_windows(self, split: str, window: int) -> int:
        return self.num_tokens(split) // window

    def window(self, split: str, i: int, window: int) -> np.ndarray:
        """Tokens of window i on the grid (offset 0), shape (window,)."""
        return self.tokens(split)[i * window : (i + 1) * window]

    def doc_offsets(self, split: str) -> np.ndarray:
        self._check_split(split)
        return np.asarray(zarr.open_array(self.path / split / "doc_offsets", mode="r")[:])

    @property
    def source_names(self) -> list[str]:
        """A short name per source file, in input order: the file name less its suffix ("austen")."""
        names = [Path(s["path"]).name for s in self.manifest.get("sources", [])]
        short = [n.split(".", 1)[0] or n for n in names]
        return short if len(set(short)) == len(short) else names

    def token_sources(self, split: str) -> np.ndarray | None:
        """(N,) int: the index in `source_names` of the source every token of the split came from;
        None for stores written before the manifest counted documents per source."""
        counts = self.manifest.get("source_documents", {}).get(split)
        if counts is None:
            return None
        offsets = self.doc_offsets(split)
        if sum(counts) != len(offsets) - 1:
            raise StoreError(f"{self.path}: the manifest counts {sum(counts)} {split} documents by source, "
                             f"doc_offsets holds {len(offsets) - 1}")
        doc_src = np.repeat(np.arange(len(counts)), counts)  # documents are stored in input order
        return np.repeat(doc_src, np.diff(offsets))
