"""Checks and summaries of both kinds of store (what `cocomix shards validate|info` show)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import label_store, token_store
from .errors import StoreError
from .io import chunk_file, sha256_file
from .label_store import LabelStore
from .token_store import TokenStore, token_fingerprint


def store_kind(path: Path) -> str:
    """'token' or 'label', from the manifest; StoreError if the folder is neither."""
    file = Path(path) / "manifest.json"
    try:
        kind = json.loads(file.read_text()).get("kind")
    except FileNotFoundError:
        raise StoreError(f"{path} is not a cocomix store: {file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{file} is not valid JSON ({e})") from None
    kinds = {token_store.KIND: "token", label_store.KIND: "label"}
    if kind not in kinds:
        raise StoreError(f"{path} is not a cocomix store: {file} says kind={kind!r}")
    return kinds[kind]


def validate_store(path: Path, tokens: Path | None = None, checksums: bool = True) -> list[str]:
    """Every problem found in a token or label store (empty list: the store is sound).

    checksums=False runs only the cheap structural checks of a label store (completion records, chunk
    files present with their sizes, manifest agreeing with the records), reading no array data: what
    the trainer checks before it starts. Checksums, id ranges and counts need the full check.
    """
    if store_kind(path) == "token":
        return validate_token_store(TokenStore.open(path))
    return validate_label_store(LabelStore.open(path), TokenStore.open(tokens) if tokens else None, checksums)


def _check_chunk(f: Path, expected_sha: str | None, size: int | None) -> str | None:
    if not f.exists():
        return f"{f}: chunk file missing"
    if size is not None and f.stat().st_size != size:
        return f"{f}: {f.stat().st_size} bytes, expected {size} (truncated or foreign)"
    if expected_sha is not None and sha256_file(f) != expected_sha:
        return f"{f}: checksum mismatch (corrupt or rewritten)"
    return None


def validate_token_store(ts: TokenStore) -> list[str]:
    problems = []
    if token_fingerprint(ts.manifest) != ts.fingerprint:
        problems.append(f"{ts.path}/manifest.json: fingerprint does not match its contents")
    for split, info in ts.manifest["splits"].items():
        arr_dir, size = ts.path / split / "tokens", ts.chunk_tokens * ts.dtype.itemsize
        for c, sha in enumerate(info["chunks"]):
            if p := _check_chunk(chunk_file(arr_dir, c, 1), sha, size):
                problems.append(p)
        if problems:
            continue
        offsets = ts.doc_offsets(split)
        if len(offsets) != info["documents"] + 1 or offsets[-1] != info["tokens"]:
            problems.append(f"{ts.path / split / 'doc_offsets'}: does not match the manifest's counts")
        toks = ts.tokens(split)
        for c in range(toks.num_chunks):
            if (bad := int(toks.chunk(c).max(initial=0))) >= ts.vocab_size:
                problems.append(f"{chunk_file(arr_dir, c, 1)}: token id {bad} >= vocab size {ts.vocab_size}")
    return problems


def validate_label_store(store: LabelStore, tokens: TokenStore | None, checksums: bool = True) -> list[str]:
    spec, problems = store.spec, []
    if spec.fingerprint != store.fingerprint:
        problems.append(f"{store.path}/manifest.json: fingerprint does not match its spec")
    if tokens is not None:
        problems += _check_alignment(store, tokens)
    for split in store.manifest["splits"]:
        for unit, _, _ in store.units(split):
            problems += unit_problems(store, split, unit, checksums)
    return problems


def unit_problems(store: LabelStore, split: str, unit: int, checksums: bool = True) -> list[str]:
    """What is wrong with one unit: no completion record, a record the manifest contradicts, chunk
    files missing or of the wrong size, and (checksums=True) checksums, id range and valid count."""
    rows = store.spec.unit_rows
    start, stop = unit * rows, min((unit + 1) * rows, store.num_rows(split))
    rec, path = store.record(split, unit), store.record_path(split, unit)
    if rec is None:
        return [f"{path}: unit incomplete (no completion record); rerun extraction"]
    listed = store.manifest.get("units", {}).get(f"{split}-{unit:06d}")
    if listed is not None and listed.get("checksums") != rec.get("checksums"):
        # a consolidated manifest lists every unit's checksums: one from another store disagrees
        return [f"{store.path}/manifest.json: its record of {split} unit {unit} differs from {path} "
                "(a manifest from another store?)"]
    return _check_unit(store, split, unit, start, stop, rec, checksums)


def _check_alignment(store: LabelStore, tokens: TokenStore) -> list[str]:
    if tokens.fingerprint != store.spec.token_fingerprint:
        return [f"{store.path}: labels are for token store {store.spec.token_fingerprint[:12]}, "
                f"but {tokens.path} is {tokens.fingerprint[:12]}"]
    return [f"{store.path}: split {s} has {store.num_rows(s)} rows, token store has {tokens.num_tokens(s)} tokens"
            for s in store.manifest["splits"] if s not in tokens.splits or store.num_rows(s) != tokens.num_tokens(s)]


def _check_unit(store: LabelStore, split: str, unit: int, start: int, stop: int, rec: dict,
                checksums: bool) -> list[str]:
    if rec.get("rows") != [start, stop]:
        return [f"{store.record_path(split, unit)}: record is for rows {rec.get('rows')}, expected {[start, stop]}"]
    problems, spec = [], store.spec
    if "zarr" in spec.formats:
        for name, (_, row_shape) in spec.arrays().items():
            size = _raw_size(store, split, name, stop - start) if spec.codec == "raw" else None
            f = chunk_file(store.path / split / name, unit, 1 + len(row_shape))
            if p := _check_chunk(f, rec["checksums"].get(name) if checksums else None, size):
                problems.append(p)
    if "parquet" in spec.formats:
        sha = rec["checksums"].get("parquet") if checksums else None
        if p := _check_chunk(store.path / "parquet" / f"{split}-{unit:06d}.parquet", sha, None):
            problems.append(p)
    if problems or not checksums:
        return problems
    ids, valid = store.array(split, "ids")[start:stop], store.array(split, "valid")[start:stop]
    if valid.any() and (bad := int(ids[valid].max())) >= spec.n_latents:
        problems.append(f"{store.path}/{split} unit {unit}: concept id {bad} >= n_latents {spec.n_latents}")
    if int(valid.sum()) != rec.get("valid"):
        problems.append(f"{store.record_path(split, unit)}: valid count differs from the data")
    return problems


def _raw_size(store: LabelStore, split: str, name: str, rows: int) -> int:
    """Bytes of a raw unit file of `rows` rows: one whole (padded) chunk; or, sharded, every chunk that
    holds rows (zarr writes none past the split's end) and the shard's index."""
    dtype, row_shape = store.spec.arrays()[name]
    chunk = store.spec.chunk_rows * int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    if store.spec.shard_chunks == 1:
        return chunk
    index = store.shard_layout(split, name).index_nbytes  # zarr.json's own word on the index (crc32c or not)
    return -(-rows // store.spec.chunk_rows) * chunk + index


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def store_info(path: Path) -> dict:
    """A summary of a store for `cocomix shards info` (plain data, printed by the CLI)."""
    path = Path(path)
    if store_kind(path) == "token":
        m = TokenStore.open(path).manifest
        return {"kind": "token store", "path": str(path), "fingerprint": m["fingerprint"], "dtype": m["dtype"],
                "eos_id": m["eos_id"], "vocab_size": m["vocab_size"], "chunk_tokens": m["chunk_tokens"],
                "tokenizer": m.get("tokenizer"), "tokenizer_fingerprint": m["tokenizer_fingerprint"],
                "splits": {s: {k: v["tokens"] if k == "tokens" else v[k] for k in ("tokens", "documents")}
                           for s, v in m["splits"].items()},
                "val_fraction": m.get("val_fraction"), "train_fraction": m.get("train_fraction", 1.0),
                "sources": m.get("sources", []), "bytes": _dir_bytes(path)}
    store = LabelStore.open(path)
    spec, total_rows = store.spec, sum(v["rows"] for v in store.manifest["splits"].values())
    per_array = {}
    for split in store.manifest["splits"]:
        for name in spec.arrays():
            if "zarr" in spec.formats:
                per_array[name] = per_array.get(name, 0) + _dir_bytes(path / split / name)
    parquet_bytes = _dir_bytes(path / "parquet") if "parquet" in spec.formats else 0
    missing = store.missing_units()
    return {"kind": "label store", "path": str(path), "fingerprint": store.fingerprint,
            "token_fingerprint": spec.token_fingerprint, "window": spec.window, "k": spec.k,
            "n_latents": spec.n_latents, "codec": spec.codec, "formats": list(spec.formats),
            "chunk_windows": spec.chunk_windows, "shard_chunks": spec.shard_chunks,
            "files": sum(spec.files(v["rows"]) for v in store.manifest["splits"].values()),
            "inputs": spec.inputs, "splits": store.manifest["splits"],
            "arrays": {n: {"dtype": d, "row_shape": list(s)} for n, (d, s) in spec.arrays().items()},
            "bytes_per_token": {n: b / max(total_rows, 1) for n, b in per_array.items()}
            | ({"parquet": parquet_bytes / max(total_rows, 1)} if parquet_bytes else {}),
            "units_total": sum(len(store.units(s)) for s in store.manifest["splits"]),
            "units_missing": len(missing), "complete": not missing}
