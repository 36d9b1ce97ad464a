"""`cocomix tokenize`: text corpus -> token store (see pipeline/tokenize.py for formats and policies)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command("tokenize")
def tokenize(
    input: list[Path] = typer.Option(..., "--input", "-i", help="Files or folders of .txt/.jsonl/.jsonl.gz/.parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Token store folder to create."),
    tokenizer: str | None = typer.Option(None, help="Hub name (offline cache) or local tokenizer folder."),
    train_tokenizer: int | None = typer.Option(
        None, "--train-tokenizer", metavar="VOCAB", help="Train a byte-level BPE of this size on the train split."),
    val_fraction: float = typer.Option(0.03, help="Share of documents in the val split (by hash of document key)."),
    train_fraction: float = typer.Option(
        1.0, help="Share of the train documents to keep (same hash; val unchanged): a small train split."),
    seed: int = typer.Option(0, help="Seed of the train/val split hash."),
    workers: int = typer.Option(1, help="Encoding processes (1: in process; the encoder is already threaded)."),
    chunk_tokens: int = typer.Option(1 << 20, help="Tokens per store chunk."),
    invalid_utf8: str = typer.Option("refuse", help="refuse (name file and offset) or replace with U+FFFD."),
) -> None:
    """Tokenize a corpus into a token store, split train/val by document."""
    from pipeline.tokenize import TokenizeConfig, tokenize_corpus

    cfg = TokenizeConfig(inputs=tuple(input), out=out, tokenizer=tokenizer, train_vocab=train_tokenizer,
                         val_fraction=val_fraction, train_fraction=train_fraction, seed=seed, workers=workers, chunk_tokens=chunk_tokens,
                         invalid_utf8=invalid_utf8)
    manifest = tokenize_corpus(cfg)
    counts = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in manifest["splits"].items())
    typer.echo(f"{out}: {counts}; vocab {manifest['vocab_size']} ({manifest['dtype']}), "
               f"fingerprint {manifest['fingerprint'][:12]}")
