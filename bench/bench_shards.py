"""Label stores at billions of tokens (issue 14, item 4): files per billion tokens, and the trainer's label
reads from a sharded store against today's layout, side by side in one run.

Two raw label stores hold the same synthetic labels (ids, scores, valid; 1024-token windows, 64 windows
per chunk, ROWS rows written unit by unit with LabelStore.write_unit): today's layout (one file per
chunk) and --shard-chunks SHARD (one file per SHARD chunks). The reader is trainer.data.WindowReader over
LabelStore.array, what WindowData uses each step: random batches of whole windows, fancy-indexed out of
memory-mapped chunks (a sharded chunk is a view into its shard file's map). Rounds alternate between the
layouts (and which goes first) so both see the same machine load; the median round counts. Target:
sharded / today ~1.0x.

Files are counted from the layout (LabelSpec.files: one file per array per unit, plus each unit's
completion record) and checked against the files the two bench stores really hold.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

W, CHUNK_WINDOWS, SHARD = 1024, 64, 16
ROWS = 64 * CHUNK_WINDOWS * W  # 4.2M rows: 64 chunks, 4 shards of 16
K, C = 4, 32768
BATCH, BATCHES, ROUNDS = 32, 150, 7
NAMES = ("ids", "scores", "valid")
TARGET = 1.0


def labels(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, C, (rows, K), dtype=np.uint16), "valid": rng.random(rows) > 0.1,
            "scores": rng.standard_normal((rows, K)).astype(np.float16)}


def make_store(path: Path, arrays: dict[str, np.ndarray], shard_chunks: int):
    """A complete raw label store of these arrays, written unit by unit as extraction writes it."""
    from storage_schemas import LabelSpec, LabelStore

    spec = LabelSpec(token_fingerprint="bench", window=W, k=K, n_latents=C, chunk_windows=CHUNK_WINDOWS,
                     shard_chunks=shard_chunks)
    store = LabelStore.create(path, spec, {"train": ROWS})
    for unit, a, b in store.units("train"):
        store.write_unit("train", unit, {n: v[a:b] for n, v in arrays.items()}, np.zeros(b - a), seconds=0.0)
    store.consolidate()
    return LabelStore.open(path)


def data_files(store) -> int:
    """Files the store holds beyond its metadata (manifest, zarr.json): what LabelSpec.files counts."""
    return sum(1 for f in store.path.rglob("*") if f.is_file() and f.name not in ("manifest.json", "zarr.json"))


def read_rounds(stores: dict, batches: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of one pass over the batches, per store; rounds alternate between the
    stores. CPU time (page faults included) is the steadier measure on a shared machine."""
    from trainer.data import WindowReader

    readers = {k: {n: WindowReader(s.array("train", n), W) for n in NAMES} for k, s in stores.items()}
    seconds = {k: [] for k in stores}
    for r in range(ROUNDS + 1):
        for k, rd in sorted(readers.items(), reverse=r % 2 == 1):  # each layout goes first every other round
            t0, c0 = time.perf_counter(), time.process_time()
            for w in batches:
                for n in NAMES:
                    rd[n](w)
            if r:  # round 0 opens the maps and warms the page cache
                seconds[k].append((time.perf_counter() - t0, time.process_time() - c0))
    return {k: tuple(np.median(np.array(v), axis=0).tolist()) for k, v in seconds.items()}


def same_batches(stores: dict, batches: list[np.ndarray]) -> bool:
    from trainer.data import WindowReader

    a, b = (stores[k] for k in ("today", "sharded"))
    return all(np.array_equal(WindowReader(a.array("train", n), W)(w), WindowReader(b.array("train", n), W)(w))
               for w in batches[:5] for n in NAMES)


def file_rows(stores: dict) -> list[tuple]:
    """Files per billion tokens of both layouts, with and without the teacher's top-32 (KD)."""
    import dataclasses

    from storage_schemas import LabelSpec

    rows = []
    for name, store in stores.items():
        counted, expected = data_files(store), store.spec.files(ROWS)
        assert counted == expected, f"{store.path}: {counted} files, the layout says {expected}"
        spec = LabelSpec(token_fingerprint="t", window=W, k=K, n_latents=C, shard_chunks=store.spec.shard_chunks)
        kd = dataclasses.replace(spec, teacher_k=32)
        layout = "unsharded" if spec.shard_chunks == 1 else f"--shard-chunks {spec.shard_chunks}"
        rows.append((f"files per 1B tokens, {name}", f"{spec.files(10**9):,}", "files",
                     f"{layout}, {W}-token windows x {CHUNK_WINDOWS} per chunk, ids+scores+valid+records; "
                     f"{kd.files(10**9):,} with the teacher's top-32, {kd.files(20 * 10**9):,} at 20B tokens; "
                     f"bench store: {counted} files"))
    big = LabelSpec(token_fingerprint="t", window=W, k=K, n_latents=C, teacher_k=32, shard_chunks=64)
    rows.append(("files per 1B tokens, --shard-chunks 64", f"{big.files(10**9):,}", "files",
                 f"with the teacher's top-32; {big.files(20 * 10**9):,} at 20B tokens (unit = 4.2M tokens)"))
    return rows


def main() -> list[tuple]:
    """Rows (name, value, unit, note) for `make bench`."""
    root = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        arrays = labels(ROWS)
        stores = {"today": make_store(root / "today", arrays, 1), "sharded": make_store(root / "sharded", arrays, SHARD)}
        del arrays
        n_windows = ROWS // W
        batches = [np.random.default_rng(i).choice(n_windows, BATCH, replace=False) for i in range(BATCHES)]
        assert same_batches(stores, batches), "the two layouts read different labels"
        t = read_rounds(stores, batches)
        per_row = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in stores["today"].spec.arrays().values())
        nbytes = BATCHES * BATCH * W * per_row
        what = f"{BATCH} random windows of {W} per batch, ids+scores+valid, {ROWS / 1e6:.1f}M-row raw store"
        (wall, cpu), (wall_s, cpu_s) = t["today"], t["sharded"]
        return [("label reads, today's layout", f"{nbytes / wall / 1e6:,.0f}", "MB/s",
                 f"trainer.data.WindowReader, {what}, one file per chunk; {nbytes / cpu / 1e6:,.0f} MB per CPU s"),
                ("label reads, sharded", f"{nbytes / wall_s / 1e6:,.0f}", "MB/s",
                 f"same labels and windows, {SHARD} chunks per shard file, chunks memory-mapped in place; "
                 f"{nbytes / cpu_s / 1e6:,.0f} MB per CPU s"),
                ("ratio sharded / today", f"{wall / wall_s:.2f}", "x",
                 f"target ~{TARGET}; wall time, median of {ROUNDS} alternating rounds; "
                 f"CPU time {cpu / cpu_s:.2f}x")] + file_rows(stores)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for row in main():
        print(" | ".join(map(str, row)))
