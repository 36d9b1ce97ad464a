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
