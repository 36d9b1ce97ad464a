"""`cocomix shards info|head|validate|stats|export`: inspect, check and convert token and label stores.

The kind of store is read from its manifest; storage_schemas does the reading and checking, this
module only presents it. Label statistics come from pipeline/concepts.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _echo_tree(d: dict, indent: int = 0) -> None:
    """Nested dicts as indented `key: value` lines; lists of dicts one line per item."""
    pad = "  " * indent
    for k, v in d.items():
        if isinstance(v, dict) and v:
            typer.echo(f"{pad}{k}:")
            _echo_tree(v, indent + 1)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            typer.echo(f"{pad}{k}:")
            for item in v:
                typer.echo(f"{pad}  - " + "  ".join(f"{ik}={_fmt(iv)}" for ik, iv in item.items()))
        else:
            typer.echo(f"{pad}{k}: {_fmt(v)}")


@app.command("info")
def info(path: Path, as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Format, counts, dtypes, bytes, tokenizer and sources (token store), or fingerprint, inputs,
    bytes per token and completion (label store)."""
    import json

    from storage_schemas import store_info

    summary = store_info(path)
    manifest = json.loads((Path(path) / "manifest.json").read_text())  # store_info has read it: it exists
    summary = {"format": f"{manifest['kind']} v{manifest['format_version']}", **summary}
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        _echo_tree(summary)


@app.command("head")
def head(path: Path, n: int = typer.Option(10, "--n", help="Rows to show."),
         offset: int = typer.Option(0, help="First token index."),
         split: str | None = typer.Option(None, help="Split (default: train, else the first)."),
         tokens: Path | None = typer.Option(None, help="Token store of a label store (default: the recorded path).")
         ) -> None:
    """Token ids with decoded text (token store), or decoded tokens beside their concept labels (label store)."""
    from storage_schemas import LabelStore, TokenStore, UserError, store_kind

    if n < 1 or offset < 0:
        raise UserError("--n must be positive and --offset non-negative")
    if store_kind(path) == "token":
        _head_tokens(TokenStore.open(path), n, offset, split)
    else:
        _head_labels(LabelStore.open(path), n, offset, split, tokens)


def _pick_split(splits: list[str], split: str | None, path: Path) -> str:
    from storage_schemas import UserError

    if split is None:
        return "train" if "train" in splits else splits[0]
    if split not in splits:
        raise UserError(f"{path} has no split {split!r}; it has {', '.join(splits)}")
    return split


def _rows(n_rows: int, offset: int, n: int, split: str) -> tuple[int, int]:
    from storage_schemas import UserError

    if offset >= n_rows:
        raise UserError(f"--offset {offset} is past the end of split {split} ({n_rows:,} rows)")
    return offset, min(offset + n, n_rows)


def _head_tokens(ts, n: int, offset: int, split: str | None) -> None:
    from pipeline.concepts import decode, load_store_tokenizer, show, token_text

    split = _pick_split(ts.splits, split, ts.path)
    a, b = _rows(ts.num_tokens(split), offset, n, split)
    ids, tok = ts.tokens(split)[a:b], load_store_tokenizer(ts)
    typer.echo(f"{ts.path} {split}[{a}:{b}] of {ts.num_tokens(split):,} tokens")
    typer.echo(f"{'index':>10}  {'id':>7}  token")
    for i, t in enumerate(ids, a):
        typer.echo(f"{i:>10}  {int(t):>7}  '{show(token_text(tok, t))}'")
    typer.echo(f"text: {show(decode(tok, ids))}")


def _head_labels(store, n: int, offset: int, split: str | None, tokens: Path | None) -> None:
    from pipeline.concepts import load_store_tokenizer, show, token_store_for, token_text

    split = _pick_split(list(store.manifest["splits"]), split, store.path)
    a, b = _rows(store.num_rows(split), offset, n, split)
    ts = token_store_for(store, tokens)
    tok, ids = load_store_tokenizer(ts), ts.tokens(split)[a:b]
    concepts, scores = store.array(split, "ids")[a:b], store.array(split, "scores")[a:b]
    valid = store.array(split, "valid")[a:b]
    typer.echo(f"{store.path} {split}[{a}:{b}] of {store.num_rows(split):,} rows; k={store.spec.k}")
    typer.echo(f"{'index':>10}  {'id':>7}  {'token':<16}  valid  concepts (scores)")
    for r in range(b - a):
        labels = "  ".join(f"{int(c)} ({float(s):+.3g})" for c, s in zip(concepts[r], scores[r], strict=True))
        token = f"'{show(token_text(tok, ids[r]))}'"
        typer.echo(f"{a + r:>10}  {int(ids[r]):>7}  {token:<16}  {'yes' if valid[r] else 'no ':<5}  {labels}")


@app.command("validate")
def validate(path: Path, tokens: Path | None = typer.Option(
        None, help="Token store to check a label store's alignment and fingerprint against.")) -> None:
    """Checksums, manifest, alignment and id ranges; exit 1 naming each problem, else print ok."""
    from storage_schemas import validate_store

    problems = validate_store(path, tokens)
    for p in problems:
        typer.echo(p)
    if problems:
        typer.echo(f"{path}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo("ok")


@app.command("stats")
def stats(path: Path, split: str | None = typer.Option(None, help="One split (default: all)."),
          top: int = typer.Option(20, help="Concepts to list."),
          plot: Path | None = typer.Option(None, help="Write a rank/frequency log-log plot to this PNG.")) -> None:
    """Label statistics: valid share, label frequency per concept, distinct concepts, entropy, top concepts."""
    from pipeline.concepts import count_labels, open_label_store, pick_splits

    store = open_label_store(path)
    splits = pick_splits(store, split)
    c = count_labels(store, splits)
    n_lat = store.spec.n_latents
    typer.echo(f"{path} ({', '.join(splits)}): k={store.spec.k}, {n_lat:,} concepts")
    typer.echo(f"positions:          {c.rows:,}")
    typer.echo(f"valid positions:    {c.valid_rows:,} ({c.valid_rows / max(c.rows, 1):.2%})")
    typer.echo(f"label slots:        {c.slots:,} ({c.positive_slots / max(c.slots, 1):.2%} with a positive score)")
    typer.echo(f"distinct concepts:  {c.distinct:,} of {n_lat:,} ({c.distinct / n_lat:.2%})")
    typer.echo(f"entropy:            {c.entropy:.3f} nats (max, all concepts equally often: {_log(n_lat):.3f})")
    _echo_table(c.table().head(top))
    if plot is not None:
        _plot_rank_frequency(c.table()["count"].to_numpy(), plot, f"{path.name} ({', '.join(splits)})")
        typer.echo(f"plot: {plot}")


def _log(x: int) -> float:
    import math

    return math.log(x)


def _echo_table(df) -> None:
    typer.echo(f"{'rank':>6}  {'concept':>8}  {'count':>12}  {'share':>8}  {'first':>10}  {'mean score':>10}")
    for rank, concept, count, share, first, mean in df.iter_rows():
        typer.echo(f"{rank:>6}  {concept:>8}  {count:>12,}  {share:>8.3%}  {first:>10,}  {mean:>10.4g}")


def _plot_rank_frequency(counts, out: Path, title: str) -> None:
    """counts sorted descending -> log-log rank/frequency PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.loglog(np.arange(1, len(counts) + 1), counts, marker=".", linestyle="none", markersize=3)
    ax.set(xlabel="concept rank", ylabel="times chosen as a label", title=f"label frequency: {title}")
    ax.grid(True, which="both", alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)


@app.command("export")
def export(path: Path, to: str = typer.Option(..., "--to", help="parquet or zarr."),
           out: Path = typer.Option(..., "--out", help="New label store folder."),
           codec: str | None = typer.Option(None, help="raw or zstd for --to zarr (default: the source's)."),
           shard_chunks: int | None = typer.Option(
               None, help="Chunks per shard file of the new store (1: unsharded; default: the source's)."),
           tokens: Path | None = typer.Option(None, help="Token store, for the token column of Parquet output.")
           ) -> None:
    """Copy a label store into another format or layout; zarr -> parquet -> zarr gives identical arrays."""
    new = export_store(path, to, out, codec=codec, tokens=tokens, shard_chunks=shard_chunks)
    typer.echo(f"{out}: {', '.join(new.spec.formats)} ({new.spec.codec}, {new.spec.shard_chunks} chunk(s) per "
               f"shard), fingerprint {new.fingerprint[:12]}")


def export_store(path: Path, to: str, out: Path, codec: str | None = None, tokens: Path | None = None,
                 shard_chunks: int | None = None):
    """Write every unit of the label store at path into a new store at out with formats (to,) and
    shard_chunks chunks per shard (None: the source's); the label set (fingerprint) is the same."""
    import dataclasses

    from pipeline.concepts import open_label_store, token_store_for
    from storage_schemas import LabelStore, UserError

    if to not in ("parquet", "zarr"):
        raise UserError(f"--to {to!r}: choose parquet or zarr")
    if shard_chunks is not None and shard_chunks < 1:
        raise UserError(f"--shard-chunks must be at least 1, got {shard_chunks}")
    if out.exists():
        raise UserError(f"--out {out} already exists; choose another --out or remove it")
    store = open_label_store(path)
    if missing := store.missing_units():
        raise UserError(f"{path} is incomplete ({len(missing)} unit(s) missing, first {missing[0]}); "
                        "finish extraction before exporting")
    spec = dataclasses.replace(store.spec, formats=(to,), codec=codec or store.spec.codec,
                               shard_chunks=shard_chunks or store.spec.shard_chunks)
    same_units = spec.unit_rows == store.spec.unit_rows  # else the source's Parquet files split other rows
    need_tokens = to == "parquet" and ("parquet" not in store.spec.formats or not same_units)
    ts = token_store_for(store, tokens) if need_tokens else None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        new = LabelStore.create(tmp, spec, {s: v["rows"] for s, v in store.manifest["splits"].items()})
        for split in store.manifest["splits"]:
            for unit, a, b in new.units(split):
                arrays = {name: store.array(split, name)[a:b] for name in spec.arrays()}
                new.write_unit(split, unit, arrays, _unit_tokens(store, ts, split, unit, a, b, to),
                               _seconds(store, split, a, b))
        new.consolidate()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LabelStore.open(out)


def _seconds(store, split: str, a: int, b: int) -> float:
    """Labelling seconds of rows [a, b): those of the source's units that start there (its own unit's,
    when the layouts' units agree)."""
    rows = store.spec.unit_rows
    return sum(store.record(split, u).get("seconds", 0.0) for u in range(-(-a // rows), -(-b // rows)))


def _unit_tokens(store, ts, split: str, unit: int, a: int, b: int, to: str):
    """Token ids of rows [a, b) for Parquet output: from the token store, else (same units) the source's
    Parquet `token` column."""
    import numpy as np
    import pyarrow.parquet as pq

    if to != "parquet":
        return np.zeros(b - a, np.uint32)  # zarr output stores no tokens; write_unit ignores them
    if ts is not None:
        return ts.tokens(split)[a:b]
    col = pq.read_table(store.path / "parquet" / f"{split}-{unit:06d}.parquet", columns=["token"])
    return col.column("token").to_numpy()
