"""`cocomix train | eval | export-hf | compare | generate | downstream`: the trainer's commands (mounted at top level by pipeline/cli.py).

Heavy modules (torch, the model) are imported inside the commands so `cocomix --help` starts fast.
Under torchrun: `torchrun --standalone --nproc_per_node 2 -m trainer.train --preset demo ...`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from typer._click.exceptions import (
    ClickException,  # typer vendors click: not the `click` package's class
)

from storage_schemas import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and export students.")


@app.command()
def train(
    preset: str | None = typer.Option(None, "--preset", help="demo-teacher, demo, demo-ntp-wide, gpt2-69m[-ntp], "
                                      "gpt2-386m[-ntp], gpt2-1.4b[-ntp]"),
    config: Path | None = typer.Option(None, "--config", help="TOML file of TrainConfig fields (may name a preset)"),
    mode: str | None = typer.Option(None, "--mode", help="ntp | cocomix | pause | kd"),
    tokens: Path | None = typer.Option(None, "--tokens", help="token store folder"),
    labels: Path | None = typer.Option(None, "--labels", help="label store folder (cocomix, kd)"),
    out: Path | None = typer.Option(None, "--out", help="run folder (default runs/<preset>-<mode>-seed<seed>)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="training token budget"),
    seed: int | None = typer.Option(None, "--seed"),
    sets: list[str] = typer.Option([], "--set", help="key=value override of any TrainConfig field (repeatable)"),
) -> None:
    """Train a student (ntp, cocomix, pause or kd); resumes when --out already holds checkpoints."""
    from trainer.config import build_config, parse_sets
    from trainer.train import train as run

    flags = {"mode": mode, "tokens": tokens, "labels": labels, "out": out, "max_tokens": max_tokens, "seed": seed}
    overrides = {k: v for k, v in flags.items() if v is not None} | parse_sets(sets)
    cfg = build_config(preset, config, overrides)
    if not cfg.out:
        name = preset or (config.stem if config else "run")
        cfg = build_config(preset, config, overrides | {"out": f"runs/{name}-{cfg.mode}-seed{cfg.seed}"})
    path = run(cfg)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(path))


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint folder, or a run folder (its latest checkpoint)"),
    tokens: Path = typer.Option(..., "--tokens", help="token store to evaluate on"),
    split: str = typer.Option("val", "--split"),
    max_windows: int | None = typer.Option(None, "--max-windows", help="evaluate N windows spread evenly over the split (as training's evals do)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Validation loss and perplexity of a checkpoint on a token store's split."""
    from trainer.evaluate import evaluate

    r = evaluate(checkpoint, tokens, split, max_windows, batch_size, device)
    if as_json:
        typer.echo(json.dumps(r))
    else:
        typer.echo(f"{r['split']} loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  "
                   f"({r['windows']} windows, {r['predicted_tokens']:,} tokens; {r['checkpoint']})")
        for name, loss in (r["sources"] or {}).items():
            typer.echo(f"  {name}: loss {loss:.4f}")


@app.command("export-hf")
def export_hf_cmd(
    checkpoint: Path = typer.Argument(..., help="ntp checkpoint folder, or its run folder"),
    out: Path = typer.Option(..., "--out", help="folder to write (config, safetensors, tokenizer)"),
    tokens: Path | None = typer.Option(None, "--tokens", help="token store whose tokenizer to copy "
                                       "(default: the one the run trained on)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (halves the folder; for shipping)"),
) -> None:
    """Export an ntp student as a transformers GPT-2 folder (how the demo makes its teacher)."""
    import torch

    from storage_schemas import TokenStore
    from trainer.checkpoint import load_model, resolve, trained_on
    from trainer.model import export_hf

    model, meta = load_model(checkpoint)
    if model.cfg.mode not in ("ntp", "kd"):
        raise UserError(f"{checkpoint} is a {model.cfg.mode} model; only ntp/kd models are GPT-2 models")
    ts = TokenStore.open(tokens or trained_on(meta, resolve(checkpoint)))
    if meta.get("tokenizer_fingerprint") not in (None, ts.tokenizer_fingerprint):
        raise UserError(f"{ts.path} uses another tokenizer than the run was trained with: pass the run's --tokens")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    export_hf(model, out, ts.tokenizer_dir, eos_id=ts.eos_id, dtype=getattr(torch, dtype))
    typer.echo(str(out))


@app.command("compare")
def compare_cmd(
    runs: list[Path] = typer.Argument(..., help="run folders; several seeds of a mode are averaged"),
    out: Path = typer.Option(..., "--out", help="folder for report.md, val_loss.png, summary.json"),
    against: list[str] = typer.Option([], "--against", help="also a baseline, by group name (repeatable; "
                                      "the NTP groups always are), e.g. cocomix for other label selections"),
) -> None:
    """Compare runs: validation-loss curves, final loss (mean and spread over seeds), sample efficiency."""
    from trainer.report import compare

    report = compare(runs, out, tuple(against))
    typer.echo(report.read_text())
    typer.echo(f"wrote {report}")


@app.command("generate")
def generate_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint folder, or a run folder (its latest checkpoint)"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy"),
    top_k: int | None = typer.Option(None, "--top-k"),
    seed: int = typer.Option(0, "--seed"),
    show_concepts: bool = typer.Option(False, "--show-concepts", help="print each token's top predicted concepts"),
    n_concepts: int = typer.Option(4, "--n-concepts", help="how many concepts --show-concepts prints"),
    steer: list[str] = typer.Option([], "--steer", help="ID=SCALE: scale a concept's logit before TopK (0 removes it)"),
    steer_add: list[str] = typer.Option([], "--steer-add", help="ID=VALUE: add to a concept's logit before TopK"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the run's token store)"),
) -> None:
    """Sample from a student; show and steer its predicted concepts (cocomix students)."""
    from trainer.generate import GenerateConfig, generate, parse_steer

    cfg = GenerateConfig(checkpoint, prompt, max_new_tokens, temperature, top_k, seed,
                         n_concepts if show_concepts else 0, parse_steer(steer), parse_steer(steer_add), tokenizer)
    text, steps, pieces = generate(cfg)
    if show_concepts:
        for piece, step in zip(pieces, steps, strict=False):
            shown = "  ".join(f"{cid}:{p:.2f}" for cid, p in step.concepts)
            typer.echo(f"{piece!r:>16}  {shown}")
        typer.echo("")
    typer.echo(text)


@app.command("downstream")
def downstream_cmd(
    runs: list[Path] = typer.Argument(..., help="run folders (their latest checkpoint) or checkpoint folders"),
    tasks: str = typer.Option("cocomix_cloze,cocomix_continuation,cocomix_ppl", "--tasks",
                              help="comma-separated lm-eval tasks: the offline stand-ins (default), or the "
                                   "harness's own (lambada_openai,hellaswag,...) where the dataset hub is reachable"),
    limit: int | None = typer.Option(None, "--limit", help="score at most N items per task"),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="folder of task YAMLs (default: data/tasks)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per run"),
) -> None:
    """Score students on lm-evaluation-harness tasks; writes <run>/downstream.json for `cocomix compare`."""
    from trainer.downstream import TASKS_DIR, DownstreamConfig, downstream, format_summary

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    cfg = DownstreamConfig(tuple(runs), names, tasks_dir or TASKS_DIR, limit, batch_size, device)
    for summary in downstream(cfg):
        typer.echo(json.dumps(summary) if as_json else "\n".join(format_summary(summary)))


def main_train() -> None:
    """`python -m trainer.train` / torchrun: the train command alone, user mistakes -> one line, exit 2."""
    solo = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    solo.command()(train)
    try:
        code = typer.main.get_command(solo).main(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # disk full while checkpointing: one line naming the file, as `cocomix train` says it
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except ClickException as e:  # bad option value or type
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
