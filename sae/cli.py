"""`cocomix sae train|info|eval`. Heavy imports live inside the commands so `cocomix --help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, inspect and evaluate TopK sparse autoencoders.")


def _print_metrics(m: dict) -> None:
    # "dead" here is over the evaluated tokens only: small evals overstate it (training tracks it over
    # `--dead-tokens`); evaluate more windows for a figure comparable to the training one.
    typer.echo(f"FVU {m['fvu']:.4f} | L0 {m['l0']:.1f} | never active in these tokens {m['dead_fraction']:.2%} | "
               f"loss {m['loss_clean']:.4f} -> {m['loss_spliced']:.4f} (+{m['loss_increase']:.4f}; "
               f"zero-ablation {m['loss_zero_ablation']:.4f}) over {m['tokens']:,} tokens")


@app.command("train")
def train(
    teacher: str = typer.Option(..., help="Teacher folder (transformers layout) or cached hub name."),
    tokens: Path = typer.Option(..., help="Token store folder."),
    layer: int = typer.Option(..., help="Teacher block (0-based) the SAE reads."),
    out: Path = typer.Option(..., help="Output folder for the SAE checkpoint."),
    location: str = typer.Option("resid_post_mlp", help="Hook location or a raw module path."),
    latents: int = typer.Option(3072, help="Number of SAE latents."),
    k: int = typer.Option(16, help="Active latents per token (TopK)."),
    normalize: str = typer.Option("layer_norm", help="Input normalisation: layer_norm or none."),
    tokens_budget: int = typer.Option(4_000_000, help="Activation tokens to train on."),
    batch_windows: int = typer.Option(16, help="Token-store windows per step."),
    window: int = typer.Option(256, help="Window length in tokens."),
    seed: int = typer.Option(0),
    lr: float | None = typer.Option(None, help="Learning rate (default 2e-4 / sqrt(latents / 2^14))."),
    auxk_alpha: float = typer.Option(1 / 32, help="AuxK loss weight for dead latents (0 = off)."),
    dead_tokens: int = typer.Option(1_000_000, help="Tokens without firing after which a latent is dead."),
    bias_init: str = typer.Option("mean", help="Decoder-bias init: mean or geometric_median."),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps (0 = only at the end)."),
    eval_windows: int = typer.Option(256, help="Validation windows for the closing evaluation (0 = skip)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the SAE."),
) -> None:
    """Train a TopK SAE on a teacher's activations streamed over token-store windows."""
    from sae.train import SAETrainConfig, train_sae

    cfg = SAETrainConfig(teacher=teacher, tokens=str(tokens), layer=layer, out=str(out), location=location,
                         n_latents=latents, k=k, normalize=normalize, tokens_budget=tokens_budget,
                         batch_windows=batch_windows, window=window, seed=seed, lr=lr, auxk_alpha=auxk_alpha,
                         dead_tokens=dead_tokens, bias_init=bias_init, checkpoint_every=checkpoint_every,
                         device=device, compile=compile)
    sae, meta = train_sae(cfg)
    typer.echo(f"{out}: {meta['steps']} steps, {meta['tokens']:,} tokens in {meta['seconds']:.0f} s "
               f"({meta['tokens_per_second']:,.0f} tokens/s); last train FVU {meta['history'][-1]['fvu']:.4f}, "
               f"dead {meta['history'][-1]['dead']:.2%} (no activation in the last {cfg.dead_tokens:,} tokens)")
    if eval_windows > 0:
        _closing_eval(sae, cfg, meta, eval_windows)


def _closing_eval(sae, cfg, meta: dict, max_windows: int) -> None:
    """Evaluate on the val split (train if there is none) and store the metrics in the checkpoint."""
    from sae.formats import save_sae
    from sae.hooks import load_teacher
    from sae.metrics import evaluate_sae
    from sae.train import open_windows

    store = open_windows(cfg.tokens, cfg.split, cfg.window)
    split = "val" if "val" in store.splits and store.num_windows("val", cfg.window) > 0 else cfg.split
    teacher = load_teacher(cfg.teacher, sae.device)
    m = evaluate_sae(sae, teacher, store, layer=cfg.layer, location=cfg.location, split=split,
                     window=cfg.window, max_windows=max_windows)
    save_sae(sae, cfg.out, {**meta, "metrics": {**m, "split": split}})
    typer.echo(f"{split}: ", nl=False)
    _print_metrics(m)


@app.command("info")
def info(path: Path = typer.Argument(..., help="SAE checkpoint (any supported format).")) -> None:
    """Print an SAE's format, d_in, latents, k, normalisation and hook."""
    from sae.formats import describe

    d = describe(path)
    metrics = d.pop("metrics", None)
    for key, value in d.items():
        typer.echo(f"{key:14s} {value}")
    if metrics:
        typer.echo(f"{'metrics':14s} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in metrics.items()))


@app.command("eval")
def eval_(
    path: Path = typer.Argument(..., help="SAE checkpoint (any supported format)."),
    teacher: str = typer.Option(..., help="Teacher folder or cached hub name."),
    tokens: Path = typer.Option(..., help="Token store folder."),
    max_windows: int = typer.Option(64, help="Validation windows to evaluate."),
    split: str = typer.Option("val"),
    layer: int | None = typer.Option(None, help="Hook layer (default: the SAE's own)."),
    location: str | None = typer.Option(None, help="Hook location (default: the SAE's own)."),
    window: int | None = typer.Option(None, help="Window length (default: the SAE's training window, else 256)."),
    batch_windows: int = typer.Option(8),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    save: bool = typer.Option(False, "--save", help="Store the metrics in the checkpoint (cocomix format; "
                              "cfg.json only, the weights are not rewritten)."),
) -> None:
    """FVU, mean L0, dead fraction and the teacher's loss increase with the SAE spliced in."""
    from sae.formats import load_sae, metrics_folder, read_meta, store_metrics
    from sae.hooks import check_hook, load_teacher, teacher_config_checks
    from sae.metrics import evaluate_sae
    from sae.train import open_windows, pick_device
    from storage_schemas import UserError

    if save:
        metrics_folder(path)  # a format that keeps no metrics is refused before the teacher is loaded
    dev = pick_device(device)
    sae = load_sae(path, dev)
    layer = sae.cfg.hook_layer if layer is None else layer
    location = location or sae.cfg.hook_location
    if layer is None:
        raise UserError(f"{path} does not record its hook layer; pass --layer")
    window = window or read_meta(path).get("training", {}).get("window", 256)
    store = open_windows(tokens, split, window)
    teacher_config_checks(teacher, layer, window, location=location, d_in=sae.cfg.d_in)
    model = load_teacher(teacher, dev)
    check_hook(model, sae.cfg, layer, location)
    m = evaluate_sae(sae, model, store, layer=layer, location=location, split=split, window=window,
                     max_windows=max_windows, batch_windows=batch_windows)
    if save:
        store_metrics(path, {**m, "split": split})
    if as_json:
        typer.echo(json.dumps(m, indent=2))
    else:
        _print_metrics(m)
