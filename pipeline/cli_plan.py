"""`cocomix plan`: FLOPs, memory, label-store bytes and wall time of a run, on paper (see pipeline/plan.py).

The formulas live in pipeline/plan.py; this file holds the command and its text layout.
"""

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
    layer: int | None = typer.Option(None, help="Teacher block the SAE reads (default: the SAE's own, else 5)."),
    label_k: int = typer.Option(4, help="Concept labels per token."),
    teacher_topk: int | None = typer.Option(None, help="Teacher top-K stored for KD (default 32 in kd mode, else 0)."),
    tokens: float = typer.Option(0, help="Token budget, e.g. 20e9 (default: the config's max_tokens)."),
    micro_batch: int = typer.Option(0, help="Training windows per micro-batch per device (default batch_size)."),
    extract_batch: int = typer.Option(8, help="Windows per teacher forward in extraction."),
    chunk_windows: int = typer.Option(64, help="Windows per label-store chunk file."),
    shard_chunks: int = typer.Option(1, help="Label-store chunks per shard file (1: unsharded)."),
    devices: int = typer.Option(1, help="Accelerators, for the wall time."),
    peak_tflops: float = typer.Option(989.0, help="Peak dense TFLOP/s per device (989: H100/H200 bf16)."),
    mfu: float = typer.Option(0.4, help="Model FLOPs utilisation assumed for training."),
    extract_mfu: float | None = typer.Option(None, help="MFU assumed for extraction (default: --mfu)."),
    act_bytes: int = typer.Option(2, help="Bytes per activation: 2 (bf16) or 4 (fp32)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print the FLOPs, memory per device, label-store size and wall time of extraction and training."""
    from pipeline.plan import PlanConfig, make_plan
    from storage_schemas import UserError

    if tokens < 0 or tokens != int(tokens):
        raise UserError(f"--tokens must be a whole number >= 0, got {tokens:g}")
    cfg = PlanConfig(preset=preset, config=config, sets=tuple(sets), teacher=teacher, sae=sae, sae_latents=sae_latents,
                     sae_k=sae_k, layer=layer, label_k=label_k, teacher_topk=teacher_topk, tokens=int(tokens),
                     micro_batch=micro_batch, extract_batch=extract_batch, chunk_windows=chunk_windows,
                     shard_chunks=shard_chunks, devices=devices, peak_tflops=peak_tflops, mfu=mfu, extract_mfu=extract_mfu, act_bytes=act_bytes)
    p = make_plan(cfg)
    typer.echo(json.dumps(p) if as_json else format_plan(p))


# --- text ------------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


def format_plan(p: dict) -> str:
    """The plan as a few aligned lines of text (every figure is also in `make_plan`'s dict)."""
    st, t, s, f, m, ls, tm = p["student"], p["teacher"], p["sae"], p["flops"], p["memory"], p["label_store"], p["time"]
    tr, ex, mt, me = f["train"], f["extract"], m["train"], m["extract"]
    prec = "bf16" if m["act_bytes"] == 2 else "fp32"
    lines = [
        f"student    {st['preset'] or 'config'} ({st['mode']}): {_si(st['params']['total'])} params "
        f"(non-embedding {_si(st['params']['non_embedding'])}); {st['n_layer']} layers, d {st['n_embd']}, "
        f"{st['block_size']}-token windows, vocab {st['vocab_size']:,}" + (f", C {st['n_concepts']:,}" if st['n_concepts'] else ""),
        f"teacher    {t['name']}: {_si(t['params'])} params, {t['n_layer']} blocks, d {t['d']}, vocab {t['vocab']:,}",
        f"SAE        {s['latents']:,} latents, k {s['k']}, on block {s['layer']} {s['hook_location']} ({s['source']})",
        f"tokens     {p['tokens']:,}",
        "FLOPs",
        f"  train      {_si(tr['per_token'], 'FLOP')}/token, {_si(tr['total'], 'FLOP')} (6ND alone {_si(tr['six_nd'], 'FLOP')}, "
        f"x{tr['total'] / tr['six_nd']:.2f})",
        f"  extract    {_si(ex['per_token'], 'FLOP')}/token, {_si(ex['total'], 'FLOP')} (fwd {_si(ex['forward'])}, partial bwd "
        f"{_si(ex['partial_backward'])}, SAE {_si(ex['sae_encode'])}); the dense reference costs "
        f"x{ex['dense_over_kernel']:.2f}",
        f"memory per device ({prec} activations; train micro-batch {m['micro_batch']} x {st['block_size']}, "
        f"extract batch {m['extract_batch']})",
        f"  train      {_gib(mt['total'])}: weights {_gib(mt['weights'])}, grads {_gib(mt['grads'])}, AdamW "
        f"{_gib(mt['adamw'])}, activations {_gib(mt['activations'])}, LM logits {_gib(mt['lm_logits'])}"
        + (f", concept logits {_gib(mt['concept_logits'])}" if mt["concept_logits"] else "")
        + (f", KD head {_gib(mt['kd_head'])}" if mt["kd_head"] else "")
        + f" (unfused attention: +{_gib(mt['attention_scores_if_unfused'])})",
        f"  extract    {_gib(me['total'])}: teacher {_gib(me['teacher_weights'])}, SAE {_gib(me['sae_weights'])}, "
        f"activations {_gib(me['activations'])}, logits {_gib(me['logits'])}, SAE pre-acts {_gib(me['sae_pre_acts'])}",
        f"label store  {ls['per_token']} bytes/token ({', '.join(f'{k} {v}' for k, v in ls['per_array'].items())}; "
        f"ids {ls['ids_dtype']}), {_si(ls['total'], 'B')} total; {ls['files']:,} files "
        f"({ls['files_per_billion']:,} per 1B tokens at {ls['chunk_windows']} windows per chunk"
        + (f", {ls['shard_chunks']} chunks per shard" if ls["shard_chunks"] > 1 else "") + "); "
        f"token store {_si(ls['token_store_total'], 'B')}",
        f"wall time on {tm['devices']} device(s) of {tm['peak_tflops']:g} TFLOP/s",
        f"  extract    {_duration(tm['extract_s'])} at MFU {tm['extract_mfu']:g} "
        f"({_si(tm['extract_tokens_per_s_per_device'])} tokens/s per device)",
        f"  train      {_duration(tm['train_s'])} at MFU {tm['mfu']:g} "
        f"({_si(tm['train_tokens_per_s_per_device'])} tokens/s per device)",
    ]
    return "\n".join(lines)
