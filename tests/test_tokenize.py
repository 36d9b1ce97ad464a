"""The tokenize stage through the CLI: round trip, split determinism, tokenizer training, bad inputs."""

import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEXT
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tokenize import TokenizeConfig, find_sources, iter_corpus, split_of, tokenize_corpus
from storage_schemas import TokenStore

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path, docs, gz=False):
    lines = "".join(json.dumps(d) + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(lines, mtime=0) if gz else lines)


def make_corpus(root):
    """One file of each kind; returns the documents in the order the reader must yield them."""
    root.mkdir()
    (root / "a.txt").write_text("A plain text document.\nWith two lines, é and ü.")
    write_jsonl(root / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(TEXT[:6])])
    write_jsonl(root / "c.jsonl.gz", [{"text": t} for t in TEXT[6:12]], gz=True)
    pq.write_table(pa.table({"text": TEXT[12:20], "id": [f"d{i}" for i in range(8)]}), root / "d.parquet")
    (root / "notes.md").write_text("ignored: not a corpus file")
    return ["A plain text document.\nWith two lines, é and ü.", *TEXT[:20]]


def store_docs(ts, split):
    """Documents of a split as id arrays, eos stripped, plus whether each ended with eos."""
    toks, off = ts.tokens(split)[:], ts.doc_offsets(split)
    docs = [toks[a:b] for a, b in zip(off[:-1], off[1:], strict=True)]
    return [d[:-1] for d in docs], all(d[-1] == ts.eos_id for d in docs)


def test_round_trip_matches_direct_encode(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    texts = make_corpus(tmp_path / "corpus")
    r = cli("tokenize", "--input", tmp_path / "corpus", "--tokenizer", tokenizer_dir, "--out", tmp_path / "ts",
            "--val-fraction", "0.3", "--chunk-tokens", "64")
    assert r.exit_code == 0, r.output
    ts = TokenStore.open(tmp_path / "ts")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = TokenizeConfig(inputs=(tmp_path / "corpus",), out=tmp_path / "unused", tokenizer=str(tokenizer_dir),
                         val_fraction=0.3)
    tags = [tag for tag, _ in iter_corpus(cfg, find_sources(cfg.inputs))]
    splits = [s for s, _ in tags]
    assert ts.dtype == np.uint16 and ts.eos_id == tok.eos_token_id and ts.vocab_size == len(tok)
    for split in ("train", "val"):
        docs, eos_after_each = store_docs(ts, split)
        expect = [tok(t, add_special_tokens=False)["input_ids"] for t, s in zip(texts, splits, strict=True)
                  if s == split]
        assert eos_after_each and len(docs) == len(expect) > 0
        assert all(np.array_equal(d, e) for d, e in zip(docs, expect, strict=True))
    assert [s["path"].rsplit("/", 1)[1] for s in ts.manifest["sources"]] == ["a.txt", "b.jsonl", "c.jsonl.gz",
                                                                             "d.parquet"]
    # every token knows its source file (the corpus's domains, for per-domain evaluation)
    assert ts.source_names == ["a", "b", "c", "d"]
    for split in ("train", "val"):
        off, src = ts.doc_offsets(split), ts.token_sources(split)
        assert len(src) == ts.num_tokens(split)
        want = [f for s, f in tags if s == split]
        assert [set(src[a:b].tolist()) for a, b in zip(off[:-1], off[1:], strict=True)] == [{f} for f in want]
    again = cli("tokenize", "--input", tmp_path / "corpus", "--tokenizer", tokenizer_dir, "--out",
                tmp_path / "ts", "--val-fraction", "0.3", "--chunk-tokens", "64")
    assert again.exit_code == 0 and "up to date" in again.stderr


def test_split_is_by_document_key_and_seed(tmp_path, tokenizer_dir):
    keys = [f"doc-{i}" for i in range(2000)]
    val = [k for k in keys if split_of(k, 7, 0.1) == "val"]
    assert 150 < len(val) < 250  # about 10%
    assert val == [k for k in keys if split_of(k, 7, 0.1) == "val"]  # deterministic
    assert val != [k for k in keys if split_of(k, 8, 0.1) == "val"]  # the seed matters
    # Adding a file moves no existing document between splits.
    root = tmp_path / "c"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(TEXT[:16])])
    one = tokenize_corpus(TokenizeConfig(inputs=(root,), out=tmp_path / "one", tokenizer=str(tokenizer_dir),
                                         val_fraction=0.4, progress=False))
    write_jsonl(root / "b.jsonl", [{"id": f"b{i}", "text": t + " more"} for i, t in enumerate(TEXT[:16])])
    two = tokenize_corpus(TokenizeConfig(inputs=(root,), out=tmp_path / "two", tokenizer=str(tokenizer_dir),
                                         val_fraction=0.4, progress=False))
    assert two["splits"]["train"]["documents"] > one["splits"]["train"]["documents"]
    for split in ("train", "val"):
        a, _ = store_docs(TokenStore.open(tmp_path / "one"), split)
        b, _ = store_docs(TokenStore.open(tmp_path / "two"), split)
        assert all(np.array_equal(x, y) for x, y in zip(a, b[: len(a)], strict=True))


def test_train_fraction_keeps_a_share_of_train_and_all_of_val(tmp_path, tokenizer_dir):
    keys = [f"doc-{i}" for i in range(4000)]
    val = {k for k in keys if split_of(k, 3, 0.1) == "val"}
    for fraction in (0.25, 0.5):
        kept = {k for k in keys if split_of(k, 3, 0.1, fraction) == "train"}
        assert {k for k in keys if split_of(k, 3, 0.1, fraction) == "val"} == val  # val never moves
        assert abs(len(kept) / (len(keys) - len(val)) - fraction) < 0.05
    quarter = {k for k in keys if split_of(k, 3, 0.1, 0.25) == "train"}
    assert quarter < {k for k in keys if split_of(k, 3, 0.1, 0.5) == "train"}  # a larger share: a superset
    # Through the CLI: the same val documents, a subset of the train documents, in the same order.
    root = tmp_path / "c"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"id": f"a{i}", "text": f"{i}: {t}"} for i, t in enumerate(TEXT)])
    base = ("tokenize", "--input", root, "--tokenizer", tokenizer_dir, "--val-fraction", "0.2")
    assert cli(*base, "--out", tmp_path / "all").exit_code == 0
    r = cli(*base, "--train-fraction", "0.5", "--out", tmp_path / "half")
    assert r.exit_code == 0, r.output
    full, half = TokenStore.open(tmp_path / "all"), TokenStore.open(tmp_path / "half")
    assert np.array_equal(full.tokens("val")[:], half.tokens("val")[:])
    all_train = [d.tobytes() for d in store_docs(full, "train")[0]]
    half_train = [d.tobytes() for d in store_docs(half, "train")[0]]
    assert 0 < len(half_train) < len(all_train)
    assert half_train == [d for d in all_train if d in set(half_train)]
    assert half.manifest["train_fraction"] == 0.5
    info = cli("shards", "info", tmp_path / "half", "--json")
    assert json.loads(info.stdout)["train_fraction"] == 0.5 and json.loads(info.stdout)["val_fraction"] == 0.2
    bad = cli(*base, "--train-fraction", "0", "--out", tmp_path / "zero")
    assert bad.exit_code == 2 and "--train-fraction 0.0: must be in (0, 1]" in bad.stderr
    assert not (tmp_path / "zero").exists()
    none = cli(*base, "--train-fraction", "1e-9", "--out", tmp_path / "none")
    assert none.exit_code == 2 and "--train-fraction 1e-09 keeps none of the train documents" in none.stderr
    assert not (tmp_path / "none").exists()


def test_trained_tokenizer_sees_train_split_only(tmp_path):
    from transformers import AutoTokenizer

    # A word repeated in val-only documents must not become one token; the same word in train does.
    ids = [f"k{i}" for i in range(200)]
    val_ids = [k for k in ids if split_of(k, 0, 0.25) == "val"][:3]
    train_ids = [k for k in ids if split_of(k, 0, 0.25) == "train"][:6]
    docs = [{"id": k, "text": " qzxvalword" * 50} for k in val_ids]
    docs += [{"id": k, "text": " jkwtrainword" * 50 + " " + TEXT[i]} for i, k in enumerate(train_ids)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    args = ("tokenize", "--input", tmp_path / "c.jsonl", "--train-tokenizer", "400", "--val-fraction", "0.25")
    assert cli(*args, "--out", tmp_path / "ts").exit_code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "ts" / "tokenizer")
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 400
    assert len(tok(" jkwtrainword")["input_ids"]) == 1
    assert len(tok(" qzxvalword")["input_ids"]) > 2
    assert cli(*args, "--out", tmp_path / "ts2").exit_code == 0  # deterministic training
    assert TokenStore.open(tmp_path / "ts2").fingerprint == TokenStore.open(tmp_path / "ts").fingerprint


def refuse(tmp_path, args, *fragments):
    """Run the CLI expecting exit 2, one `error:` line naming the fragments, and no store folder left."""
    r = cli("tokenize", *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert str(f) in lines[0]
    assert "Traceback" not in r.output
    return lines[0]


def test_bad_inputs_refused_cleanly(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    tok = ("--tokenizer", tokenizer_dir, "--out", out)
    refuse(tmp_path, ("--input", tmp_path / "missing.jsonl", *tok), "missing.jsonl", "does not exist")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    refuse(tmp_path, ("--input", tmp_path / "x.csv", *tok), "x.csv", "unknown file type")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    refuse(tmp_path, ("--input", tmp_path / "empty.jsonl", *tok), "corpus is empty")
    write_jsonl(tmp_path / "notext.jsonl", [{"text": "fine"}, {"text": "fine"}, {"body": "no text"}])
    refuse(tmp_path, ("--input", tmp_path / "notext.jsonl", *tok), "notext.jsonl:3", "'text'")
    bad = b'{"text": "good"}\n{"text": "bad \xff byte"}\n'
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(bad))
    refuse(tmp_path, ("--input", tmp_path / "bad.jsonl.gz", *tok), "bad.jsonl.gz", "invalid UTF-8 at byte 31",
           "line 2", "--invalid-utf8 replace")
    (tmp_path / "bad.txt").write_bytes(b"ok \xc3\x28 here")
    refuse(tmp_path, ("--input", tmp_path / "bad.txt", *tok), "bad.txt", "invalid UTF-8 at byte 3")
    refuse(tmp_path, ("--input", tmp_path / "x.csv", "--out", out), "exactly one of")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_invalid_utf8_replace_warns_once(tmp_path, tokenizer_dir):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a \xff b"}\n{"text": "c \xfe d"}\n')
    r = cli("tokenize", "--input", tmp_path / "bad.jsonl", "--tokenizer", tokenizer_dir, "--out", tmp_path / "ts",
            "--val-fraction", "0", "--invalid-utf8", "replace")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "bad.jsonl: invalid UTF-8 at byte 12" in warnings[0]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tokenizer_dir).decode(TokenStore.open(tmp_path / "ts").tokens("train")[:])
    assert text == "a \ufffd b<|endoftext|>c \ufffd d<|endoftext|>"


def test_out_folder_with_a_different_store_is_refused(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXT[:8]])
    tok_copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok_copy)
    base = ("--input", tmp_path / "a.jsonl", "--tokenizer", tok_copy, "--out", tmp_path / "ts",
            "--val-fraction", "0")
    assert cli("tokenize", *base).exit_code == 0
    before = (tmp_path / "ts" / "manifest.json").read_bytes()
    refuse(tmp_path, (*base, "--seed", "3"), "holds a different token store")
    spec = json.loads((tok_copy / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzz_extra"] = len(spec["model"]["vocab"])
    (tok_copy / "tokenizer.json").write_text(json.dumps(spec))  # same folder name, other tokenizer
    refuse(tmp_path, base, "holds a different token store")
    assert (tmp_path / "ts" / "manifest.json").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f.txt").write_text("x")
    refuse(tmp_path, ("--input", tmp_path / "a.jsonl", "--tokenizer", tokenizer_dir, "--out", tmp_path / "other"),
           "is not a token store")


def test_validate_cli_catches_flipped_byte(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXT])
    assert cli("tokenize", "--input", tmp_path / "a.jsonl", "--tokenizer", tokenizer_dir, "--out", tmp_path / "ts",
               "--val-fraction", "0", "--chunk-tokens", "128").exit_code == 0
    ok = cli("shards", "validate", tmp_path / "ts")
    assert ok.exit_code == 0 and ok.stdout.strip() == "ok"
    chunk = tmp_path / "ts" / "train" / "tokens" / "c" / "2"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x10
    chunk.write_bytes(bytes(data))
    r = cli("shards", "validate", tmp_path / "ts")
    assert r.exit_code == 1
    assert r.stdout.strip().splitlines() == [f"{chunk}: checksum mismatch (corrupt or rewritten)"]


def test_token_store_info_and_head(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXT[:4]])
    assert cli("tokenize", "--input", tmp_path / "a.jsonl", "--tokenizer", tokenizer_dir, "--out", tmp_path / "ts",
               "--val-fraction", "0").exit_code == 0
    info = cli("shards", "info", tmp_path / "ts")
    assert info.exit_code == 0 and "format: cocomix.token_store v1" in info.stdout
    assert "a.jsonl" in info.stdout and "documents: 4" in info.stdout and "dtype: uint16" in info.stdout
    ts = TokenStore.open(tmp_path / "ts")
    head = cli("shards", "head", tmp_path / "ts", "--n", "5", "--offset", "2")
    rows = head.stdout.splitlines()[2:7]
    assert [int(r.split()[0]) for r in rows] == [2, 3, 4, 5, 6]
    assert [int(r.split()[1]) for r in rows] == ts.tokens("train")[2:7].tolist()
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tokenizer_dir).decode(ts.tokens("train")[2:7].tolist())
    assert head.stdout.splitlines()[-1] == f"text: {text}"
    assert cli("shards", "head", tmp_path / "ts", "--offset", "10000").exit_code == 2


@pytest.mark.slow
def test_worker_pool_gives_the_same_store(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXT * 4)])
    common = dict(inputs=(tmp_path / "a.jsonl",), tokenizer=str(tokenizer_dir), batch_docs=7, progress=False)
    one = tokenize_corpus(TokenizeConfig(out=tmp_path / "w1", **common))
    two = tokenize_corpus(TokenizeConfig(out=tmp_path / "w2", workers=2, **common))
    assert one["fingerprint"] == two["fingerprint"]
