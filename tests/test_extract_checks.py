"""`cocomix extract` refuses bad input with one line and exit code 2, before any store or worker exists;
and one unit, labelled without Ray, equals the kernel run on its windows."""

import json

import numpy as np
import pytest
import torch
from test_attribution import save_teacher, save_tiny_sae, tiny_gpt2, tiny_sae
from typer.testing import CliRunner

from pipeline.attribution import attribute
from pipeline.cli import app
from pipeline.extract import ExtractConfig, ExtractWorker, UnitFailed, UnitJob, plan
from storage_schemas import LabelSpec, LabelStore, TokenStore, TokenStoreWriter

WINDOW = 16


def make_token_store(path, tokenizer_dir, n_docs=24, seed=0):
    """Random ids (1..299, eos 0) in train and val; a few hundred tokens, not a multiple of the window."""
    rng = np.random.default_rng(seed)
    w = TokenStoreWriter(path, dtype="uint16", eos_id=0, vocab_size=300, tokenizer_dir=tokenizer_dir,
                         chunk_tokens=64)
    for i in range(n_docs):
        w.add_document("val" if i % 6 == 0 else "train", rng.integers(1, 300, size=rng.integers(10, 50)))
    w.finish({"sources": []})
    return path


def cli(*args: str):
    return CliRunner().invoke(app, ["extract", *map(str, args)])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("checks")
    make_token_store(root / "tokens", tokenizer_dir)
    save_teacher(tiny_gpt2(), root / "teacher", tokenizer_dir)
    save_tiny_sae(tiny_sae(), root / "sae")
    return root


def base_args(root, **over):
    args = {"--tokens": root / "tokens", "--teacher": root / "teacher", "--sae": root / "sae", "--layer": 1,
            "--window": WINDOW, "--out": root / "labels", "--no-progress": None} | over
    return [x for k, v in args.items() if v is not False for x in ((k,) if v is None else (k, v))]


def refused(root, *extra, **over):
    r = cli(*base_args(root, **over), *extra)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not (root / "labels").exists() and not list(root.glob(".labels*"))
    return lines[0]


def test_sae_width_mismatch(stores):
    save_tiny_sae(tiny_sae(d_in=16), stores / "sae16")
    assert "SAE d_in 16 does not match the teacher's width 32" in refused(stores, **{"--sae": stores / "sae16"})


def test_window_longer_than_context(stores):
    assert "window 128 is longer than the teacher's context (64)" in refused(stores, **{"--window": 128})


def test_token_id_outside_teacher_vocab(stores, tokenizer_dir):
    save_teacher(tiny_gpt2(vocab_size=200), stores / "teacher200", tokenizer_dir)
    msg = refused(stores, **{"--teacher": stores / "teacher200"})
    top = max(int(TokenStore.open(stores / "tokens").tokens(s)[:].max()) for s in ("train", "val"))
    assert f"token id {top} in" in msg and "outside the teacher's vocabulary (200)" in msg


def test_tokenizer_fingerprint_mismatch(stores, tokenizer_dir):
    other = stores / "teacher_other_tok"
    save_teacher(tiny_gpt2(), other, tokenizer_dir)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["model"]["vocab"]["zzz_extra"] = 299
    (other / "tokenizer.json").write_text(json.dumps(tj))
    msg = refused(stores, **{"--teacher": other})
    assert "the teacher's tokenizer" in msg and "differs from the token store's" in msg


def test_other_mistakes(stores):
    assert "layer 7 is out of range: the teacher has 3 blocks" in refused(stores, **{"--layer": 7})
    assert "--topk 9 exceeds the SAE's 8 active latents" in refused(stores, **{"--topk": 9})
    assert "has no split 'test'" in refused(stores, **{"--splits": "test"})
    assert "neither a local folder nor a cached hub model" in refused(stores, **{"--teacher": "no/such-model"})
    assert "--format must be zarr, parquet or both" in refused(stores, **{"--format": "csv"})
    assert "cannot load an SAE" in refused(stores, **{"--sae": stores / "tokens"})
    assert refused(stores, **{"--shard-chunks": 0}) == "error: --shard-chunks must be at least 1, got 0"


def test_no_tokenizer_files_in_teacher_is_accepted(stores):
    bare = stores / "teacher_bare"
    save_teacher(tiny_gpt2(), bare)  # no tokenizer files: nothing to compare, so no refusal
    spec, split_tokens = plan(ExtractConfig(tokens=stores / "tokens", teacher=str(bare), sae=stores / "sae", layer=1,
                                            out=stores / "unused", window=WINDOW), TokenStore.open(stores / "tokens"))
    assert not (stores / "unused").exists()  # planning writes nothing
    assert spec.window == WINDOW and set(split_tokens) == {"train", "val"}


def worker_for(root, spec, sae_dir, out):
    """A worker (no Ray) on a fresh label store with this spec."""
    tokens = TokenStore.open(root / "tokens")
    LabelStore.create(out, spec, {s: tokens.num_tokens(s) for s in tokens.splits})
    job = UnitJob(tokens=str(root / "tokens"), out=str(out), teacher=str(root / "teacher"), sae=str(sae_dir),
                  layer=1, location="resid_post_mlp", batch_windows=2, device="cpu",
                  threads=torch.get_num_threads())  # leave this process's torch threads as they are
    return ExtractWorker(job), tokens


def test_worker_unit_equals_kernel_on_its_windows(stores, tmp_path):
    tokens = TokenStore.open(stores / "tokens")
    spec = LabelSpec(token_fingerprint=tokens.fingerprint, window=WINDOW, k=4, n_latents=96, chunk_windows=3,
                     sae_k=8, teacher_k=3)
    worker, tokens = worker_for(stores, spec, stores / "sae", tmp_path / "labels")
    teacher, sae = tiny_gpt2(), tiny_sae()  # the same seeds as the saved teacher and SAE
    for unit, start, stop in (worker.store.units("train")[1], worker.store.units("train")[-1]):
        arrays, toks = worker.label("train", unit)
        assert np.array_equal(toks, tokens.tokens("train")[start:stop])
        rows = (stop - start) // WINDOW * WINDOW
        win = torch.from_numpy(toks[:rows].astype(np.int64)).view(-1, WINDOW)
        ref = attribute(teacher, sae, 1, "resid_post_mlp", win, k=4, sae_k=8, teacher_k=3)
        for name in ("ids", "valid", "sae_ids", "teacher_ids"):
            assert np.array_equal(arrays[name][:rows], getattr(ref, name).flatten(0, 1).numpy()), name
        for name in ("scores", "sae_vals", "teacher_logprobs"):
            assert np.array_equal(arrays[name][:rows], getattr(ref, name).flatten(0, 1).numpy().astype(np.float16))
        # rows after the last full window (the split's end) have no window: invalid, zero labels
        assert not arrays["valid"][rows:].any() and not arrays["ids"][rows:].any()
    assert rows < stop - start  # the last unit really had such a tail


def test_failing_batch_names_split_unit_and_windows(stores, tmp_path):
    tokens = TokenStore.open(stores / "tokens")
    spec = LabelSpec(token_fingerprint=tokens.fingerprint, window=WINDOW, k=4, n_latents=96, chunk_windows=3)
    save_tiny_sae(tiny_sae(k=2), tmp_path / "sae2")  # fewer active latents than k: the kernel raises
    worker, _ = worker_for(stores, spec, tmp_path / "sae2", tmp_path / "labels")
    with pytest.raises(UnitFailed, match=r"^train unit 1, windows 3\.\.4: ValueError: k=4 labels cannot exceed"):
        worker.run("train", 1)
    assert worker.store.missing_units()[1] == ("train", 1) and not worker.store.is_complete("train", 1)
