"""`cocomix concepts top|describe`: which concepts the labels use, and what one concept looks like in text."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command("top")
def top(labels: Path, n: int = typer.Option(20, "--n", help="Concepts to list."),
        split: str | None = typer.Option(None, help="One split (default: all).")) -> None:
    """The concepts most often chosen as labels, with counts and share of all label slots."""
    from pipeline.concepts import count_labels, open_label_store, pick_splits

    store = open_label_store(labels)
    splits = pick_splits(store, split)
    c = count_labels(store, splits)
    typer.echo(f"{labels} ({', '.join(splits)}): {c.slots:,} label slots on {c.valid_rows:,} valid positions, "
               f"{c.distinct:,} of {store.spec.n_latents:,} concepts used")
    typer.echo(f"{'rank':>6}  {'concept':>8}  {'count':>12}  {'share':>8}")
    for rank, concept, count, share, _, _ in c.table().head(n).iter_rows():
        typer.echo(f"{rank:>6}  {concept:>8}  {count:>12,}  {share:>8.3%}")


@app.command("describe")
def describe(labels: Path, concept: int = typer.Argument(..., metavar="ID", help="Concept id."),
             tokens: Path | None = typer.Option(None, help="Token store (default: the path the labels record)."),
             n: int = typer.Option(5, "--n", help="Contexts to show."),
             context: int = typer.Option(12, help="Tokens of context on each side."),
             split: str | None = typer.Option(None, help="One split (default: all).")) -> None:
    """How often a concept is a label, its mean score, and its best contexts as the first label."""
    from pipeline.concepts import describe_concept, open_label_store, pick_splits, token_store_for
    from storage_schemas import UserError

    if n < 1 or context < 0:
        raise UserError("--n must be positive and --context non-negative")
    store = open_label_store(labels)
    splits = pick_splits(store, split)
    d = describe_concept(store, concept, token_store_for(store, tokens), splits, n=n, width=context)
    typer.echo(f"concept {d.concept} in {labels} ({', '.join(splits)})")
    typer.echo(f"label: {d.count:,} of {d.slots:,} label slots ({d.count / max(d.slots, 1):.3%}); "
               f"first label at {d.first:,} positions; mean score {d.mean_score:.4g}")
    if not d.contexts:
        typer.echo("never the first label: no contexts to show")
        return
    typer.echo(f"top {len(d.contexts)} contexts where it is the first label, by score:")
    for split_name, position, score, text in d.contexts:
        typer.echo(f"{score:>10.4g}  {split_name}:{position:<10}  {text}")
