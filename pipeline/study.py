"""`cocomix study`: the method's claim tested with several seeds, the baselines and the paper's ablations.

One folder holds the whole study, and every stage finds its finished output and skips it, so a killed
study is finished by running the same command again:

    <out>/tokens                 the corpus with the teacher's tokenizer (whole train split)
    <out>/labels/<selection>     one label store per label selection (its own fingerprint); the selections
                                 after the signed one are extracted together, in one teacher pass
    <out>/runs/<arm>-seed<s>/    one student run per arm and seed (resumes from its last checkpoint)
    <out>/runs/<arm>-seed<s>.log
    <out>/report/                `cocomix compare` over every finished run

With a keep folder (`make study`: data/study, in the repository), each finished run's small files
(config.json, metrics.jsonl, run.json) are copied to <keep>/runs/<arm>-seed<s>/ as it finishes, and a
kept run whose config and input fingerprints equal the planned run's counts as finished. A study thus
spans machines and fresh checkouts: commit the keep folder, and the next checkout trains only what is
missing (label stores are re-extracted when a missing run needs them; they are deterministic).

Arms (every one on the same token store, seeds and budget; the labels come from the same teacher pass
settings, so the arms differ only in what they name):
    ntp, ntp-wide          next-token prediction; ntp-wide widened to CoCoMix's parameter count
    kd, pause              distillation from the teacher's stored top-K; pause tokens
    cocomix                concept prediction + mixing on the official signed-attribution labels
    cocomix-no-mix         concept prediction without mixing (the paper's ablation)
    cocomix-no-pred        mixing without concept prediction (lambda = 0; the paper's ablation)
    cocomix-<selection>    cocomix on other label selections: negated, absolute, activation

Jobs run as `cocomix extract` / `cocomix train` processes, `jobs` at a time with one thread each
(tiny models scale badly across threads; an extraction takes every slot). A study's folder is locked
while a driver runs it, and the children die with the driver, so two drivers never write one run.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.attribution import SELECTIONS
from storage_schemas import UserError


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str
    selection: str | None = None
    """Label selection whose store the arm trains on (cocomix, kd)."""
    sets: tuple[str, ...] = ()
    """TrainConfig overrides of the arm (`--set key=value`)."""
    tok_s: float = 2200.0
    """Single-thread training tokens/s on the 2-core development machine, two runs at a time (make demo);
    only for the plan's time estimate before a run of the arm has finished."""


ARMS = {a.name: a for a in (
    Arm("ntp", "ntp", tok_s=4166),
    Arm("ntp-wide", "ntp", tok_s=3073),  # n_embd set at plan time to match CoCoMix's parameter count
    Arm("cocomix", "cocomix", "signed", tok_s=2203),
    Arm("kd", "kd", "signed", tok_s=2142),
    Arm("pause", "pause", tok_s=2496),
    Arm("cocomix-no-mix", "cocomix", "signed", ("concept_mix=false",), tok_s=3000),
    Arm("cocomix-no-pred", "cocomix", "signed", ("concept_lambda=0",), tok_s=2203),
    Arm("cocomix-negated", "cocomix", "negated", tok_s=2203),
    Arm("cocomix-absolute", "cocomix", "absolute", tok_s=2203),
    Arm("cocomix-activation", "cocomix", "activation", tok_s=2203),
)}
# The order runs start in: the claim's core comparison first, for every seed, so that a study cut short
# has answered the main question; label selections last, after their extra extractions.
PHASES = (("cocomix", "ntp-wide", "ntp"), ("kd", "pause"), ("cocomix-no-mix", "cocomix-no-pred"),
          ("cocomix-negated", "cocomix-absolute", "cocomix-activation"))
EXTRACT_TOK_S = 5500.0  # labels/s of `cocomix extract` with 2 CPU workers here (make demo)


@dataclass(frozen=True)
class StudyConfig:
    """Everything `cocomix study` needs."""

    out: Path = Path("out/study")
    seeds: int = 3
    student_tokens: int = 2_760_000
    """Training tokens per student; the default is one pass over the embedded corpus's train split."""
    corpus: tuple[Path, ...] = (Path("data/corpus"),)
    val_fraction: float = 0.03
    """Share of the documents held out for validation (`cocomix tokenize`'s default, and make demo's)."""
    teacher: str = "data/demo/teacher"
    sae: Path = Path("data/demo/sae")
    layer: int = 1
    window: int = 256
    preset: str = "demo"
    arms: tuple[str, ...] = tuple(ARMS)
    jobs: int = 2
    """Processes at a time, one thread each; an extraction uses all of them as Ray workers."""
    eval_interval: int = 48
    """Optimizer steps between evaluations on the whole validation split."""
    teacher_topk: int = 32
    """Teacher top-K log-probabilities stored with the signed labels (the KD arm)."""
    sets: tuple[str, ...] = ()
    """TrainConfig overrides for every student (e.g. a smaller model for a quick check)."""
    keep: Path | None = None
    """Folder that receives each finished run's small files, and whose matching runs count as finished."""
    hours: float | None = None
    """Start no job whose estimated time would end past this many hours from now (a machine or session
    with a deadline); the rest is left for the next run of the same command."""
    plan_only: bool = False

    def __post_init__(self):
        if self.hours is not None and self.hours <= 0:
            raise UserError("--hours must be positive")
        if self.seeds < 1 or self.student_tokens < 1 or self.jobs < 1 or self.eval_interval < 1:
            raise UserError("--seeds, --student-tokens, --jobs and --eval-interval must be positive")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise UserError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(ARMS)}")


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path
    slots: int
    done: Path
    """The file that exists once the job has finished (a store's manifest, a run's run.json)."""
    hours: float
    needs: list[str] = field(default_factory=list)
    kept: bool = False
    """Finished elsewhere: its kept copy matches this job (a run only)."""
    keep: Path | None = None
    """Where a run's small files are copied once it finishes."""
    stores: tuple[Path, ...] = ()
    """The label stores an extraction writes (`done` is the first one's manifest). A manifest exists from
    a store's first moment: the job has finished when every unit of every store is written."""

    @property
    def store(self) -> bool:
        return bool(self.stores)

    def finished(self) -> bool:
        if self.kept:
            return True
        if self.stores:
            from storage_schemas import LabelStore

            return all((s / "manifest.json").exists() and LabelStore.open(s).complete for s in self.stores)
        return self.done.exists()


def cocomix_argv(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def selections(cfg: StudyConfig) -> list[str]:
    """The label selections the chosen arms train on, signed first."""
    used = {ARMS[a].selection for a in cfg.arms} - {None}
    return [s for s in SELECTIONS if s in used]


def ordered_arms(cfg: StudyConfig) -> list[list[str]]:
    return [[a for a in phase if a in cfg.arms] for phase in PHASES]


def wide_width(cfg: StudyConfig, vocab_size: int, n_concepts: int) -> int:
    """n_embd of an NTP student whose parameter count is closest to the CoCoMix student's (the paper's
    parameter-matched baseline), a multiple of the head count."""
    from dataclasses import replace

    import torch

    from trainer.config import build_config, parse_sets
    from trainer.model import GPT

    base = build_config(cfg.preset, None, {"block_size": cfg.window, **parse_sets(list(cfg.sets)), "mode": "cocomix"})
    base = replace(base, vocab_size=vocab_size, n_concepts=n_concepts)

    def params(c) -> int:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            return GPT(c.model_config()).num_params(non_embedding=False)

    target = params(base)
    widths = range(base.n_embd, 4 * base.n_embd + 1, base.n_head)
    return min(widths, key=lambda w: abs(params(replace(base, mode="ntp", n_embd=w)) - target))


def train_sets(cfg: StudyConfig, arm: Arm, wide: int, val_windows: int) -> list[str]:
    sets = [f"block_size={cfg.window}", *cfg.sets, f"eval_interval={cfg.eval_interval}",
            f"eval_windows={val_windows}", "threads=1", "ckpt_interval=100", *arm.sets]
    return sets + [f"n_embd={wide}"] if arm.name == "ntp-wide" else sets


def train_argv(cfg: StudyConfig, arm: Arm, seed: int, wide: int, val_windows: int) -> list[str]:
    out = cfg.out / "runs" / run_name(arm.name, seed)
    labels = ["--labels", cfg.out / "labels" / arm.selection] if arm.selection else []
    return cocomix_argv("train", "--preset", cfg.preset, "--mode", arm.mode, "--tokens", cfg.out / "tokens", *labels,
                        "--max-tokens", cfg.student_tokens, "--seed", seed, "--out", out,
                        *[x for s in train_sets(cfg, arm, wide, val_windows) for x in ("--set", s)])


# config.json keys a kept run may differ in: where its stores lay (the fingerprints say what they held) and
# what train reads from them (the vocabulary, the SAE's width: pinned by the same fingerprints)
UNCOMPARED = ("out", "tokens", "labels", "vocab_size", "n_concepts")


def planned_config(cfg: StudyConfig, arm: Arm, seed: int, wide: int, val_windows: int) -> dict:
    """The config.json `cocomix train` writes for the job, less UNCOMPARED."""
    from trainer.config import build_config, parse_sets

    tc = build_config(cfg.preset, None, {"mode": arm.mode, "max_tokens": cfg.student_tokens, "seed": seed,
                                         **parse_sets(train_sets(cfg, arm, wide, val_windows))})
    return {k: v for k, v in json.loads(json.dumps(tc.to_json())).items() if k not in UNCOMPARED}


def kept_matches(run: Path, config: dict, fingerprints: dict) -> bool:
    """A kept run is the planned one: the same config and the same token and label stores."""
    try:
        kept_cfg = json.loads((run / "config.json").read_text())
        info = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return ({k: v for k, v in kept_cfg.items() if k not in UNCOMPARED} == config
            and all(info.get(k) == v for k, v in fingerprints.items()))


def keep_run(run: Path, keep: Path) -> None:
    """Copy a finished run's small files to keep/<name> (a temporary folder renamed in place)."""
    import shutil

    dest = keep / run.name
    tmp = keep / f".{run.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "run.json"):
        shutil.copy2(run / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def extract_config(cfg: StudyConfig, selection: str):
    from pipeline.extract import ExtractConfig

    return ExtractConfig(tokens=cfg.out / "tokens", teacher=cfg.teacher, sae=cfg.sae, layer=cfg.layer,
                         out=cfg.out / "labels" / selection, window=cfg.window, selection=selection,
                         teacher_topk=cfg.teacher_topk if selection == "signed" and "kd" in cfg.arms else None,
                         workers=cfg.jobs, threads=1, progress=False)


def extract_argv(cfg: StudyConfig, *selections: str) -> list[str]:
    """One `cocomix extract` for the selections: several stores from one teacher pass when there are
    several (each byte-identical to its one-store extraction)."""
    es = [extract_config(cfg, sel) for sel in selections]
    e = es[0]
    kd = ["--store-teacher-topk", e.teacher_topk] if e.teacher_topk else []
    return cocomix_argv("extract", "--tokens", e.tokens, "--teacher", e.teacher, "--sae", e.sae, "--layer", e.layer,
                        "--window", e.window, *kd, "--workers", e.workers, "--threads", e.threads, "--no-progress",
                        *[x for c in es for x in ("--select", c.selection, "--out", c.out)])


def label_fingerprints(cfg: StudyConfig, tokens) -> dict[str, str]:
    """Each label store's fingerprint, known before it is extracted (what kept runs are checked against)."""
    from pipeline.extract import plan

    return {sel: plan(extract_config(cfg, sel), tokens)[0].fingerprint for sel in selections(cfg)}


def measured_hours(cfg: StudyConfig, arm: Arm) -> float:
    """Hours one run of the arm takes: from the study's finished (or kept) runs of it when there are any
    (their wall time, evaluations included), else from the arm's single-thread rate plus a tenth for
    evaluation."""
    times = []
    folders = [cfg.out / "runs"] + ([cfg.keep / "runs"] if cfg.keep else [])
    for p in {q.parent.name: q for f in folders for q in f.glob(f"{arm.name}-seed*/run.json")}.values():
        info = json.loads(p.read_text())
        if info.get("tokens"):
            times.append(info["elapsed"] * cfg.student_tokens / info["tokens"])
    return (sum(times) / len(times) if times else 1.1 * cfg.student_tokens / arm.tok_s) / 3600


def plan_jobs(cfg: StudyConfig, n_tokens: int, wide: int, val_windows: int,
              fingerprints: dict[str, str | None] | None = None) -> list[Job]:
    """Every job of the study in start order (finished ones included; the runner skips them). With
    `fingerprints` ({"tokens": .., selection: ..}) and a keep folder, kept runs that match are finished,
    and a label store no unfinished run needs is left out."""
    sels = selections(cfg)
    hours = {name: measured_hours(cfg, ARMS[name]) for name in cfg.arms}  # reads every finished run once

    def extraction(group: list[str]) -> Job:
        """The stores of `group` from one teacher pass (a pass per store costs about as much as all of them)."""
        stores = tuple(cfg.out / "labels" / sel for sel in group)
        est = n_tokens / EXTRACT_TOK_S / 3600 * 2 / cfg.jobs * (1 + 0.1 * (len(group) - 1))
        return Job(f"labels/{'+'.join(group)}", extract_argv(cfg, *group), stores[0].with_suffix(".log"), cfg.jobs,
                   stores[0] / "manifest.json", est, stores=stores)

    def training(name: str, seed: int) -> Job:
        arm, run = ARMS[name], cfg.out / "runs" / run_name(name, seed)
        job = Job(run.name, train_argv(cfg, arm, seed, wide, val_windows), run.with_suffix(".log"), 1,
                  run / "run.json", hours[name], [arm.selection] if arm.selection else [],
                  keep=cfg.keep / "runs" if cfg.keep else None)
        if cfg.keep and fingerprints is not None:
            expect = {"token_fingerprint": fingerprints["tokens"], "label_fingerprint": fingerprints.get(arm.selection)}
            job.kept = kept_matches(cfg.keep / "runs" / run.name, planned_config(cfg, arm, seed, wide, val_windows),
                                    expect)
        return job

    phases = [[training(name, seed) for seed in range(cfg.seeds) for name in phase] for phase in ordered_arms(cfg)]
    # a store is extracted only when a run that is not finished needs it; the signed store first (the core
    # arms), the other selections together, in one teacher pass, just before the arms that use them
    wanted = {sel for phase in phases for j in phase if not j.finished() for sel in j.needs}
    signed = [s for s in sels if s == "signed" and s in wanted]
    others = [s for s in sels if s != "signed" and s in wanted]
    extractions = [extraction([s]) for s in sels if s not in wanted] + [extraction(g) for g in (signed, others) if g]
    by_sel = {sel: j for j in extractions for sel in j.name.removeprefix("labels/").split("+")}
    for j in (j for phase in phases for j in phase):
        j.needs = [by_sel[sel].name for sel in j.needs]
    first = [j for j in extractions if j.name == "labels/signed"]
    later = [j for j in extractions if j not in first]
    jobs = first + [j for phase in phases[:-1] for j in phase] + later + phases[-1]
    needed = {n for t in jobs if not t.store and not t.finished() for n in t.needs}
    return [j for j in jobs if not j.store or j.name in needed or j.finished()]


def print_plan(cfg: StudyConfig, jobs: list[Job], n_tokens: int, wide: int) -> None:
    todo = [j for j in jobs if not j.finished()]
    slot_hours = sum(j.hours * j.slots for j in todo)
    print(f"study {cfg.out}: {len(cfg.arms)} arms x {cfg.seeds} seeds, {cfg.student_tokens:,} training tokens per "
          f"student ({cfg.student_tokens / n_tokens:.2f} epochs of {n_tokens:,}); label sets: "
          f"{', '.join(selections(cfg)) or 'none'}" + (f"; ntp-wide n_embd {wide}" if wide else ""))
    for j in jobs:
        started = j.done.exists() if j.store else (j.done.parent / "checkpoints").is_dir()
        state = "kept" if j.kept else "done" if j.finished() else "resume" if started else "todo"
        print(f"  {state:6s} {j.name:28s} ~{j.hours * 60:5.0f} min x {j.slots} slot(s)")
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs done; the rest is ~{slot_hours / cfg.jobs:.1f} h on this "
          f"machine ({cfg.jobs} processes at a time)", flush=True)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the driver dies, so a killed study leaves no orphan writing a run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed driver may leave children running; they finish their run
        pass


BUDGET_MARGIN = 1.15  # runs here vary by about a tenth in wall time with the machine's other load


def run_jobs(jobs: list[Job], slots: int, poll: float = 2.0, hours: float | None = None) -> list[str]:
    """Start jobs in order as slots free up (a job waits for the ones it needs); the failures, one line each.

    With `hours`, a job whose estimate would end past the budget is left for a later run (as are the jobs
    that need it), and a later, shorter job that fits starts in its place."""
    end = None if hours is None else time.monotonic() + hours * 3600
    pending = [j for j in jobs if not j.finished()]
    running: dict[str, tuple[subprocess.Popen, Job]] = {}
    failed: dict[str, str] = {}
    left: list[str] = []
    while pending or running:
        while pending and sum(j.slots for _, j in running.values()) + min(pending[0].slots, slots) <= slots:
            job = pending[0]
            blocked = [n for n in job.needs if n in failed or n in running]
            if any(n in failed for n in blocked):
                failed[job.name] = f"{job.name}: not run, {blocked[0]} failed"
                pending.pop(0)
                continue
            if any(n in left for n in job.needs) or (
                    end is not None and time.monotonic() + job.hours * 3600 * BUDGET_MARGIN > end):
                left.append(pending.pop(0).name)
                continue
            if blocked:
                break
            pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            print(f"start {job.name} (log {job.log})", flush=True)
            with open(job.log, "a") as log:
                proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
            running[job.name] = (proc, job)
        time.sleep(poll)
        for name, (proc, job) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode == 0 and job.finished():
                if job.keep:
                    keep_run(job.done.parent, job.keep)
                print(f"done  {name}", flush=True)
            else:
                failed[name] = f"{name}: exit code {proc.returncode}; see {job.log}"
                print(f"FAIL  {failed[name]}", flush=True)
    if left:
        print(f"left for the next run (past the {hours:g} h budget): {', '.join(left)}", flush=True)
    return list(failed.values())


def _lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another `cocomix study` is running in {out}; wait for it or choose another --out") from None
    return fd


def run_study(cfg: StudyConfig) -> tuple[Path | None, list[str]]:
    """Plan, print the plan, run what is not finished, and write the report over every finished run:
    (the report's path, or None; one line per failed job)."""
    from pipeline.tokenize import TokenizeConfig, tokenize_corpus
    from sae import load_sae
    from storage_schemas import TokenStore

    if not Path(cfg.sae).exists():
        raise UserError(f"SAE {cfg.sae} does not exist")
    lock = _lock(cfg.out)
    try:
        tokenize_corpus(TokenizeConfig(inputs=cfg.corpus, out=cfg.out / "tokens", tokenizer=str(cfg.teacher),
                                       val_fraction=cfg.val_fraction, seed=0, progress=False))
        ts = TokenStore.open(cfg.out / "tokens")
        val_windows = ts.num_windows("val", cfg.window)
        wide = wide_width(cfg, ts.vocab_size, load_sae(cfg.sae).cfg.n_latents) if "ntp-wide" in cfg.arms else 0
        fingerprints = {"tokens": ts.fingerprint, **label_fingerprints(cfg, ts)} if cfg.keep else None
        jobs = plan_jobs(cfg, ts.num_tokens("train") + ts.num_tokens("val"), wide, val_windows, fingerprints)
        for j in jobs:  # finished here before there was a keep folder (or before it was committed)
            if j.keep and not j.kept and j.finished():
                keep_run(j.done.parent, j.keep)
        print_plan(cfg, jobs, ts.num_tokens("train"), wide)
        if cfg.plan_only:
            return None, []
        t0 = time.perf_counter()
        failures = run_jobs(jobs, cfg.jobs, hours=cfg.hours)
        home = cfg.keep or cfg.out
        runs = sorted(p.parent for p in (home / "runs").glob("*/run.json"))
        report = None
        if runs:
            from trainer.report import compare, group_name

            # the label selections differ from `cocomix` only in their labels: measure them against it too
            against = ("cocomix",) if any(group_name(p) == "cocomix" for p in runs) else ()
            report = compare(runs, home / "report", against)
            print(f"report: {report} ({len(runs)} runs)")
        print(f"this pass took {(time.perf_counter() - t0) / 3600:.2f} h")
        return report, failures
    finally:
        os.close(lock)
