"""`cocomix concepts describe|top` on a small hand-built label store whose answers are known."""

import shutil
from collections import Counter

import numpy as np
import pytest
from test_shards_cli import WINDOW, build_stores, cli

from pipeline.concepts import describe_concept
from storage_schemas import LabelStore, TokenStore

CONCEPT = 7
# (split, position, slot, score, valid): where CONCEPT is placed by hand.
PLACED = [("train", 3, 0, 0.5, True), ("train", 20, 0, 2.0, True), ("train", 41, 0, 1.25, True),
          ("train", 50, 0, 3.0, False),  # invalid row: counts nowhere, although its score is the best
          ("train", 60, 1, 0.75, True),  # second label: counted, but never a context
          ("val", 9, 0, 1.5, True)]


def hand_labels(split, n, rng):
    """Concepts 0..6 everywhere (never CONCEPT), then CONCEPT placed at the PLACED rows."""
    ids = rng.integers(0, CONCEPT, size=(n, 3)).astype(np.uint16)
    scores = rng.uniform(0.1, 0.4, size=(n, 3)).astype(np.float16)
    valid = np.ones(n, bool)
    valid[WINDOW - 1 :: WINDOW] = False
    for s, pos, slot, score, ok in PLACED:
        if s == split:
            ids[pos, slot], scores[pos, slot], valid[pos] = CONCEPT, score, ok
    return {"ids": ids, "scores": scores, "valid": valid}


@pytest.fixture
def stores(tmp_path, tokenizer_dir):
    return build_stores(tmp_path, tokenizer_dir, labels=hand_labels)


def expected_context(tok, tokens, p, width):
    def dec(a):
        return tok.decode(a.tolist()).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")

    return f"{dec(tokens[max(0, p - width) : p])}[[{dec(tokens[p : p + 1])}]]{dec(tokens[p + 1 : p + width + 1])}"


def test_describe_shows_the_implied_contexts(stores, tokenizer_dir):
    from transformers import AutoTokenizer

    tokens, labels, arrays = stores
    ts, tok = TokenStore.open(tokens), AutoTokenizer.from_pretrained(tokenizer_dir)
    valid_rows = sum(int(a["valid"].sum()) for a in arrays.values())
    d = describe_concept(LabelStore.open(labels), CONCEPT, ts, ["train", "val"], n=3, width=2)
    assert (d.count, d.first, d.slots) == (5, 4, 3 * valid_rows)
    assert d.mean_score == pytest.approx((0.5 + 2.0 + 1.25 + 0.75 + 1.5) / 5)
    expect = [(s, p, sc) for s, p, sc in [("train", 20, 2.0), ("val", 9, 1.5), ("train", 41, 1.25)]]
    assert [(s, p, sc) for s, p, sc, _ in d.contexts] == expect
    assert [c[3] for c in d.contexts] == [expected_context(tok, ts.tokens(s)[:], p, 2) for s, p, _ in expect]
    r = cli("concepts", "describe", labels, CONCEPT, "--n", "3", "--context", "2")
    assert r.exit_code == 0, r.output
    assert f"label: 5 of {3 * valid_rows:,} label slots" in r.stdout and "first label at 4 positions" in r.stdout
    lines = r.stdout.splitlines()[-3:]
    for line, (s, p, sc), (_, _, _, text) in zip(lines, expect, d.contexts, strict=True):
        assert line.split()[:2] == [f"{sc:.4g}", f"{s}:{p}"] and line.endswith(f"  {text}")
    train_only = describe_concept(LabelStore.open(labels), CONCEPT, ts, ["train"], n=10, width=2)
    assert [(s, p) for s, p, _, _ in train_only.contexts] == [("train", 20), ("train", 41), ("train", 3)]


def test_describe_refusals_and_unused_concept(stores, tmp_path):
    tokens, labels, _ = stores
    r = cli("concepts", "describe", labels, 12)
    assert r.exit_code == 0 and "never the first label" in r.stdout and "label: 0 of" in r.stdout
    r = cli("concepts", "describe", labels, 20)
    assert r.exit_code == 2 and "concept 20 is out of range: this store has ids 0..19" in r.stderr
    moved = tmp_path / "moved_tokens"
    shutil.move(tokens, moved)
    r = cli("concepts", "describe", labels, CONCEPT)
    assert r.exit_code == 2 and "does not exist; pass --tokens DIR" in r.stderr
    assert cli("concepts", "describe", labels, CONCEPT, "--tokens", moved).exit_code == 0
    r = cli("concepts", "top", moved)
    assert r.exit_code == 2 and "needs a label store" in r.stderr


def test_top_counts_and_shares(stores):
    _, labels, arrays = stores
    ref = Counter()
    for a in arrays.values():
        ref.update(int(c) for row, ok in zip(a["ids"], a["valid"], strict=True) if ok for c in row)
    total = sum(ref.values())
    r = cli("concepts", "top", labels, "--n", "4")
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.stdout.splitlines()[2:]]
    expect = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    assert [(int(c), int(n.replace(",", ""))) for _, c, n, _ in rows] == expect
    assert [share for *_, share in rows] == [f"{n / total:.3%}" for _, n in expect]
    assert f"{len(ref)} of 20 concepts used" in r.stdout
