"""Makes lm-eval's own `lm_eval` command see the `cocomix` model (and the offline tasks).

lm-eval 0.4 has no entry-point group for models: its registry holds its own table plus what an import
registered. `make setup` installs `cocomix_lm_eval.pth` into the virtualenv's site-packages; Python runs
its one line at startup, and only when the program is `lm_eval` (or `lm-eval`) does it import this module,
which
- registers `cocomix` as a lazy entry (torch and the student load when the model is first built),
- puts the shipped offline tasks (data/tasks) on `--include_path` when a `cocomix_*` task is named and no
  include path is given, as `cocomix-lm-eval` does,
- turns a user's mistake in the cocomix model's arguments into one line and exit code 2.
Every other program started from the virtualenv is untouched.
"""

from __future__ import annotations

import sys

import lm_eval.__main__
import lm_eval.models  # noqa: F401  # fills lm-eval's table first: it fills it only while the registry is empty
from lm_eval.api.registry import model_registry

from storage_schemas import UserError
from trainer.downstream import TASKS_DIR

if "cocomix" not in model_registry:
    model_registry.register("cocomix", target="trainer.harness:CocomixLM")


def _names_our_tasks(args: list[str]) -> bool:
    values = [v for a, v in zip(args, [*args[1:], ""], strict=True) if a == "--tasks"]
    values += [a.split("=", 1)[1] for a in args if a.startswith("--tasks=")]
    return any("cocomix_" in v for v in values)


if _names_our_tasks(sys.argv) and TASKS_DIR.is_dir() and not any(a.startswith("--include_path") for a in sys.argv):
    sys.argv += ["--include_path", str(TASKS_DIR)]

_cli_evaluate = lm_eval.__main__.cli_evaluate


def cli_evaluate() -> None:
    try:
        _cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# the `lm_eval` script imports cli_evaluate from lm_eval.__main__ after this ran (site-packages' .pth files
# run before the script), so it gets the wrapper
lm_eval.__main__.cli_evaluate = cli_evaluate
