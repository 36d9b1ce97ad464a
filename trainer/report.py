"""`cocomix compare`: final losses over seeds, paired differences against the baselines, sample efficiency.

Runs are grouped by folder name without a seed suffix (`cocomix-seed0`, `cocomix-seed1`: one arm). Differences of
a few hundredths of a nat are within seed noise at demo scale, so every arm is compared with each NTP baseline
seed by seed (arm seed s against baseline seed s, which saw the same data order and initialisation seed), with a
95% t confidence interval on the mean paired difference; a CI that contains 0 is reported as "inside noise".
`--against GROUP` adds baselines by name: the study measures its label-selection arms against `cocomix`
(the official signed attribution), which the NTP baselines alone cannot separate.
The paper's sample-efficiency figure is computed per seed pair too: the tokens the arm's curve needed to reach
the baseline's final validation loss, as a percentage of the tokens the baseline trained on.
Where the metrics carry `val_sources` (loss per corpus source), each source gets its own columns and panel.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage_schemas import UserError, write_json_atomic

CONFIDENCE = 0.95
BAND = "band: min..max over seeds"


@dataclass(frozen=True)
class Run:
    path: Path
    info: dict
    tokens: np.ndarray  # (E,) training tokens at each eval
    val_loss: np.ndarray  # (E,) loss over all evaluated validation tokens
    sources: dict[str, np.ndarray]  # source -> (E,) its loss at each eval, NaN where that eval did not report it
    final_sources: dict[str, float]  # source -> final loss ({} for runs logged before sources existed)

    @property
    def mode(self) -> str:
        return self.info.get("mode", "?")

    @property
    def params(self) -> int:
        return int(self.info.get("n_params", 0))

    @property
    def seed(self) -> int | None:
        """run.json's seed; the folder's `-seedN` suffix for runs that predate it."""
        if self.info.get("seed") is not None:
            return int(self.info["seed"])
        m = re.search(r"seed(\d+)$", self.path.name)
        return int(m.group(1)) if m else None

    def curve(self, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss) of the total (source None) or of one source, at the evals that reported it."""
        if source is None:
            return self.tokens, self.val_loss
        loss = self.sources.get(source, np.full(len(self.tokens), np.nan))
        keep = ~np.isnan(loss)
        return self.tokens[keep], loss[keep]

    def final(self, source: str | None = None) -> float | None:
        return float(self.val_loss[-1]) if source is None else self.final_sources.get(source)


def clean_sources(d: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items() if v is not None and not math.isnan(v)}


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics, info_file = path / "metrics.jsonl", path / "run.json"
    if not metrics.is_file() or not info_file.is_file():
        raise UserError(f"{path} is not a training run: expected {metrics.name} and {info_file.name} in it")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("val_loss") is not None]
    if not evals:
        raise UserError(f"{metrics} has no validation evaluations yet")
    info = json.loads(info_file.read_text())
    per_eval = [clean_sources(r.get("val_sources")) for r in evals]
    names = sorted({s for d in per_eval for s in d})
    sources = {s: np.array([d.get(s, np.nan) for d in per_eval]) for s in names}
    # The last eval row is what the total's final loss comes from, so its sources are the matching finals;
    # run.json's copy only fills in when the metrics lack them.
    final = per_eval[-1] or clean_sources(info.get("final_val_sources"))
    return Run(path, info, np.array([r["tokens"] for r in evals], float),
               np.array([r["val_loss"] for r in evals], float), sources, final)


def group_name(path: Path) -> str:
    """A run folder's group: its name without a trailing seed (`cocomix-seed1` -> `cocomix`)."""
    return re.sub(r"[-_]?seed\d+$", "", Path(path).name)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs by folder name without a trailing seed (`cocomix-seed1` -> `cocomix`): the seeds of one setup.

    Two runs of one group with the same seed would make the seed pairing ambiguous, so that is refused."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(group_name(r.path) or r.mode, []).append(r)
    for name, members in groups.items():
        seen: dict[int, Path] = {}
        for r in members:
            if r.seed is not None and r.seed in seen:
                raise UserError(f"runs {seen[r.seed]} and {r.path} of group `{name}` both have seed {r.seed}: "
                                f"pass one run folder per seed")
            seen[r.seed] = r.path
    return groups


def source_names(groups: dict[str, list[Run]]) -> list[str]:
    return sorted({s for runs in groups.values() for r in runs for s in r.final_sources})


def baselines(groups: dict[str, list[Run]], against: tuple[str, ...] = ()) -> list[str]:
    """Every NTP group is a baseline (the same-width one and the one widened to CoCoMix's parameter count),
    then each group named in `against` (e.g. `cocomix`, the reference for the label-selection arms)."""
    missing = [a for a in against if a not in groups]
    if missing:
        raise UserError(f"--against {', '.join(missing)}: no such group among the runs ({', '.join(groups)})")
    ntp = [name for name, runs in groups.items() if runs[0].mode == "ntp"]
    return ntp + [a for a in dict.fromkeys(against) if a not in ntp]


def compared(groups: dict[str, list[Run]], base: str) -> list[str]:
    """The arms measured against `base`: every group that is not NTP (NTP groups are the baselines) nor `base`."""
    return [name for name, runs in groups.items() if runs[0].mode != "ntp" and name != base]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None below two values)."""
    if not values:
        return None, None
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


# --- Student t quantile (no scipy): P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2), solved for t by bisection.

def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, modified Lentz (Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return float(x >= 1.0)
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return math.exp(log_front) * _beta_cf(a, b, x) / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > t) for Student's t with df degrees of freedom."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_critical(df: float, confidence: float = CONFIDENCE) -> float:
    """t such that P(|T| <= t) = confidence: the multiplier of sd/sqrt(n) in a two-sided t interval."""
    alpha, lo, hi = 1.0 - confidence, 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def paired_difference(arm: dict[int, float], base: dict[int, float]) -> dict:
    """Mean of arm - baseline over the seeds both ran, with a t CI (negative = arm better).

    verdict: "better" / "worse" when the CI excludes 0, "inside noise" when it contains it, "no CI" below 2 pairs."""
    seeds = sorted(set(arm) & set(base))
    diffs = [arm[s] - base[s] for s in seeds]
    mean, sd = mean_std(diffs)
    out = {"n": len(seeds), "seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd,
           "t": None, "ci_low": None, "ci_high": None, "verdict": "no CI" if seeds else "no shared seed"}
    if len(seeds) >= 2:
        t = t_critical(len(seeds) - 1)
        half = t * sd / math.sqrt(len(seeds))
        lo, hi = mean - half, mean + half
        verdict = "better" if hi < 0 else "worse" if lo > 0 else "inside noise"
        out.update(t=t, ci_low=lo, ci_high=hi, verdict=verdict)
    return out


def finals_by_seed(runs: list[Run], source: str | None = None) -> dict[int, float]:
    return {r.seed: r.final(source) for r in runs if r.seed is not None and r.final(source) is not None}


def paired_differences(groups: dict[str, list[Run]], bases: list[str]) -> dict[str, dict[str, dict]]:
    """{baseline: {arm: {"total": difference, "sources": {source: difference}}}} for every non-NTP arm."""
    names = source_names(groups)
    out = {}
    for base in bases:
        out[base] = {}
        for arm in compared(groups, base):
            runs = groups[arm]
            total = paired_difference(finals_by_seed(runs), finals_by_seed(groups[base]))
            per = {s: paired_difference(finals_by_seed(runs, s), finals_by_seed(groups[base], s)) for s in names}
            out[base][arm] = {"total": total, "sources": {s: d for s, d in per.items() if d["n"]}}
    return out


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


def reach_by_seed(arm: list[Run], base: list[Run]) -> dict:
    """Per seed pair: tokens the arm's curve needed to reach the baseline's final val loss, as % of its tokens."""
    bases = {r.seed: r for r in base if r.seed is not None}
    pairs = []
    for r in sorted((r for r in arm if r.seed in bases), key=lambda r: r.seed):
        b = bases[r.seed]
        reached = tokens_to_reach(r.tokens, r.val_loss, b.final())
        pairs.append({"seed": r.seed, "target": b.final(), "baseline_tokens": float(b.tokens[-1]), "tokens": reached,
                      "pct": None if reached is None else 100.0 * reached / b.tokens[-1]})
    mean, std = mean_std([p["pct"] for p in pairs if p["pct"] is not None])
    return {"n": len(pairs), "reached": sum(p["pct"] is not None for p in pairs), "mean_pct": mean,
            "std_pct": std, "pairs": pairs}


def sample_efficiency(groups: dict[str, list[Run]], bases: list[str]) -> dict[str, dict[str, dict]]:
    """{baseline: {arm: reach_by_seed}} for every non-NTP arm."""
    return {base: {arm: reach_by_seed(groups[arm], groups[base]) for arm in compared(groups, base)}
            for base in bases}


def summarize(groups: dict[str, list[Run]]) -> list[dict]:
    """One row per group: final validation loss (total and per source) as mean and sample std over seeds."""
    rows = []
    for name, runs in groups.items():
        finals = np.array([r.final() for r in runs])
        per_source = {}
        for s in source_names(groups):
            values = [r.final(s) for r in runs if r.final(s) is not None]
            if values:
                mean, std = mean_std(values)
                per_source[s] = {"mean": mean, "std": std, "n": len(values)}
        speeds = [r.info["tokens_per_s"] for r in runs if r.info.get("tokens_per_s") is not None]
        rows.append({"run": name, "mode": runs[0].mode, "seeds": len(runs), "seed_list": [r.seed for r in runs],
                     "params": runs[0].params, "tokens": int(runs[0].tokens[-1]), "val_loss": float(finals.mean()),
                     "val_loss_std": float(finals.std(ddof=1)) if len(runs) > 1 else 0.0,
                     "val_ppl": float(np.mean(np.exp(finals))), "sources": per_source,
                     "tokens_per_s": float(np.mean(speeds)) if speeds else None,
                     "label_fingerprint": runs[0].info.get("label_fingerprint")})
    return rows


def seed_curves(runs: list[Run], source: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(grid (E,), losses (R, E)): each seed's curve on the first one's eval grid, cut to the range all cover."""
    curves = [r.curve(source) for r in runs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return None
    grid = curves[0][0]
    grid = grid[grid <= min(t[-1] for t, _ in curves)]
    return grid, np.stack([np.interp(grid, t, loss) for t, loss in curves])


ZOOM_NATS = 0.5
"""The zoomed row shows the arms whose final loss is within this many nats of the best arm's."""


def zoomed(finals: dict[str, float]) -> list[str]:
    """The groups the zoomed row shows: final mean loss within ZOOM_NATS of the best group's."""
    best = min(finals.values(), default=0.0)
    return [name for name, final in finals.items() if final <= best + ZOOM_NATS]


def _draw(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], colors: dict[str, str], start: float) -> None:
    """Mean over seeds and a min..max band for every group, from `start` training tokens on."""
    for name, (grid, losses) in curves.items():
        keep = grid >= start
        x, y = grid[keep] / 1e6, losses[:, keep]
        ax.plot(x, y.mean(0), color=colors[name], label=f"{name} (n={len(y)})")
        if len(y) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=colors[name], alpha=0.2, lw=0)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3)


def _ylim(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], start: float) -> None:
    values = [losses[:, grid >= start] for grid, losses in curves.values()]
    if values and all(v.size for v in values):
        lo, hi = min(v.min() for v in values), max(v.max() for v in values)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))


def plot(groups: dict[str, list[Run]], out: Path) -> None:
    """A column for the total validation loss and one per source: mean over seeds, band min..max over seeds.

    Top row: the whole run past its first fifth (the first evals, near ln V, would flatten the differences).
    Bottom row: the second half of training, zoomed onto the arms within ZOOM_NATS of the best final loss,
    so that an arm far behind (a stalled one) does not set the scale for the close comparisons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [None, *source_names(groups)]
    colors = {name: f"C{i % 10}" for i, name in enumerate(groups)}
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8.4), squeeze=False)
    for col, source in enumerate(panels):
        curves = {name: seed_curves(runs, source) for name, runs in groups.items()}
        curves = {name: c for name, c in curves.items() if c is not None}
        title = "all validation tokens" if source is None else f"source: {source}"
        end = max((grid[-1] for grid, _ in curves.values()), default=0.0)
        top, bottom = axes[0][col], axes[1][col]
        _draw(top, curves, colors, 0.0)
        _ylim(top, curves, 0.2 * end)
        top.set_title(title)
        near = {n: curves[n] for n in zoomed({n: float(losses.mean(0)[-1]) for n, (_, losses) in curves.items()})}
        _draw(bottom, near, colors, 0.5 * end)
        _ylim(bottom, near, 0.5 * end)
        off = [n for n in curves if n not in near]
        bottom.set_title(f"{title}: second half, zoomed" + (f"\n(off scale: {', '.join(off)})" if off else ""),
                         fontsize=9)
    axes[0][0].legend(title=f"mean over seeds; {BAND}", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(out)


def pm(mean: float | None, std: float | None, fmt: str = ".3f", unit: str = "") -> str:
    if mean is None:
        return "—"
    return f"{mean:{fmt}}{unit}" + (f" ± {std:{fmt}}{unit}" if std is not None else "")


def source_cell(c: dict | None, seeds: int) -> str:
    if c is None:
        return "—"
    return pm(c["mean"], c["std"]) + (f" (n={c['n']})" if c["n"] < seeds else "")


def final_table(rows: list[dict], sources: list[str]) -> list[str]:
    per_source = ", over all validation tokens and per source (n = seeds that reported it, when fewer)."
    lines = ["Final validation loss (nats): mean ± sample standard deviation over seeds"
             + (per_source if sources else "."), "",
             "| run | mode | seeds | params | tokens | val loss | val ppl | tokens/s |"
             + "".join(f" {s} |" for s in sources),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(sources)]
    for r in rows:
        cells = [source_cell(r["sources"].get(s), r["seeds"]) for s in sources]
        speed = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "—"
        lines.append(f"| {r['run']} | {r['mode']} | {r['seeds']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['tokens'] / 1e6:.2f}M | {pm(r['val_loss'], r['val_loss_std'] if r['seeds'] > 1 else None)} | "
                     f"{r['val_ppl']:.1f} | "
                     f"{speed} |" + "".join(f" {c} |" for c in cells))
    return lines


def diff_cell(d: dict) -> str:
    if d["mean"] is None:
        return "no shared seed"
    if d["ci_low"] is None:
        return f"{d['mean']:+.3f} (1 pair)"
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def paired_tables(paired: dict, sources: list[str]) -> list[str]:
    lines = ["## Paired differences against the baselines", "",
             "Final validation loss of the arm minus the baseline's, seed s against seed s over the seeds both ran "
             f"(negative = arm better), with a {CONFIDENCE:.0%} confidence interval from the t distribution with "
             "n - 1 degrees of freedom (n = pairs; none below 2).", "",
             "| arm | baseline | pairs | difference [95% CI] | verdict |", "| --- | --- | ---: | --- | --- |"]
    for base, arms in paired.items():
        for arm, d in arms.items():
            lines.append(f"| {arm} | {base} | {d['total']['n']} | {diff_cell(d['total'])} | {d['total']['verdict']} |")
    if sources:
        lines += ["", "Per source (difference [95% CI], verdict):", "",
                  "| arm | baseline |" + "".join(f" {s} |" for s in sources), "| --- | --- |" + " --- |" * len(sources)]
        for base, arms in paired.items():
            for arm, d in arms.items():
                cells = [f"{diff_cell(d['sources'][s])}, {d['sources'][s]['verdict']}" if s in d["sources"] else "—"
                         for s in sources]
                lines.append(f"| {arm} | {base} |" + "".join(f" {c} |" for c in cells))
    return lines


def efficiency_sections(efficiency: dict) -> list[str]:
    lines = []
    for base, arms in efficiency.items():
        lines += ["", f"## Sample efficiency against `{base}`", "",
                  f"Tokens each arm's seed-s run needed to reach `{base}` seed s's final validation loss, as a share "
                  f"of the tokens `{base}` trained on: mean ± sample std over the seed pairs that reached it "
                  "(lower is better; the paper's figure).", "",
                  "| arm | tokens to reach | reached |", "| --- | ---: | --- |"]
        for arm, e in arms.items():
            pct = pm(e["mean_pct"], e["std_pct"], ".0f", "%")
            lines.append(f"| {arm} | {pct} | in {e['reached']} of {e['n']} seeds |")
    return lines


def verdict_lists(paired: dict) -> list[str]:
    """Plain-English summary of the total-loss differences: which are inside noise, which are significant."""
    noise, significant, no_ci = [], [], []
    for base, arms in paired.items():
        for arm, d in arms.items():
            t = d["total"]
            if t["verdict"] == "inside noise":
                noise.append(f"- `{arm}` vs `{base}`: {diff_cell(t)}")
            elif t["verdict"] in ("better", "worse"):
                significant.append(f"- `{arm}` vs `{base}`: {t['verdict']}, {diff_cell(t)}")
            else:
                no_ci.append(f"- `{arm}` vs `{base}`: {diff_cell(t)}")
    lines = ["", "## Verdicts (total validation loss)", "",
             f"Inside noise ({CONFIDENCE:.0%} CI contains 0: no difference shown):", *(noise or ["- none"]), "",
             f"Significant ({CONFIDENCE:.0%} CI excludes 0):", *(significant or ["- none"])]
    if no_ci:
        lines += ["", "No CI (fewer than 2 paired seeds):", *no_ci]
    return lines


def markdown(rows: list[dict], paired: dict, efficiency: dict, sources: list[str]) -> str:
    lines = final_table(rows, sources)
    if any(paired.values()):
        lines += ["", *paired_tables(paired, sources), *efficiency_sections(efficiency), *verdict_lists(paired)]
    fps = sorted({r["label_fingerprint"] for r in rows if r["label_fingerprint"]})
    if fps:
        lines += ["", "Label set(s): " + ", ".join(f"`{f}`" for f in fps)]
    return "\n".join(lines) + "\n"


def compare(run_dirs: list[Path], out: Path, against: tuple[str, ...] = ()) -> Path:
    """Write `<out>/report.md`, `<out>/val_loss.png` and `<out>/summary.json`; return the report's path.

    The NTP groups are the baselines every other arm is measured against; `against` adds groups by name."""
    from trainer.downstream import downstream_markdown, downstream_rows  # it imports this module

    if not run_dirs:
        raise UserError("give at least one run folder to compare")
    groups = group_runs([load_run(p) for p in run_dirs])
    rows, sources = summarize(groups), source_names(groups)
    bases = baselines(groups, against)
    paired, efficiency = paired_differences(groups, bases), sample_efficiency(groups, bases)
    down = downstream_rows(groups)  # the runs `cocomix downstream` scored (<run>/downstream.json)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(groups, out / "val_loss.png")
    write_json_atomic(out / "summary.json", {
        "rows": rows, "sources": sources, "confidence": CONFIDENCE, "curves": f"mean over seeds; {BAND}",
        "paired": paired, "tokens_to_reach": efficiency,
        # the headline figure per (baseline, arm): mean % over the seed pairs that reached the target
        "sample_efficiency_pct": {b: {a: e["mean_pct"] for a, e in arms.items()} for b, arms in efficiency.items()},
        "downstream": down})
    text = f"# CoCoMix comparison\n\n![validation loss](val_loss.png)\n\n*Curves: mean over seeds; {BAND}.*\n\n"
    report = out / "report.md"
    tmp = report.with_name(f".report.md.tmp-{os.getpid()}")
    tmp.write_text(text + markdown(rows, paired, efficiency, sources) + downstream_markdown(down))
    tmp.replace(report)
    return report
