"""Trainer data: windows and targets equal direct slices, labels line up with their tokens, the window
stream is a seeded permutation per epoch, and mismatched stores are refused before any step.

The store builders here are shared by the other trainer tests (`from test_data import ...`)."""

from dataclasses import replace

import numpy as np
import pytest
from conftest import TEXT

from storage_schemas import (
    LabelSpec,
    LabelStore,
    TokenStore,
    TokenStoreWriter,
    UserError,
    validate_store,
)
from trainer.config import TrainConfig
from trainer.data import WindowData, WindowOrder, micro_batch, open_stores

VOCAB = 300


def make_token_store(path, tokenizer_dir, chunk_tokens=64, repeat=3):
    """A real (learnable) corpus: the conftest sentences encoded with the tiny BPE; every 5th doc is val."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    w = TokenStoreWriter(path, dtype="uint16", eos_id=tok.eos_token_id, vocab_size=VOCAB,
                         tokenizer_dir=tokenizer_dir, chunk_tokens=chunk_tokens)
    for i, text in enumerate(TEXT * repeat):
        w.add_document("val" if i % 5 == 0 else "train", np.asarray(tok.encode(text)))
    w.finish({"sources": ["conftest.TEXT"]})
    return TokenStore.open(path)


def label_arrays(tokens: np.ndarray, spec: LabelSpec, seed: int) -> dict:
    """Labels that are a function of the token they label (so alignment is checkable): ids[j, s] =
    (token_j + s) % C; random signed scores; about 80% valid; teacher top-K = the next ids (KD)."""
    rng = np.random.default_rng(seed)
    n, t = len(tokens), tokens.astype(np.int64)[:, None]
    out = {"ids": (t + np.arange(spec.k)) % spec.n_latents,
           "scores": rng.standard_normal((n, spec.k)).astype(np.float16), "valid": rng.random(n) > 0.2}
    if spec.teacher_k:
        out["teacher_ids"] = (t + 1 + np.arange(spec.teacher_k)) % VOCAB
        lp = np.log(np.full((n, spec.teacher_k), 0.9 / spec.teacher_k))
        out["teacher_logprobs"] = lp.astype(np.float16)
    return out


def make_label_store(path, ts: TokenStore, window=16, n_latents=50, k=4, chunk_windows=16, codec="raw",
                     formats=("zarr",), teacher_k=None, skip_units=0, token_fingerprint=None, shard_chunks=1):
    spec = LabelSpec(token_fingerprint=token_fingerprint or ts.fingerprint, window=window, k=k,
                     n_latents=n_latents, chunk_windows=chunk_windows, codec=codec, formats=formats,
                     teacher_k=teacher_k, inputs={"test": "synthetic"}, shard_chunks=shard_chunks)
    store = LabelStore.create(path, spec, {s: ts.num_tokens(s) for s in ts.splits})
    for split in ts.splits:
        toks = ts.tokens(split)[:]
        for unit, a, b in store.units(split)[skip_units:]:
            store.write_unit(split, unit, label_arrays(toks[a:b], spec, seed=unit), toks[a:b], seconds=0.0)
    return LabelStore.open(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("data")
    ts = make_token_store(root / "tokens", tokenizer_dir)
    return root, ts, make_label_store(root / "labels", ts)


def reference_windows(full: np.ndarray, windows, W):
    idx = np.stack([full[i * W : (i + 1) * W] for i in windows]).astype(np.int64)
    nxt = np.array([full[(i + 1) * W] if (i + 1) * W < len(full) else -1 for i in windows])
    return idx, np.concatenate([idx[:, 1:], nxt[:, None]], axis=1)


@pytest.mark.parametrize("chunk_tokens", [64, 50])  # 50: windows straddle chunks (the row-gather path)
def test_windows_and_targets_equal_direct_slices(tmp_path, tokenizer_dir, chunk_tokens):
    ts = make_token_store(tmp_path / "ts", tokenizer_dir, chunk_tokens=chunk_tokens)
    for split in ("train", "val"):
        full, data = ts.tokens(split)[:], WindowData(ts, split, 16)
        assert data.n_windows == len(full) // 16
        windows = np.random.default_rng(0).permutation(data.n_windows)[:9]
        windows[0] = data.n_windows - 1  # the last window: its last target is past the split's end or not
        b = data.batch(windows)
        idx, targets = reference_windows(full, windows, 16)
        assert b["idx"].dtype == np.int64 and np.array_equal(b["idx"], idx)
        assert np.array_equal(b["targets"], targets)
    exact = WindowData(ts, "train", 1)  # W = 1: the last window ends at the split's end
    assert exact.batch(np.array([exact.n_windows - 1]))["targets"].tolist() == [[-1]]


@pytest.mark.parametrize("codec,formats,shard_chunks", [
    ("raw", ("zarr",), 1), ("zstd", ("zarr",), 1), ("raw", ("parquet",), 1),
    ("raw", ("zarr",), 3), ("zstd", ("zarr",), 3), ("raw", ("parquet",), 3)])  # 3 chunks (48 windows) per shard
def test_labels_line_up_with_tokens(tmp_path, tokenizer_dir, codec, formats, shard_chunks):
    ts = make_token_store(tmp_path / "ts", tokenizer_dir)
    ls = make_label_store(tmp_path / "ls", ts, codec=codec, formats=formats, shard_chunks=shard_chunks)
    assert validate_store(ls.path, checksums=False) == []  # the trainer's check before it starts
    data = WindowData(ts, "train", 16, ls, mode="cocomix")
    windows = np.array([40, 0, data.n_windows - 1, 17, 3])  # several chunks, out of order
    b = data.batch(windows)
    assert b["concept_ids"].shape == (5, 16, 4) and b["concept_ids"].dtype == np.int64
    assert np.array_equal(b["concept_ids"], (b["idx"][:, :, None] + np.arange(4)) % 50)
    rows = (windows[:, None] * 16 + np.arange(16)).reshape(-1)
    valid = np.concatenate([ls.array("train", "valid")[r : r + 1] for r in rows]).reshape(5, 16, 1)
    scores = np.concatenate([ls.array("train", "scores")[r : r + 1] for r in rows]).reshape(5, 16, 4)
    assert np.array_equal(b["concept_mask"], valid & (scores > 0))
    assert 0 < b["concept_mask"].mean() < valid.mean()  # non-positive slots are really dropped
    every = WindowData(ts, "train", 16, ls, mode="cocomix", positive_only=False).batch(windows)
    assert np.array_equal(every["concept_mask"], np.broadcast_to(valid, (5, 16, 4)))


def test_kd_batches_carry_teacher_top_k(tmp_path, tokenizer_dir):
    ts = make_token_store(tmp_path / "ts", tokenizer_dir)
    ls = make_label_store(tmp_path / "ls", ts, teacher_k=3)
    b = WindowData(ts, "train", 16, ls, mode="kd").batch(np.array([2, 1]))
    assert "concept_ids" not in b and b["teacher_logprobs"].dtype == np.float32
    assert np.array_equal(b["teacher_ids"], (b["idx"][:, :, None] + 1 + np.arange(3)) % VOCAB)


def test_window_stream_is_a_seeded_permutation_per_epoch():
    order = WindowOrder(10, seed=3)
    epochs = [order.take(10 * e, 10) for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(order.take(7, 6), np.concatenate([epochs[0][7:], epochs[1][:3]]))
    assert np.array_equal(WindowOrder(10, seed=3).take(13, 4), epochs[1][3:7])
    assert not np.array_equal(WindowOrder(10, seed=4).take(0, 10), epochs[0])
    cfg = TrainConfig(batch_size=3, grad_accum=2)  # step s, micro m -> stream [6s + 3m, 6s + 3m + 3)
    assert np.array_equal(micro_batch(order, 1, 1, cfg), order.take(9, 3))


def cocomix_cfg(root, ts_path, ls_path, **kw):
    base = TrainConfig(tokens=str(ts_path), labels=str(ls_path), out=str(root / "run"), mode="cocomix",
                       block_size=16, n_layer=2, n_head=2, n_embd=32, insert_layer=1, k_concept=8)
    return replace(base, **kw)


def test_open_stores_fills_sizes_from_the_stores(stores):
    root, ts, ls = stores
    cfg, _, labels = open_stores(cocomix_cfg(root, ts.path, ls.path))
    assert (cfg.vocab_size, cfg.n_concepts) == (VOCAB, 50) and labels.fingerprint == ls.fingerprint
    ntp, _, none = open_stores(cocomix_cfg(root, ts.path, "", mode="ntp"))
    assert none is None and ntp.n_concepts == 0


def test_refuses_labels_of_another_token_store(stores, tmp_path):
    root, ts, _ = stores
    other = make_label_store(tmp_path / "other", ts, token_fingerprint="f" * 64)
    with pytest.raises(UserError, match=f"token store ffffffffffff.*is {ts.fingerprint[:12]}"):
        open_stores(cocomix_cfg(root, ts.path, other.path))


def test_refuses_window_and_concept_mismatches(stores):
    root, ts, ls = stores
    with pytest.raises(UserError, match="windows of 16 tokens.*block_size is 32"):
        open_stores(cocomix_cfg(root, ts.path, ls.path, block_size=32))
    with pytest.raises(UserError, match="n_concepts 64 differs from the label store's SAE latents 50"):
        open_stores(cocomix_cfg(root, ts.path, ls.path, n_concepts=64))
    with pytest.raises(UserError, match="cocomix mode needs concept labels"):
        open_stores(cocomix_cfg(root, ts.path, ""))
    with pytest.raises(UserError, match="kd mode needs the teacher's top-K"):
        open_stores(cocomix_cfg(root, ts.path, ls.path, mode="kd"))
    with pytest.raises(UserError, match="k_concept 64 is larger than n_concepts 50"):
        open_stores(cocomix_cfg(root, ts.path, ls.path, k_concept=64))  # n_concepts filled, then checked
    with pytest.raises(UserError, match="insert_layer 2 is out of range for a 2-layer"):
        cocomix_cfg(root, ts.path, ls.path, insert_layer=2)


def test_refuses_incomplete_label_store_and_missing_val(stores, tmp_path):
    root, ts, _ = stores
    partial = make_label_store(tmp_path / "partial", ts, skip_units=1)
    with pytest.raises(UserError, match=r"incomplete \(\d+ units missing, first train-000000\)"):
        open_stores(cocomix_cfg(root, ts.path, partial.path))
    W = ts.num_tokens("val") + 1  # the train split has windows this long, the val split none
    with pytest.raises(UserError, match=f"no val windows of {W} tokens: set eval_windows=0"):
        open_stores(cocomix_cfg(root, ts.path, "", mode="ntp", block_size=W))
    with pytest.raises(UserError, match="fewer than one window of block_size 100000"):
        open_stores(cocomix_cfg(root, ts.path, "", mode="ntp", block_size=100_000))
