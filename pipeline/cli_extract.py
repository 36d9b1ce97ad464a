"""`cocomix extract`: token store + teacher + SAE -> label store (see pipeline/extract.py).

Several label stores from one teacher pass: repeat --out, once per store. --layer, --sae, --location,
--topk and --select each take one value, shared by every store, or one per --out, paired in order:
    --layer 3 --sae a --out x  --layer 5 --sae b --out y        two layers, two SAEs
    --layer 5 --sae b --select signed --select negated --out y --out z   two selections of one pair
Every other option is shared, and each store is exactly the store a one-store run with its values
writes (same fingerprint, same bytes), --store-teacher-topk and --store-sae-topk included: they are
stored in every store (the teacher's top-K is computed once per batch, and written to each).
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)

FORMATS = {"zarr": ("zarr",), "parquet": ("parquet",), "both": ("zarr", "parquet")}


@app.command("extract")
def extract(
    tokens: Path = typer.Option(..., help="Token store to label."),
    teacher: str = typer.Option(..., help="Teacher: hub name (offline cache) or local transformers folder."),
    sae: list[Path] = typer.Option(
        ..., metavar="PATH", help="SAE checkpoint (cocomix, OpenAI .pt, SAELens or sparsify). Repeatable: one "
        "for all stores or one per --out."),
    layer: list[int] = typer.Option(
        ..., metavar="L", help="Teacher block the SAE reads (0-based). Repeatable, as --sae."),
    out: list[Path] = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Label store folder (created, or resumed). Repeat it to write "
        "several stores from one teacher pass."),
    location: list[str] = typer.Option(
        ["resid_post_mlp"], metavar="LOC", help="Hook location in the block, or a raw module path. Repeatable, "
        "as --sae."),
    window: int | None = typer.Option(None, help="Window length; default the teacher's context, at most 1024."),
    topk: list[int] = typer.Option([4], metavar="K", help="Concept labels per token. Repeatable, as --sae."),
    select: list[str] = typer.Option(
        ["signed"], metavar="SEL", help="Which active latents become labels, with s = a*<dL/dh, W_dec> (s > 0: "
        "the latent raises the teacher's loss): signed = largest s (the official code's choice), negated = largest -s (lowers the "
        "loss most), absolute = largest |s|, activation = the SAE's largest activations. The score stored is "
        "that key; each choice is its own label set. Repeatable, as --sae."),
    format: str = typer.Option("zarr", help="zarr, parquet or both."),
    codec: str = typer.Option("raw", help="raw (memory-mappable) or zstd."),
    workers: int = typer.Option(1, help="Ray actors (one per GPU, or per share of CPUs)."),
    batch_windows: int = typer.Option(8, help="Windows per teacher forward."),
    address: str | None = typer.Option(None, help="Ray cluster address (default RAY_ADDRESS, else local)."),
    store_sae_topk: bool = typer.Option(False, "--store-sae-topk", help="Also store the SAE's own top-k code."),
    store_teacher_topk: int | None = typer.Option(
        None, "--store-teacher-topk", metavar="K", help="Also store the teacher's top-K next-token log-probs "
        "(in every store)."),
    chunk_windows: int = typer.Option(64, help="Windows per chunk (= per work unit, unsharded)."),
    shard_chunks: int = typer.Option(
        1, help="Chunks per zarr shard file (= per work unit): fewer files for big stores, still memory-mapped "
        "by the trainer. 1: unsharded."),
    splits: str | None = typer.Option(None, help="Comma-separated splits to label (default: all)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for the workers)."),
    threads: int | None = typer.Option(None, help="torch threads per CPU worker (default: its CPU share)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Label every token with the teacher's top concepts; rerunning resumes or does nothing.

    Repeat --out (with a --layer, --sae, --topk or --select per store where they differ) to write several
    label stores from one teacher pass.
    """
    from pipeline.extract import ExtractConfig, UnitsFailed, run_extracts
    from storage_schemas import UserError

    if format not in FORMATS:
        raise UserError(f"--format must be zarr, parquet or both, not {format!r}")
    stores = per_store(len(out), sae=sae, layer=layer, location=location, topk=topk, select=select)
    split_names = tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None
    cfgs = [ExtractConfig(
        tokens=tokens, teacher=teacher, sae=o["sae"], layer=o["layer"], out=path, location=o["location"],
        window=window, k=o["topk"], selection=o["select"], formats=FORMATS[format], codec=codec, workers=workers,
        batch_windows=batch_windows, address=address, store_sae_topk=store_sae_topk, teacher_topk=store_teacher_topk,
        chunk_windows=chunk_windows, shard_chunks=shard_chunks, splits=split_names, device=device, threads=threads, progress=progress)
        for path, o in zip(out, stores, strict=True)]
    try:
        summaries = run_extracts(cfgs)
    except UnitsFailed as e:
        for m in e.messages:
            typer.echo(f"error: {m}", err=True)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    for s in summaries:
        if s["units_run"] == 0:
            typer.echo(f"label store {s['fingerprint']} is complete: nothing to do")
            continue
        rate = s["tokens"] / max(s["seconds"], 1e-9)
        typer.echo(f"{s['path']}: labelled {s['tokens']:,} tokens in {s['units_run']} of {s['units_total']} units, "
                   f"{s['seconds']:.1f}s ({rate:,.0f} tokens/s); fingerprint {s['fingerprint'][:12]}")


def per_store(n: int, **options: list) -> list[dict]:
    """Each option's value for each of n stores: an option given once is every store's."""
    from storage_schemas import UserError

    for name, values in options.items():
        if len(values) not in (1, n):
            raise UserError(f"--{name} has {len(values)} values for {n} --out; give one --{name} for all stores "
                            "or one per --out, in the same order")
    return [{name: values[i if len(values) > 1 else 0] for name, values in options.items()} for i in range(n)]
