"""`cocomix downstream`: score students on lm-evaluation-harness tasks; the downstream table of `cocomix compare`.

Each student is the harness model `cocomix` (trainer/harness.py). The default tasks are the offline stand-ins
shipped in data/tasks (built by `python -m pipeline.tasks` from the corpus's validation documents); any
harness task name works where its data can be had (`--tasks lambada_openai,hellaswag` with the hub reachable).
Results go to `<run>/downstream.json`, which `cocomix compare` reads for its downstream table (mean and sample
standard deviation over seeds). lm-eval is imported only when scoring: `compare` works without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from storage_schemas import UserError, write_json_atomic

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "tasks"
OFFLINE_TASKS = ("cocomix_cloze", "cocomix_continuation", "cocomix_ppl")
RESULTS = "downstream.json"


@dataclass(frozen=True)
class DownstreamConfig:
    """One `cocomix downstream` call."""

    runs: tuple[Path, ...]
    """Run folders (their latest checkpoint) or checkpoint folders; results are written into each."""
    tasks: tuple[str, ...] = OFFLINE_TASKS
    """Harness task, group or tag names."""
    tasks_dir: Path = TASKS_DIR
    """Folder of extra task YAMLs (lm-eval's --include_path)."""
    limit: int | None = None
    """Score at most this many items per task (lm-eval's --limit)."""
    batch_size: int = 16
    device: str = "cpu"
    bootstrap_iters: int = 0
    """lm-eval's bootstrap resamples for the standard error of non-mean metrics (perplexities); 0 skips them,
    which the table does not use (its spread is over seeds)."""

    def __post_init__(self):
        if not self.runs:
            raise UserError("give at least one run or checkpoint folder to score")
        if not self.tasks:
            raise UserError("--tasks is empty: name at least one task, e.g. cocomix_cloze")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")


def task_manager(cfg: DownstreamConfig):
    """lm-eval's TaskManager over the task folder, with its built-in tasks only when a name needs them
    (indexing those takes seconds); an unknown name is refused before any model loads."""
    from lm_eval.tasks import TaskManager

    if not Path(cfg.tasks_dir).is_dir():
        raise UserError(f"task folder {cfg.tasks_dir} does not exist: build it with `python -m pipeline.tasks`")
    tm = TaskManager(include_path=str(cfg.tasks_dir), include_defaults=False)
    if any(t not in tm.all_tasks for t in cfg.tasks):
        tm = TaskManager(include_path=str(cfg.tasks_dir))
    if unknown := [t for t in cfg.tasks if t not in tm.all_tasks]:
        raise UserError(f"unknown task {unknown[0]!r}: the offline tasks are {', '.join(OFFLINE_TASKS)} "
                        f"(in {cfg.tasks_dir}); see `lm_eval ls tasks` for the harness's own")
    return tm


def expected_tokenizers(tm, tasks: tuple[str, ...]) -> dict[str, str]:
    """{task: tokenizer fingerprint its data was built for} over the named tasks and the members of named tags."""
    index, out = tm.task_index, {}
    for name in tasks:
        entries = [index[name]] if index[name].cfg else [e for e in index.values() if name in e.tags and e.cfg]
        for e in entries:
            if fp := (e.cfg.get("metadata") or {}).get("tokenizer_fingerprint"):
                out[e.name] = fp
    return out


def check_tokenizer(lm, expected: dict[str, str]) -> None:
    have = lm.meta.get("tokenizer_fingerprint")
    for task, want in expected.items():
        if have and have != want:
            raise UserError(f"{lm.ckpt} was trained with tokenizer {have[:12]}, but the data of task {task} was "
                            f"built for {want[:12]}: rebuild the tasks with `python -m pipeline.tasks --tokenizer "
                            f"DIR` for this student's tokenizer")


def summarize(results: dict, lm) -> dict:
    """lm-eval's results -> {task: {metric: value}} and {task: items scored / items in the task}."""
    metrics, samples = {}, {}
    for task, values in results["results"].items():
        metrics[task] = {k.split(",")[0]: v for k, v in values.items()
                         if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    for task, n in results.get("n-samples", {}).items():
        samples[task] = {"scored": n["effective"], "total": n["original"]}
    return {"checkpoint": str(lm.ckpt), "mode": lm.model.cfg.mode, "metrics": metrics, "samples": samples,
            "lm_eval_version": results.get("lm_eval_version")}


def downstream(cfg: DownstreamConfig) -> list[dict]:
    """Score every run on every task; write `<run>/downstream.json`; one summary per run. Every refusal
    (unknown task, missing checkpoint, another tokenizer) happens before the first run is scored."""
    import lm_eval

    from trainer.harness import CocomixLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines drown the results
    tm = task_manager(cfg)
    expected = expected_tokenizers(tm, cfg.tasks)
    lms = [CocomixLM(checkpoint=str(run), device=cfg.device, batch_size=cfg.batch_size) for run in cfg.runs]
    for lm in lms:
        check_tokenizer(lm, expected)
    out = []
    for run, lm in zip(cfg.runs, lms, strict=True):
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit,
                                              bootstrap_iters=cfg.bootstrap_iters, log_samples=False)
        except ConnectionError as e:  # a harness task whose data lives on the hub, which is out of reach
            raise UserError(f"{e}: the harness's own tasks need the dataset hub; offline, score the shipped "
                            f"stand-ins ({', '.join(OFFLINE_TASKS)})") from None
        summary = summarize(results, lm) | {"tasks": list(cfg.tasks), "limit": cfg.limit}
        write_json_atomic(Path(run) / RESULTS, summary)
        out.append(summary)
    return out


def format_summary(s: dict) -> list[str]:
    lines = [f"{s['checkpoint']} ({s['mode']})"]
    for task, values in s["metrics"].items():
        n = s["samples"].get(task)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        lines.append(f"  {task}: {shown}" + (f"  ({n['scored']} of {n['total']} items scored)" if n else ""))
    return lines


# --- the downstream table of `cocomix compare` -------------------------------------------------------------

def load_results(run_dir: Path) -> dict | None:
    file = Path(run_dir) / RESULTS
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        raise UserError(f"{file} is not valid JSON: rerun `cocomix downstream {run_dir}`") from None


def downstream_rows(groups: dict[str, list]) -> list[dict]:
    """Per group of runs (seeds), each task metric as mean and sample std over the seeds that were scored."""
    from trainer.report import mean_std

    rows = []
    for name, runs in groups.items():
        scored = [r for r in (load_results(run.path) for run in runs) if r]
        if not scored:
            continue
        keys = sorted({(t, m) for r in scored for t, ms in r["metrics"].items() for m in ms})
        cells = {}
        for t, m in keys:
            values = [r["metrics"][t][m] for r in scored if m in r["metrics"].get(t, {})]
            mean, std = mean_std(values)
            cells[f"{t} {m}"] = {"mean": mean, "std": std, "n": len(values)}
        items = {t: n["scored"] for r in scored[:1] for t, n in r.get("samples", {}).items()}
        rows.append({"run": name, "mode": runs[0].mode, "seeds": len(scored), "metrics": cells, "items": items})
    return rows


def downstream_markdown(rows: list[dict]) -> str:
    """The table (one column per task metric), or "" when no run has been scored."""
    from trainer.report import pm

    if not rows:
        return ""
    cols = sorted({c for r in rows for c in r["metrics"]})
    items = {t: n for r in rows for t, n in r["items"].items()}
    lines = ["", "## Downstream tasks", "",
             "`cocomix downstream` through lm-evaluation-harness: mean ± sample standard deviation over the seeds "
             "scored (perplexities: lower is better; accuracies: higher). Items scored per task: "
             + ", ".join(f"{t} {n}" for t, n in sorted(items.items())) + ".", "",
             "| run | mode | seeds |" + "".join(f" {c} |" for c in cols), "| --- | --- | ---: |" + " ---: |" * len(cols)]
    for r in rows:
        cells = [pm(r["metrics"][c]["mean"], r["metrics"][c]["std"], ".4g") if c in r["metrics"] else "—"
                 for c in cols]
        lines.append(f"| {r['run']} | {r['mode']} | {r['seeds']} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"
