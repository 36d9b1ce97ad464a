"""The `cocomix` command line: one Typer app whose groups come from each package.

Every command's user mistakes raise `storage_schemas.UserError`; this root turns them into one line on
stderr and exit code 2, so no user ever sees a traceback for a bad path or mismatched store; an OSError
(disk full, a read-only target) becomes one line naming the file, exit code 1.
"""

from __future__ import annotations

import typer
from typer._click.exceptions import (
    UsageError,  # typer >= 0.20 vendors click: the real click's classes differ
)
from typer.core import TyperGroup

from storage_schemas import UserError


class CocomixGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except UsageError as e:  # bad option value or type, unknown command: one line too, not a box
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{where}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # disk full, read-only target: the system's reason and the path, exit 1
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=CocomixGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="CoCoMix: concept labels from a teacher + SAE, and students trained on them.")


def _mount() -> None:
    # Each package owns its commands; these modules import only typer at the top, so startup stays fast.
    import sae.cli
    import trainer.cli
    from pipeline import cli_concepts, cli_extract, cli_plan, cli_shards, cli_study, cli_tokenize

    app.add_typer(cli_tokenize.app)
    app.add_typer(sae.cli.app, name="sae", help="Train, evaluate and inspect sparse autoencoders.")
    app.add_typer(cli_extract.app)
    app.add_typer(cli_shards.app, name="shards", help="Inspect, validate and convert token and label stores.")
    app.add_typer(cli_concepts.app, name="concepts", help="Which concepts the labels use, and where.")
    app.add_typer(trainer.cli.app)
    app.add_typer(cli_study.app)
    app.add_typer(cli_plan.app)


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
