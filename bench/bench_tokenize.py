"""Tokenization throughput: `cocomix tokenize` end to end (read, split, encode, write a token store)
against a bare `tokenizers` `encode_batch` over the same documents already in memory.

Both run side by side in one process, with the same byte-level BPE (trained once on the embedded
corpus); best of `repeats`. Target: ours >= 0.7x the bare encoder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
TARGET = 0.7


def _bare(tokenizer_dir: Path, texts: list[str], batch: int) -> tuple[float, int]:
    """Seconds and tokens (eos included, as the store counts them) for encode_batch over all texts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e.ids) + 1 for e in tok.encode_batch(texts[i : i + batch], add_special_tokens=False))
    return time.perf_counter() - t0, n


def _ours(tokenizer_dir: Path, work: Path, run: int) -> tuple[float, int]:
    from pipeline.tokenize import TokenizeConfig, tokenize_corpus

    cfg = TokenizeConfig(inputs=(CORPUS,), out=work / f"store{run}", tokenizer=str(tokenizer_dir), progress=False)
    t0 = time.perf_counter()
    manifest = tokenize_corpus(cfg)
    return time.perf_counter() - t0, sum(s["tokens"] for s in manifest["splits"].values())


def main(repeats: int = 3) -> list[tuple[str, str, str, str]]:
    """Rows (name, value, unit, note) for `make bench`."""
    from pipeline.tokenize import TokenizeConfig, find_sources, iter_corpus, train_bpe

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        cfg = TokenizeConfig(inputs=(CORPUS,), out=work / "unused", train_vocab=8192)
        texts = [t for _, t in iter_corpus(cfg, find_sources(cfg.inputs))]
        train_bpe(iter(texts), 8192, work / "tokenizer")
        bare, ours = [], []
        for r in range(repeats):  # interleaved so both see the same machine load
            bare.append(_bare(work / "tokenizer", texts, cfg.batch_docs))
            ours.append(_ours(work / "tokenizer", work, r))
        (tb, nb), (to, no) = min(bare), min(ours)
        assert nb == no, f"token counts differ: bare {nb}, ours {no}"
        ratio = (no / to) / (nb / tb)
        threads = f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}"
        return [("bare encode_batch", f"{nb / tb:,.0f}", "tokens/s", f"{len(texts)} docs in memory, BPE 8192, {threads}"),
                ("cocomix tokenize end to end", f"{no / to:,.0f}", "tokens/s", "read jsonl.gz, split, encode, write store"),
                ("ratio cocomix / bare", f"{ratio:.2f}", "x", f"target >= {TARGET}; {no:,} tokens, best of {repeats}")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
