"""`cocomix compare`: validation-loss curves and the sample-efficiency figure across runs.

Runs are grouped by folder name without a seed suffix (`cocomix-seed0`, `cocomix-seed1`); each group shows the mean
and spread of its final validation loss, because single-seed differences of a few hundredths of a nat are
within noise at demo scale. The paper's sample-efficiency figure: the tokens CoCoMix needed to reach the
NTP baseline's final validation loss, as a percentage of the tokens NTP trained on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage_schemas import UserError


@dataclass(frozen=True)
class Run:
    path: Path
    info: dict
    tokens: np.ndarray  # (E,) training tokens at each eval
    val_loss: np.ndarray  # (E,)

    @property
    def mode(self) -> str:
        return self.info.get("mode", "?")

    @property
    def params(self) -> int:
        return int(self.info.get("n_params", 0))


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics, info_file = path / "metrics.jsonl", path / "run.json"
    if not metrics.is_file() or not info_file.is_file():
        raise UserError(f"{path} is not a training run: expected {metrics.name} and {info_file.name} in it")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("val_loss") is not None]
    if not evals:
        raise UserError(f"{metrics} has no validation evaluations yet")
    return Run(path, json.loads(info_file.read_text()), np.array([r["tokens"] for r in evals], float),
               np.array([r["val_loss"] for r in evals], float))


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs by folder name without a trailing seed (`cocomix-seed1` -> `cocomix`): the seeds of one setup."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(re.sub(r"[-_]?seed\d+$", "", r.path.name) or r.mode, []).append(r)
    return groups


def mean_curve(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Mean validation loss over seeds on the first run's eval grid (runs of a group share a schedule)."""
    grid = runs[0].tokens
    return grid, np.mean([np.interp(grid, r.tokens, r.val_loss) for r in runs], axis=0)


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, target: float) -> float | None:
    """First token count at which a (linearly interpolated) loss curve reaches `target`; None if never."""
    hit = np.nonzero(loss <= target)[0]
    if not len(hit):
        return None
    i = hit[0]
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
    return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))


def summarize(groups: dict[str, list[Run]]) -> list[dict]:
    rows = []
    for name, runs in groups.items():
        finals = np.array([r.val_loss[-1] for r in runs])
        rows.append({"run": name, "mode": runs[0].mode, "seeds": len(runs), "params": runs[0].params,
                     "tokens": int(runs[0].tokens[-1]), "val_loss": float(finals.mean()),
                     "val_loss_std": float(finals.std(ddof=1)) if len(runs) > 1 else 0.0,
                     "val_ppl": float(np.mean(np.exp(finals))),
                     "tokens_per_s": float(np.mean([r.info.get("tokens_per_s", math.nan) for r in runs])),
                     "label_fingerprint": runs[0].info.get("label_fingerprint")})
    return rows


def sample_efficiency(groups: dict[str, list[Run]]) -> dict[str, dict[str, float | None]]:
    """{ntp group: {other group: % of that NTP run's tokens needed to reach its final val loss}}.

    Every NTP group is a baseline: the same-width one and the one widened to CoCoMix's parameter count.
    """
    out = {}
    for base, base_runs in groups.items():
        if base_runs[0].mode != "ntp":
            continue
        b_tokens, b_loss = mean_curve(base_runs)
        out[base] = {}
        for name, runs in groups.items():
            if runs[0].mode != "ntp":
                reached = tokens_to_reach(*mean_curve(runs), b_loss[-1])
                out[base][name] = None if reached is None else 100.0 * reached / b_tokens[-1]
    return out


def plot(groups: dict[str, list[Run]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in groups.items():
        grid, mean = mean_curve(runs)
        line, = ax.plot(grid / 1e6, mean, label=f"{name} (n={len(runs)})")
        for r in runs if len(runs) > 1 else []:
            ax.plot(r.tokens / 1e6, r.val_loss, color=line.get_color(), alpha=0.25, lw=0.8)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict], efficiency: dict) -> str:
    lines = ["| run | mode | seeds | params | tokens | val loss | val ppl | tokens/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        spread = f" ± {r['val_loss_std']:.3f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['run']} | {r['mode']} | {r['seeds']} | {r['params'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['val_loss']:.3f}{spread} | {r['val_ppl']:.1f} | {r['tokens_per_s']:.0f} |")
    for base, others in efficiency.items():
        lines += ["", f"Sample efficiency against `{base}`: tokens needed to reach its final validation loss, "
                  f"as a share of the tokens it trained on (lower is better; the paper's figure)."]
        for name, pct in others.items():
            lines.append(f"- `{name}`: " + (f"{pct:.0f}%" if pct is not None else "did not reach it"))
    fps = sorted({r["label_fingerprint"] for r in rows if r["label_fingerprint"]})
    if fps:
        lines += ["", "Label set(s): " + ", ".join(f"`{f}`" for f in fps)]
    return "\n".join(lines) + "\n"


def compare(run_dirs: list[Path], out: Path) -> Path:
    """Write `<out>/report.md` and `<out>/val_loss.png` comparing the runs; return the report's path."""
    if not run_dirs:
        raise UserError("give at least one run folder to compare")
    groups = group_runs([load_run(p) for p in run_dirs])
    rows = summarize(groups)
    efficiency = sample_efficiency(groups)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(groups, out / "val_loss.png")
    text = "# CoCoMix comparison\n\n![validation loss](val_loss.png)\n\n" + markdown(rows, efficiency)
    report = out / "report.md"
    tmp = report.with_name(".report.md.tmp")
    tmp.write_text(text)
    tmp.replace(report)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "sample_efficiency_pct": efficiency}, indent=2))
    return report
