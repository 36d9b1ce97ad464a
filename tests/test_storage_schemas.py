import json

import numpy as np
import pytest

from storage_schemas import (
    LabelSpec,
    LabelStore,
    StoreError,
    TokenStore,
    TokenStoreWriter,
    store_info,
    tokenizer_fingerprint,
    validate_store,
)


def make_token_store(path, tokenizer_dir, docs, chunk_tokens=64, split_of=lambda i: "train"):
    w = TokenStoreWriter(path, dtype="uint16", eos_id=0, vocab_size=300, tokenizer_dir=tokenizer_dir,
                         chunk_tokens=chunk_tokens)
    for i, d in enumerate(docs):
        w.add_document(split_of(i), np.asarray(d))
    return w.finish({"sources": []})


def random_docs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 300, size=rng.integers(5, 40)) for _ in range(n)]


def test_token_store_round_trip_and_zero_copy(tmp_path, tokenizer_dir):
    docs = random_docs()
    make_token_store(tmp_path / "ts", tokenizer_dir, docs, split_of=lambda i: "val" if i % 5 == 0 else "train")
    ts = TokenStore.open(tmp_path / "ts")
    for split, keep in (("train", lambda i: i % 5 != 0), ("val", lambda i: i % 5 == 0)):
        expect = np.concatenate([np.append(d, 0) for i, d in enumerate(docs) if keep(i)])
        assert np.array_equal(ts.tokens(split)[:], expect)
        off = ts.doc_offsets(split)
        assert off[-1] == len(expect) and np.all(expect[off[1:] - 1] == 0)
    view = ts.tokens("train")[3:40]
    assert isinstance(view.base, np.memmap) or isinstance(view, np.memmap)  # zero copy inside one chunk
    assert np.array_equal(ts.window("train", 1, 16), ts.tokens("train")[16:32])
    assert validate_store(tmp_path / "ts") == []
    assert not list(tmp_path.glob(".ts.tmp-*"))


def test_token_fingerprint_tracks_tokenizer_and_content(tmp_path, tokenizer_dir):
    docs = random_docs()
    a = make_token_store(tmp_path / "a", tokenizer_dir, docs)
    b = make_token_store(tmp_path / "b", tokenizer_dir, docs)
    assert a["fingerprint"] == b["fingerprint"]
    other_tok = tmp_path / "tok2"
    other_tok.mkdir()
    cfg = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg["model"]["vocab"]["zzz_extra"] = 299
    (other_tok / "tokenizer.json").write_text(json.dumps(cfg))
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(tokenizer_dir)
    c = make_token_store(tmp_path / "c", other_tok, docs)
    assert c["fingerprint"] != a["fingerprint"]
    d = make_token_store(tmp_path / "d", tokenizer_dir, docs[:-1])
    assert d["fingerprint"] != a["fingerprint"]


def test_validate_catches_flipped_byte_and_truncation(tmp_path, tokenizer_dir):
    make_token_store(tmp_path / "ts", tokenizer_dir, random_docs())
    chunk = tmp_path / "ts" / "train" / "tokens" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    problems = validate_store(tmp_path / "ts")
    assert len(problems) == 1 and "c/1" in problems[0] and "checksum" in problems[0]
    chunk.write_bytes(bytes(data[:-4]))
    assert "truncated" in validate_store(tmp_path / "ts")[0]


def test_writer_refuses_existing_and_empty(tmp_path, tokenizer_dir):
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        TokenStoreWriter(tmp_path / "x", dtype="uint16", eos_id=0, vocab_size=300, tokenizer_dir=tokenizer_dir)
    w = TokenStoreWriter(tmp_path / "y", dtype="uint16", eos_id=0, vocab_size=300, tokenizer_dir=tokenizer_dir)
    with pytest.raises(StoreError, match="empty"):
        w.finish({})
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))


def fake_unit(n, k=4, n_latents=50, seed=0):
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, n_latents, (n, k)), "scores": rng.standard_normal((n, k)).astype(np.float16),
            "valid": rng.random(n) > 0.2}


@pytest.mark.parametrize("codec,formats", [("raw", ("zarr",)), ("zstd", ("zarr",)), ("raw", ("parquet",)),
                                            ("raw", ("zarr", "parquet"))])
def test_label_store_round_trip(tmp_path, codec, formats):
    spec = LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50, chunk_windows=2, codec=codec,
                     formats=formats)
    store = LabelStore.create(tmp_path / "ls", spec, {"train": 40, "val": 10})
    assert [u for u, _, _ in store.units("train")] == [0, 1, 2] and store.units("train")[-1][1:] == (32, 40)
    written = {}
    for split in ("train", "val"):
        for unit, a, b in store.units(split):
            arrays = fake_unit(b - a, seed=a + len(split))
            written[(split, unit)] = arrays
            store.write_unit(split, unit, arrays, tokens=np.arange(a, b), seconds=0.1)
    store.consolidate()
    reopened = LabelStore.open(tmp_path / "ls")
    assert reopened.complete and len(reopened.manifest["units"]) == 4
    for (split, unit), arrays in written.items():
        _, a, b = store.units(split)[unit]
        for name, arr in arrays.items():
            assert np.array_equal(reopened.array(split, name)[a:b], arr.astype(spec.arrays()[name][0]))
    assert validate_store(tmp_path / "ls") == []
    assert store_info(tmp_path / "ls")["complete"]


def test_label_store_reopen_same_and_refuse_different(tmp_path):
    spec = LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50, chunk_windows=2)
    LabelStore.create(tmp_path / "ls", spec, {"train": 40})
    assert LabelStore.create(tmp_path / "ls", spec, {"train": 40}).fingerprint == spec.fingerprint
    other = LabelSpec(token_fingerprint="t" * 64, window=16, k=4, n_latents=50, chunk_windows=2)
    assert other.fingerprint != spec.fingerprint
    with pytest.raises(StoreError, match="different label store"):
        LabelStore.create(tmp_path / "ls", other, {"train": 40})


def test_label_validate_names_missing_and_corrupt_units(tmp_path):
    spec = LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50, chunk_windows=2)
    store = LabelStore.create(tmp_path / "ls", spec, {"train": 48})
    for unit, a, b in store.units("train")[:2]:
        store.write_unit("train", unit, fake_unit(b - a), tokens=np.zeros(b - a), seconds=0)
    problems = validate_store(tmp_path / "ls")
    assert len(problems) == 1 and "train-000002" in problems[0] and "incomplete" in problems[0]
    (tmp_path / "ls" / "train" / "scores" / "c" / "1" / "0").unlink()
    assert any("c/1/0: chunk file missing" in p for p in validate_store(tmp_path / "ls"))
    ids = fake_unit(16)
    ids["ids"][3, 0] = 77  # out of range, written as if it were a real label
    ids["valid"][3] = True
    store.write_unit("train", 0, ids, tokens=np.zeros(16), seconds=0)
    assert any("concept id 77" in p for p in validate_store(tmp_path / "ls"))


# -- layouts: today's default, byte for byte; and sharded ------------------------------------------

# Computed with the code before sharding existed (commit 8873543): stores made with default options must
# keep these, or every label store already on disk would be named differently or read differently.
FINGERPRINT_BEFORE_SHARDING = "a135aef8c268bba67778e6852663b38bbd4645a456f7637c48274035e0b501b9"
DEFAULT_FINGERPRINT_BEFORE_SHARDING = "528d2479ede7770c28c7a34b3b88bbb9f9fcc3d4af50b3848044b045c7a4d350"
LISTING_BEFORE_SHARDING = "9e62f01ce5a0a6713e5cbd07fc15f042a67e09c5d7bd49bc1eeec30fae2424f3"


def layout_spec(**over):
    return LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50, chunk_windows=2, sae_k=3,
                     teacher_k=2, inputs={"teacher": "x"}, **over)


def fill_store(path, spec, splits):
    """Every unit of a new store, with arrays drawn from a seed per unit; returns the store, consolidated."""
    store = LabelStore.create(path, spec, splits)
    for split in splits:
        for unit, a, b in store.units(split):
            rng = np.random.default_rng(a + len(split))
            arrays = {n: rng.integers(0, 50, (b - a, *shape)).astype(dt) for n, (dt, shape) in spec.arrays().items()}
            store.write_unit(split, unit, arrays, tokens=np.arange(a, b), seconds=0.0)
    store.consolidate()
    return store


def listing(path) -> str:
    """'relative path, first 16 hex of its sha256' per file (the manifest without its creation time)."""
    import hashlib

    lines = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.name == "manifest.json":
            m = json.loads(data)
            m.pop("created")
            data = json.dumps(m, sort_keys=True).encode()
        lines.append(f"{f.relative_to(path)} {hashlib.sha256(data).hexdigest()[:16]}\n")
    return "".join(lines)


def test_default_layout_and_fingerprints_unchanged_by_sharding(tmp_path):
    import hashlib

    spec = layout_spec()
    assert spec.fingerprint == FINGERPRINT_BEFORE_SHARDING == layout_spec(shard_chunks=4).fingerprint
    assert LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50).fingerprint == \
        DEFAULT_FINGERPRINT_BEFORE_SHARDING
    fill_store(tmp_path / "ls", spec, {"train": 40, "val": 10})
    text = listing(tmp_path / "ls")  # every file's name and bytes, the manifest's included
    assert hashlib.sha256(text.encode()).hexdigest() == LISTING_BEFORE_SHARDING, text
    manifest = json.loads((tmp_path / "ls" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "shard_chunks" not in manifest["spec"]
    old = manifest["spec"]  # as a manifest written before sharding holds it (checked by the listing)
    assert LabelSpec.from_json(old) == spec and spec.to_json() == old


def test_sharded_store_memmaps_what_zarr_reads(tmp_path):
    import zarr

    spec = layout_spec(shard_chunks=3)  # a unit is 3 chunks of 16 rows
    # train: two full shards and a short one (1 chunk of 14 rows); val: one shard shorter than a chunk
    store = fill_store(tmp_path / "ls", spec, {"train": 110, "val": 10})
    assert [b - a for _, a, b in store.units("train")] == [48, 48, 14] and len(store.units("val")) == 1
    assert json.loads((tmp_path / "ls" / "manifest.json").read_text())["format_version"] == 2
    store = LabelStore.open(tmp_path / "ls")
    for split in ("train", "val"):
        for name in spec.arrays():
            arr = store.array(split, name)
            assert np.array_equal(arr.read_all(), zarr.open_array(tmp_path / "ls" / split / name, mode="r")[...])
            assert all(isinstance(arr.chunk(c), np.memmap) for c in range(arr.num_chunks))  # zero copy
            shards = [f for f in (tmp_path / "ls" / split / name / "c").rglob("*") if f.is_file()]
            assert len(shards) == len(store.units(split))  # one file per unit
    assert validate_store(tmp_path / "ls") == []
    assert store_info(tmp_path / "ls")["files"] == 3 * 8 + 1 * 8  # units x (7 arrays + a record)


def test_sharded_reader_reads_a_chunk_zarr_left_out_as_zeros(tmp_path):
    """Zarr leaves an all-fill inner chunk out of a shard unless write_empty_chunks (which write_unit
    sets): a shard written without it still reads as zarr reads it."""
    import zarr

    spec = LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50, chunk_windows=2, shard_chunks=3)
    store = LabelStore.create(tmp_path / "ls", spec, {"train": 96})
    zeros = {n: np.zeros((48, *shape), dt) for n, (dt, shape) in spec.arrays().items()}
    store.write_unit("train", 0, zeros, tokens=np.zeros(48), seconds=0)
    from storage_schemas.io import MISSING, read_shard_index

    f = tmp_path / "ls" / "train" / "valid" / "c" / "0"
    assert (read_shard_index(f, store.shard_layout("train", "valid"), f.stat().st_size) != MISSING).all()
    data = np.arange(48 * 4).reshape(48, 4).astype(np.uint16)
    data[16:32] = 0  # the middle chunk is all fill value
    zarr.open_array(tmp_path / "ls" / "train" / "ids", mode="r+")[48:96] = data
    f = tmp_path / "ls" / "train" / "ids" / "c" / "1" / "0"
    index = read_shard_index(f, store.shard_layout("train", "ids"), f.stat().st_size)
    assert (index[1] == MISSING).all() and (index[[0, 2]] != MISSING).all()
    got = LabelStore.open(tmp_path / "ls").array("train", "ids")
    assert np.array_equal(got[48:96], data) and np.array_equal(got.read_all(), zarr.open_array(f.parents[2])[...])


def test_sharded_store_damage_is_named_and_a_leftover_shard_rewritten(tmp_path):
    spec = LabelSpec(token_fingerprint="t" * 64, window=8, k=4, n_latents=50, chunk_windows=2, shard_chunks=2)
    store = LabelStore.create(tmp_path / "ls", spec, {"train": 72})
    arrays = {u: fake_unit(b - a, seed=u) for u, a, b in store.units("train")}
    for u, a, b in store.units("train"):
        store.write_unit("train", u, arrays[u], tokens=np.zeros(b - a), seconds=0)
    shard = tmp_path / "ls" / "train" / "scores" / "c" / "2" / "0"  # the short last shard: 8 rows
    good = shard.read_bytes()
    shard.write_bytes(good[:-3])
    assert validate_store(tmp_path / "ls") == [f"{shard}: {len(good) - 3} bytes, expected {len(good)} "
                                               "(truncated or foreign)"]
    with pytest.raises(StoreError, match="fails its crc32c"):
        LabelStore.open(tmp_path / "ls").array("train", "scores")[64:72]
    # a write killed halfway left garbage in its shard: the unit, labelled again, rewrites it whole
    store.write_unit("train", 2, arrays[2], tokens=np.zeros(8), seconds=0)
    assert shard.read_bytes() == good and validate_store(tmp_path / "ls") == []
    assert np.array_equal(LabelStore.open(tmp_path / "ls").array("train", "scores")[64:72], arrays[2]["scores"])


def test_sharded_manifest_refused_by_a_reader_of_version_1_only(tmp_path):
    from storage_schemas.io import read_manifest

    LabelStore.create(tmp_path / "ls", layout_spec(shard_chunks=2), {"train": 40})
    with pytest.raises(StoreError, match="has format_version 2; this cocomix reads version 1$"):
        read_manifest(tmp_path / "ls", "cocomix.label_store", 1)
    with pytest.raises(StoreError, match="shard_chunks=0"):
        layout_spec(shard_chunks=0)


def test_files_per_billion_tokens():
    """The counts README and bench quote: 1024-token windows, 64 per chunk."""
    spec = LabelSpec(token_fingerprint="t", window=1024, k=4, n_latents=32768)
    kd = LabelSpec(token_fingerprint="t", window=1024, k=4, n_latents=32768, teacher_k=32)
    assert (spec.files(10**9), kd.files(10**9), kd.files(20 * 10**9)) == (61_036, 91_554, 1_831_056)
    sharded = [LabelSpec(**{**s.to_json(), "formats": ("zarr",), "shard_chunks": 64}) for s in (spec, kd)]
    assert (sharded[0].files(10**9), sharded[1].files(10**9), sharded[1].files(20 * 10**9)) == (956, 1_434, 28_614)
