"""Reading label stores as concepts: how often each is a label, and where (issue 7).

Everything streams over the stores' chunks (a raw chunk is a memory map) with whole-chunk numpy
operations (`bincount`, masks) and ranks with polars; nothing loops over tokens in Python. The only
Python loops run over chunks and over the handful of contexts a user asked to see.

Counting convention: a "label" is one of the k slots of a valid row, whatever its score's sign
(DESIGN.md keeps non-positive slots in the store; their share is reported separately).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage_schemas import LabelStore, StoreError, TokenStore, UserError


@dataclass(frozen=True)
class LabelCounts:
    """Label statistics of one or more splits of a label store."""

    counts: np.ndarray
    """(C,) int64: label slots of valid rows holding each concept."""
    first: np.ndarray
    """(C,) int64: valid rows whose first (best) label is each concept."""
    score_sum: np.ndarray
    """(C,) float64: sum of the scores of each concept's label slots."""
    rows: int
    valid_rows: int
    positive_slots: int
    """Label slots of valid rows with a positive score."""

    @property
    def slots(self) -> int:
        return int(self.counts.sum())

    @property
    def distinct(self) -> int:
        return int(np.count_nonzero(self.counts))

    @property
    def entropy(self) -> float:
        """Entropy in nats of the label distribution (over all label slots)."""
        p = self.counts[self.counts > 0] / max(self.slots, 1)
        return float(-(p * np.log(p)).sum())

    def table(self):
        """polars DataFrame of the concepts used, most frequent first: rank, concept, count, share, first, mean_score."""
        import polars as pl

        used = np.nonzero(self.counts)[0]
        df = pl.DataFrame({"concept": used, "count": self.counts[used], "first": self.first[used],
                           "mean_score": self.score_sum[used] / self.counts[used]})
        df = df.with_columns(share=pl.col("count") / max(self.slots, 1))
        df = df.sort(["count", "concept"], descending=[True, False])
        return df.with_row_index("rank", offset=1).select("rank", "concept", "count", "share", "first", "mean_score")


def open_label_store(path: Path) -> LabelStore:
    """LabelStore.open with a message that says what to pass instead of a token store."""
    try:
        return LabelStore.open(path)
    except StoreError as e:
        raise UserError(f"{e}; this command needs a label store (the output of `cocomix extract`)") from None


def pick_splits(store: LabelStore, split: str | None) -> list[str]:
    splits = list(store.manifest["splits"])
    if split is not None and split not in splits:
        raise UserError(f"{store.path} has no split {split!r}; it has {', '.join(splits)}")
    return [split] if split is not None else splits


def _chunks(store: LabelStore, splits: list[str]) -> Iterator[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(split, first row, ids (n, k), scores (n, k), valid (n,)) for every chunk of the given splits."""
    for split in splits:
        ids, scores, valid = (store.array(split, n) for n in ("ids", "scores", "valid"))
        for c in range(ids.num_chunks):
            yield split, c * ids.chunk_rows, ids.chunk(c), scores.chunk(c), valid.chunk(c)


def _bincount(x: np.ndarray, n: int, weights: np.ndarray | None = None) -> np.ndarray:
    out = np.bincount(x, weights=weights, minlength=n)
    if len(out) > n:
        raise StoreError(f"a concept id >= n_latents ({n}) is stored; run `cocomix shards validate`")
    return out


def count_labels(store: LabelStore, splits: list[str]) -> LabelCounts:
    """Per-concept label counts over the valid rows of the given splits, one pass, chunk by chunk."""
    n = store.spec.n_latents
    counts, first, score_sum = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64)
    rows = valid_rows = positive = 0
    for _, _, ids, scores, valid in _chunks(store, splits):
        iv, sv = ids[valid].astype(np.int64), scores[valid].astype(np.float64)  # (n_valid, k)
        counts += _bincount(iv.ravel(), n)
        first += _bincount(iv[:, 0], n)
        score_sum += _bincount(iv.ravel(), n, sv.ravel())
        rows, valid_rows, positive = rows + len(valid), valid_rows + len(iv), positive + int((sv > 0).sum())
    return LabelCounts(counts, first, score_sum, rows, valid_rows, positive)


def first_label_hits(store: LabelStore, concept: int, splits: list[str]):
    """polars DataFrame (split, position, score) of every valid row whose first label is `concept`."""
    import polars as pl

    parts = []
    for split, base, ids, scores, valid in _chunks(store, splits):
        rows = np.nonzero(valid & (ids[:, 0] == concept))[0]
        if len(rows):
            parts.append(pl.DataFrame({"split": [split] * len(rows), "position": base + rows.astype(np.int64),
                                       "score": scores[rows, 0].astype(np.float32)}))
    schema = {"split": pl.String, "position": pl.Int64, "score": pl.Float32}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


# ---------------------------------------------------------------- tokens and text

def token_store_for(store: LabelStore, tokens: Path | None) -> TokenStore:
    """The token store the labels were computed on: --tokens, else the path the manifest records."""
    recorded = store.manifest.get("provenance", {}).get("tokens_path") or store.spec.inputs.get("tokens_path")
    path = tokens if tokens is not None else recorded
    if path is None:
        raise UserError(f"{store.path} records no token store path; pass --tokens DIR")
    if not Path(path).exists():
        how = "--tokens" if tokens is not None else "the path recorded in the label manifest"
        raise UserError(f"token store {path} ({how}) does not exist; pass --tokens DIR")
    ts = TokenStore.open(Path(path))
    if ts.fingerprint != store.spec.token_fingerprint:
        raise UserError(f"{store.path} labels token store {store.spec.token_fingerprint[:12]}, but {path} is "
                        f"{ts.fingerprint[:12]}; pass the token store the labels were made from")
    return ts


def load_store_tokenizer(ts: TokenStore):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ts.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot load the tokenizer in {ts.tokenizer_dir} ({e})") from None


def show(text: str) -> str:
    """One-line form of decoded text: newlines and tabs made visible."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def decode(tok, ids: np.ndarray) -> str:
    return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_text(tok, token_id: int) -> str:
    """One token as text; its vocabulary string when alone it is part of a UTF-8 sequence (decodes to U+FFFD)."""
    text = decode(tok, [token_id])
    return tok.convert_ids_to_tokens(int(token_id)) if "\ufffd" in text else text


def context(tok, tokens: np.ndarray, position: int, width: int) -> str:
    """Decoded text of tokens[position - width : position + width + 1] with the token at position in [[ ]]."""
    lo, hi = max(0, position - width), min(len(tokens), position + width + 1)
    left, mid, right = tokens[lo:position], tokens[position : position + 1], tokens[position + 1 : hi]
    return f"{show(decode(tok, left))}[[{show(decode(tok, mid))}]]{show(decode(tok, right))}"


@dataclass(frozen=True)
class Description:
    """What `cocomix concepts describe` prints for one concept."""

    concept: int
    count: int
    """Label slots (valid rows) holding the concept."""
    slots: int
    """All label slots of valid rows."""
    first: int
    """Valid rows where it is the first label."""
    mean_score: float
    """Mean score over its label slots (nan when never a label)."""
    contexts: list[tuple[str, int, float, str]]
    """(split, position, score, marked text) of the top first-label rows, best score first."""


def describe_concept(store: LabelStore, concept: int, ts: TokenStore, splits: list[str], n: int = 5,
                     width: int = 12) -> Description:
    """How often `concept` is a label, its mean score, and the n best contexts where it is the first label."""
    if not 0 <= concept < store.spec.n_latents:
        raise UserError(f"concept {concept} is out of range: this store has ids 0..{store.spec.n_latents - 1}")
    stats = count_labels(store, splits)
    hits = first_label_hits(store, concept, splits)
    top = hits.with_row_index("order").sort(["score", "order"], descending=[True, False]).head(n)
    tok = load_store_tokenizer(ts)
    contexts = [(s, p, float(sc), context(tok, ts.tokens(s), p, width))
                for s, p, sc in top.select("split", "position", "score").iter_rows()]
    count = int(stats.counts[concept])
    mean = float(stats.score_sum[concept] / count) if count else float("nan")
    return Description(concept, count, stats.slots, int(stats.first[concept]), mean, contexts)
