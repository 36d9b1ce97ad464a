"""`make bench`: run every bench/bench_*.py and print one table.

Each script's `main()` returns rows (name, value, unit, note). Targets are ratios measured side by side in
the same run, because machines here are shared and noisy.
"""

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    only = sys.argv[1:]
    rows = []
    for name in names:
        if only and not any(o in name for o in only):
            continue
        t0 = time.perf_counter()
        print(f"# running {name} ...", file=sys.stderr, flush=True)
        rows += [(name.removeprefix("bench_"), *map(str, r)) for r in importlib.import_module(f"bench.{name}").main()]
        print(f"# {name} took {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    head = ("bench", "measure", "value", "unit", "note")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)))


if __name__ == "__main__":
    main()
