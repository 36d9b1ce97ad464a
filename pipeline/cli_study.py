"""`cocomix study`: every arm x seed of the study, resumable (see pipeline/study.py)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command("study")
def study(
    out: Path = typer.Option(Path("out/study"), "--out", "-o", help="Study folder (created, or resumed)."),
    seeds: int = typer.Option(3, help="Seeds per arm (0 .. seeds-1)."),
    student_tokens: int = typer.Option(2_760_000, help="Training tokens per student."),
    corpus: list[Path] = typer.Option([Path("data/corpus")], help="Corpus files or folders (repeatable)."),
    val_fraction: float = typer.Option(0.03, help="Share of the documents held out for validation."),
    teacher: str = typer.Option("data/demo/teacher", help="Teacher: local transformers folder or hub name."),
    sae: Path = typer.Option(Path("data/demo/sae"), help="SAE checkpoint on the teacher."),
    layer: int = typer.Option(1, help="Teacher block the SAE reads."),
    window: int = typer.Option(256, help="Window length of labels and students."),
    preset: str = typer.Option("demo", help="Student preset (TrainConfig)."),
    arms: str | None = typer.Option(None, help="Comma-separated arms (default: all). See `--plan`."),
    jobs: int = typer.Option(2, help="Processes at a time, one thread each."),
    eval_interval: int = typer.Option(48, help="Steps between evaluations on the whole validation split."),
    sets: list[str] = typer.Option([], "--set", help="key=value TrainConfig override for every student."),
    keep: Path | None = typer.Option(None, help="Folder that receives each finished run's config, metrics and "
                                     "run.json (and the report); its runs that match the plan count as finished."),
    hours: float | None = typer.Option(None, help="Start no job that would end past this many hours from now."),
    plan: bool = typer.Option(False, "--plan", help="Print the plan (and what is done) and stop."),
) -> None:
    """Train every arm x seed on shared label stores and compare them; rerun to resume."""
    from pipeline.study import ARMS, StudyConfig, run_study

    cfg = StudyConfig(out=out, seeds=seeds, student_tokens=student_tokens, corpus=tuple(corpus), val_fraction=val_fraction,
                      teacher=teacher,
                      sae=sae, layer=layer, window=window, preset=preset, jobs=jobs, eval_interval=eval_interval,
                      arms=tuple(a.strip() for a in arms.split(",") if a.strip()) if arms else tuple(ARMS),
                      sets=tuple(sets), keep=keep, hours=hours, plan_only=plan)
    report, failures = run_study(cfg)
    for line in failures:
        typer.echo(f"error: {line}", err=True)
    if failures:
        typer.echo(f"error: {len(failures)} job(s) failed; fix the cause and rerun the same command", err=True)
        raise typer.Exit(1)
