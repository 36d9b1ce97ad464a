"""`cocomix plan`: FLOPs, memory, label-store bytes and wall time of a run, on paper (see pipeline/plan.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command("plan")
def plan(
    preset: str | None = typer.Option(None, "--preset", help="Student preset, e.g. gpt2-69m, gpt2-1.4b-ntp."),
    config: Path | None = typer.Option(None, "--config", help="TOML file of TrainConfig fields (may name a preset)."),
    sets: list[str] = typer.Option([], "--set", help="key=value TrainConfig override (repeatable)."),
    teacher: str | None = typer.Option(
        None, help="Teacher folder or cached hub name (its config only); default GPT-2 124M (GPT2Config())."),
    sae: Path | None = typer.Option(None, help="SAE checkpoint; or give --sae-latents/--sae-k."),
    sae_latents: int | None = typer.Option(None, help="SAE latents without a checkpoint (default 32768)."),
    sae_k: int | None = typer.Option(None, help="SAE active latents per token without a checkpoint (default 32)."),
    layer: int = typer.Option(5, help="Teacher block whose output the SAE reads."),
    label_k: int = typer.Option(4, help="Concept labels per token."),
    teacher_topk: int | None = typer.Option(None, help="Teacher top-K stored for KD (default 32 in kd mode, else 0)."),
    tokens: float = typer.Option(0, help="Token budget, e.g. 20e9 (default: the config's max_tokens)."),
    micro_batch: int = typer.Option(0, help="Training windows per micro-batch per device (default batch_size)."),
    extract_batch: int = typer.Option(8, help="Windows per teacher forward in extraction."),
    chunk_windows: int = typer.Option(64, help="Windows per label-store chunk file."),
    devices: int = typer.Option(1, help="Accelerators, for the wall time."),
    peak_tflops: float = typer.Option(989.0, help="Peak dense TFLOP/s per device (989: H100/H200 bf16)."),
    mfu: float = typer.Option(0.4, help="Model FLOPs utilisation assumed for training."),
    extract_mfu: float | None = typer.Option(None, help="MFU assumed for extraction (default: --mfu)."),
    act_bytes: int = typer.Option(2, help="Bytes per activation: 2 (bf16) or 4 (fp32)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print the FLOPs, memory per device, label-store size and wall time of extraction and training."""
    from pipeline.plan import PlanConfig, format_plan, make_plan
    from storage_schemas import UserError

    if tokens < 0 or tokens != int(tokens):
        raise UserError(f"--tokens must be a whole number >= 0, got {tokens:g}")
    cfg = PlanConfig(preset=preset, config=config, sets=tuple(sets), teacher=teacher, sae=sae, sae_latents=sae_latents,
                     sae_k=sae_k, layer=layer, label_k=label_k, teacher_topk=teacher_topk, tokens=int(tokens),
                     micro_batch=micro_batch, extract_batch=extract_batch, chunk_windows=chunk_windows,
                     devices=devices, peak_tflops=peak_tflops, mfu=mfu, extract_mfu=extract_mfu, act_bytes=act_bytes)
    p = make_plan(cfg)
    typer.echo(json.dumps(p) if as_json else format_plan(p))
