"""`cocomix extract`: token store + teacher + SAE -> label store (see pipeline/extract.py)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)

FORMATS = {"zarr": ("zarr",), "parquet": ("parquet",), "both": ("zarr", "parquet")}


@app.command("extract")
def extract(
    tokens: Path = typer.Option(..., help="Token store to label."),
    teacher: str = typer.Option(..., help="Teacher: hub name (offline cache) or local transformers folder."),
    sae: Path = typer.Option(..., help="SAE checkpoint (cocomix, OpenAI .pt, SAELens or sparsify)."),
    layer: int = typer.Option(..., help="Teacher block the SAE reads (0-based)."),
    out: Path = typer.Option(..., "--out", "-o", help="Label store folder (created, or resumed)."),
    location: str = typer.Option("resid_post_mlp", help="Hook location in the block, or a raw module path."),
    window: int | None = typer.Option(None, help="Window length; default the teacher's context, at most 1024."),
    topk: int = typer.Option(4, help="Concept labels per token."),
    select: str = typer.Option(
        "signed", help="Which active latents become labels, with s = a*<dL/dh, W_dec> (s > 0: the latent raises "
        "the teacher's loss): signed = largest s (the official code's choice), negated = largest -s (lowers the "
        "loss most), absolute = largest |s|, activation = the SAE's largest activations. The score stored is "
        "that key; each choice is its own label set."),
    format: str = typer.Option("zarr", help="zarr, parquet or both."),
    codec: str = typer.Option("raw", help="raw (memory-mappable) or zstd."),
    workers: int = typer.Option(1, help="Ray actors (one per GPU, or per share of CPUs)."),
    batch_windows: int = typer.Option(8, help="Windows per teacher forward."),
    address: str | None = typer.Option(None, help="Ray cluster address (default RAY_ADDRESS, else local)."),
    store_sae_topk: bool = typer.Option(False, "--store-sae-topk", help="Also store the SAE's own top-k code."),
    store_teacher_topk: int | None = typer.Option(
        None, "--store-teacher-topk", metavar="K", help="Also store the teacher's top-K next-token log-probs."),
    chunk_windows: int = typer.Option(64, help="Windows per chunk (= per work unit)."),
    splits: str | None = typer.Option(None, help="Comma-separated splits to label (default: all)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (for the workers)."),
    threads: int | None = typer.Option(None, help="torch threads per CPU worker (default: its CPU share)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Label every token with the teacher's top concepts; rerunning resumes or does nothing."""
    from pipeline.extract import ExtractConfig, UnitsFailed, run_extract
    from storage_schemas import UserError

    if format not in FORMATS:
        raise UserError(f"--format must be zarr, parquet or both, not {format!r}")
    cfg = ExtractConfig(
        tokens=tokens, teacher=teacher, sae=sae, layer=layer, out=out, location=location, window=window, k=topk,
        selection=select, formats=FORMATS[format], codec=codec, workers=workers, batch_windows=batch_windows,
        address=address, store_sae_topk=store_sae_topk, teacher_topk=store_teacher_topk, chunk_windows=chunk_windows,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None, device=device,
        threads=threads, progress=progress)
    try:
        s = run_extract(cfg)
    except UnitsFailed as e:
        for m in e.messages:
            typer.echo(f"error: {m}", err=True)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if s["units_run"] == 0:
        typer.echo(f"label store {s['fingerprint']} is complete: nothing to do")
        return
    rate = s["tokens"] / max(s["seconds"], 1e-9)
    typer.echo(f"{out}: labelled {s['tokens']:,} tokens in {s['units_run']} of {s['units_total']} units, "
               f"{s['seconds']:.1f}s ({rate:,.0f} tokens/s); fingerprint {s['fingerprint'][:12]}")
