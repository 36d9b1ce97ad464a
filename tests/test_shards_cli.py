"""`cocomix shards` on label stores built from known arrays: info, head, validate, stats, export."""

import math
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.concepts import count_labels
from storage_schemas import LabelSpec, LabelStore, TokenStore, TokenStoreWriter

runner = CliRunner()
WINDOW, K, N_LATENTS = 8, 3, 20


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def build_stores(root, tokenizer_dir, formats=("zarr",), codec="raw", seed=0, labels=None, shard_chunks=1):
    """A token store of random ids and a complete label store over it; returns (tokens, labels, arrays).

    arrays[split][name] holds the full known array written unit by unit. `labels(split, n)` may supply them.
    """
    rng = np.random.default_rng(seed)
    w = TokenStoreWriter(root / "tokens", dtype="uint16", eos_id=0, vocab_size=300, tokenizer_dir=tokenizer_dir,
                         chunk_tokens=64)
    for i in range(12):
        w.add_document("val" if i % 4 == 0 else "train", rng.integers(1, 300, size=rng.integers(10, 40)))
    ts = TokenStore.open(root / "tokens") if w.finish({"sources": []}) else None
    spec = LabelSpec(token_fingerprint=ts.fingerprint, window=WINDOW, k=K, n_latents=N_LATENTS, chunk_windows=2,
                     inputs={"tokens_path": str(root / "tokens")}, formats=formats, codec=codec,
                     shard_chunks=shard_chunks)
    sizes = {s: ts.num_tokens(s) for s in ts.splits}
    store = LabelStore.create(root / "labels", spec, sizes)
    arrays = {s: (labels or random_labels)(s, n, rng) for s, n in sizes.items()}
    for split in sizes:
        for unit, a, b in store.units(split):
            store.write_unit(split, unit, {k: v[a:b] for k, v in arrays[split].items()}, ts.tokens(split)[a:b], 0.5)
    store.consolidate()
    return root / "tokens", root / "labels", arrays


def random_labels(split, n, rng):
    valid = rng.random(n) > 0.15
    valid[WINDOW - 1 :: WINDOW] = False  # the last position of a window has no label
    ids = rng.zipf(1.5, size=(n, K)) % N_LATENTS  # skewed, like real concept usage
    return {"ids": ids.astype(np.uint16), "scores": rng.standard_normal((n, K)).astype(np.float16), "valid": valid}


@pytest.fixture
def stores(tmp_path, tokenizer_dir):
    return build_stores(tmp_path, tokenizer_dir)


def reference_counts(arrays, splits):
    """Counter over every label slot of valid rows, plus rows / valid rows / positive slots."""
    counts, rows, valid_rows, positive = Counter(), 0, 0, 0
    for s in splits:
        a = arrays[s]
        for row in range(len(a["valid"])):
            rows += 1
            if a["valid"][row]:
                valid_rows += 1
                counts.update(int(c) for c in a["ids"][row])
                positive += sum(float(x) > 0 for x in a["scores"][row])
    return counts, rows, valid_rows, positive


def test_stats_match_a_reference(stores):
    _, labels, arrays = stores
    store = LabelStore.open(labels)
    for splits in (["train"], ["train", "val"]):
        ref, rows, valid_rows, positive = reference_counts(arrays, splits)
        got = count_labels(store, splits)
        assert {c: int(n) for c, n in enumerate(got.counts) if n} == dict(ref)
        assert (got.rows, got.valid_rows, got.positive_slots) == (rows, valid_rows, positive)
        total = sum(ref.values())
        assert got.entropy == pytest.approx(-sum(n / total * math.log(n / total) for n in ref.values()))
    r = cli("shards", "stats", labels, "--top", "5")
    assert r.exit_code == 0, r.output
    ref, rows, valid_rows, _ = reference_counts(arrays, ["train", "val"])
    assert f"valid positions:    {valid_rows:,}" in r.stdout and f"distinct concepts:  {len(ref)} of 20" in r.stdout
    table = r.stdout.splitlines()[-5:]
    expect = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [(int(t.split()[1]), int(t.split()[2].replace(",", ""))) for t in table] == expect
    val_only = cli("shards", "stats", labels, "--split", "val")
    assert f"positions:          {len(arrays['val']['valid']):,}" in val_only.stdout


def test_stats_plot_writes_a_png(stores, tmp_path):
    _, labels, _ = stores
    r = cli("shards", "stats", labels, "--plot", tmp_path / "plots" / "freq.png")
    assert r.exit_code == 0, r.output
    png = tmp_path / "plots" / "freq.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert [p.name for p in png.parent.iterdir()] == ["freq.png"]


def test_info_and_validate_label_store(stores, tmp_path):
    tokens, labels, _ = stores
    fp = LabelStore.open(labels).fingerprint
    info = cli("shards", "info", labels)
    assert info.exit_code == 0
    for line in (f"fingerprint: {fp}", "codec: raw", "complete: True", "units_missing: 0", "format: cocomix.label_store v1"):
        assert line in info.stdout
    per_token = info.stdout.split("bytes_per_token:\n")[1].splitlines()[:3]
    assert [ln.split(":")[0].strip() for ln in per_token] == ["ids", "scores", "valid"]
    assert cli("shards", "validate", labels, "--tokens", tokens).stdout.strip() == "ok"
    chunk = labels / "train" / "scores" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = cli("shards", "validate", labels, "--tokens", tokens)
    assert r.exit_code == 1 and r.stdout.strip().splitlines() == [f"{chunk}: checksum mismatch (corrupt or rewritten)"]


def test_head_shows_tokens_beside_labels(stores, tokenizer_dir):
    from transformers import AutoTokenizer

    tokens, labels, arrays = stores
    r = cli("shards", "head", labels, "--n", "4", "--offset", "5", "--split", "val")
    assert r.exit_code == 0, r.output
    rows, ts = r.stdout.splitlines()[2:], TokenStore.open(tokens)
    tok, a = AutoTokenizer.from_pretrained(tokenizer_dir), arrays["val"]
    assert len(rows) == 4
    for row, i in zip(rows, range(5, 9), strict=True):
        token_id = int(ts.tokens("val")[i])
        assert row.split()[:2] == [str(i), str(token_id)]
        text = tok.decode([token_id])
        shown = tok.convert_ids_to_tokens(token_id) if "\ufffd" in text else text
        assert f"'{shown}'".replace("\n", "\\n") in row
        assert ("yes" if a["valid"][i] else "no") in row
        assert row.endswith("  ".join(f"{int(c)} ({float(s):+.3g})" for c, s in zip(a["ids"][i], a["scores"][i], strict=True)))


def test_export_round_trip_is_exact(stores, tmp_path):
    tokens, labels, arrays = stores
    pq_out, back = tmp_path / "as_parquet", tmp_path / "back"
    assert cli("shards", "export", labels, "--to", "parquet", "--out", pq_out).exit_code == 0
    r = cli("shards", "export", pq_out, "--to", "zarr", "--out", back, "--codec", "zstd")
    assert r.exit_code == 0, r.output
    src, mid, dst = (LabelStore.open(p) for p in (labels, pq_out, back))
    assert src.fingerprint == mid.fingerprint == dst.fingerprint and dst.spec.codec == "zstd"
    ts = TokenStore.open(tokens)
    for split, arrs in arrays.items():
        for name, arr in arrs.items():
            assert np.array_equal(mid.array(split, name).read_all(), arr)
            assert np.array_equal(dst.array(split, name).read_all(), arr)
        pq_tokens = np.concatenate([pq.read_table(f, columns=["token"]).column("token").to_numpy()
                                    for f in sorted((pq_out / "parquet").glob(f"{split}-*.parquet"))])
        assert np.array_equal(pq_tokens, ts.tokens(split)[:])
    for p in (pq_out, back):
        assert cli("shards", "validate", p, "--tokens", tokens).stdout.strip() == "ok"
    again = cli("shards", "export", labels, "--to", "zarr", "--out", back)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_export_refuses_incomplete_store(tmp_path):
    spec = LabelSpec(token_fingerprint="t" * 64, window=WINDOW, k=K, n_latents=N_LATENTS, chunk_windows=2)
    LabelStore.create(tmp_path / "partial", spec, {"train": 40})
    r = cli("shards", "export", tmp_path / "partial", "--to", "parquet", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "incomplete (3 unit(s) missing" in r.stderr and not (tmp_path / "x").exists()
    r = cli("shards", "stats", tmp_path / "nowhere")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# -- sharded stores -------------------------------------------------------------------------------


def test_every_command_works_on_a_sharded_store(tmp_path, tokenizer_dir):
    tokens, labels, arrays = build_stores(tmp_path, tokenizer_dir, shard_chunks=2)
    store = LabelStore.open(labels)
    assert len(store.units("train")) == -(-store.num_rows("train") // (2 * 2 * WINDOW))  # a unit = 2 chunks
    info = cli("shards", "info", labels)
    assert info.exit_code == 0, info.output
    for line in ("format: cocomix.label_store v2", "shard_chunks: 2", "complete: True"):
        assert line in info.stdout
    assert cli("shards", "validate", labels, "--tokens", tokens).stdout.strip() == "ok"
    ref, rows, valid_rows, positive = reference_counts(arrays, ["train", "val"])
    got = count_labels(store, ["train", "val"])
    assert {c: int(n) for c, n in enumerate(got.counts) if n} == dict(ref) and got.valid_rows == valid_rows
    head = cli("shards", "head", labels, "--n", "3", "--offset", "30")
    assert head.exit_code == 0 and head.stdout.splitlines()[2].split()[0] == "30"
    assert cli("shards", "stats", labels).exit_code == 0
    shard = labels / "train" / "ids" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    shard.write_bytes(bytes(data))
    r = cli("shards", "validate", labels)
    assert r.exit_code == 1 and r.stdout.strip().splitlines() == [f"{shard}: checksum mismatch (corrupt or rewritten)"]


def test_export_reshards_and_back_byte_identical(stores, tmp_path):
    """Today's layout -> 3 chunks per shard -> Parquet -> unsharded again: the same arrays throughout,
    and the last store's chunk files are the first's, byte for byte."""
    tokens, labels, arrays = stores
    sharded, as_parquet, back = tmp_path / "sharded", tmp_path / "pq", tmp_path / "back"
    r = cli("shards", "export", labels, "--to", "zarr", "--shard-chunks", 3, "--out", sharded)
    assert r.exit_code == 0, r.output
    assert cli("shards", "export", sharded, "--to", "parquet", "--out", as_parquet).exit_code == 0
    assert cli("shards", "export", as_parquet, "--to", "zarr", "--shard-chunks", 1, "--out", back).exit_code == 0
    src, mid, pq_store, dst = (LabelStore.open(p) for p in (labels, sharded, as_parquet, back))
    assert src.fingerprint == mid.fingerprint == pq_store.fingerprint == dst.fingerprint
    assert (mid.spec.shard_chunks, pq_store.spec.shard_chunks, dst.spec.shard_chunks) == (3, 3, 1)
    assert len(mid.units("train")) == -(-len(src.units("train")) // 3)
    for split, arrs in arrays.items():
        for name, arr in arrs.items():
            for store in (mid, pq_store, dst):
                assert np.array_equal(store.array(split, name).read_all(), arr)
    for p in (sharded, as_parquet, back):
        assert cli("shards", "validate", p, "--tokens", tokens).stdout.strip() == "ok"
    chunks = lambda root: {str(f.relative_to(root)): f.read_bytes() for f in root.glob("*/*/c/**/*") if f.is_file()}  # noqa: E731
    assert chunks(back) == chunks(labels)


def test_bad_shard_chunks_refused(stores, tmp_path):
    _, labels, _ = stores
    r = cli("shards", "export", labels, "--to", "zarr", "--shard-chunks", 0, "--out", tmp_path / "x")
    assert r.exit_code == 2 and r.stderr.strip() == "error: --shard-chunks must be at least 1, got 0"
    assert not (tmp_path / "x").exists()
