"""`cocomix study` at toy size: the plan, the job runner, and a study killed mid-run that a rerun finishes
without redoing any finished run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_e2e import cocomix

from pipeline.study import Job, StudyConfig, plan_jobs, run_jobs, wide_width

TOY = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32", "--set", "batch_size=8",
       "--set", "warmup_steps=2"]


def sh(name, script, tmp_path, slots=1, needs=()):
    done = tmp_path / f"{name}.done"
    return Job(name, ["sh", "-c", script.format(done=done)], tmp_path / f"{name}.log", slots, done, 0.0, list(needs))


def test_run_jobs_skips_finished_runs_others_and_stops_dependents_of_a_failure(tmp_path):
    (tmp_path / "old.done").write_text("")
    jobs = [sh("old", "echo again >> {done}", tmp_path),
            sh("labels/x", "exit 3", tmp_path, slots=2),
            sh("uses-x", "touch {done}", tmp_path, needs=["labels/x"]),
            sh("free", "touch {done}", tmp_path)]
    failures = run_jobs(jobs, slots=2, poll=0.05)
    assert (tmp_path / "old.done").read_text() == ""  # finished: never started again
    assert (tmp_path / "free.done").exists() and not (tmp_path / "uses-x.done").exists()
    assert failures == [f"labels/x: exit code 3; see {tmp_path / 'labels/x.log'}", "uses-x: not run, labels/x failed"]


def test_a_job_that_exits_0_without_its_output_is_a_failure(tmp_path):
    assert run_jobs([sh("quiet", "true", tmp_path)], slots=1, poll=0.05) == [
        f"quiet: exit code 0; see {tmp_path / 'quiet.log'}"]


def test_a_budget_leaves_jobs_that_would_end_past_it_and_their_dependents(tmp_path, capsys):
    long = sh("labels/long", "touch {done}", tmp_path, slots=2)
    long.hours = 5.0
    jobs = [long, sh("uses-long", "touch {done}", tmp_path, needs=["labels/long"]), sh("short", "touch {done}", tmp_path)]
    assert run_jobs(jobs, slots=2, poll=0.05, hours=1.0) == []
    assert [j.name for j in jobs if j.done.exists()] == ["short"]  # the shorter job after it still ran
    assert "left for the next run (past the 1 h budget): labels/long, uses-long" in capsys.readouterr().out


def test_later_label_selections_are_extracted_together_in_one_teacher_pass(tmp_path):
    cfg = StudyConfig(out=tmp_path / "s", arms=("cocomix", "kd", "cocomix-negated", "cocomix-activation"), seeds=1)
    jobs = plan_jobs(cfg, n_tokens=1000, wide=0, val_windows=4)
    assert [j.name for j in jobs] == ["labels/signed", "cocomix-seed0", "kd-seed0", "labels/negated+activation",
                                      "cocomix-negated-seed0", "cocomix-activation-seed0"]
    signed, group = jobs[0].argv, jobs[3].argv
    assert "--store-teacher-topk" in signed and "--store-teacher-topk" not in group  # KD's top-K: signed only
    pairs = [(group[i + 1], group[i + 3]) for i, a in enumerate(group) if a == "--select"]
    assert pairs == [("negated", str(tmp_path / "s/labels/negated")), ("activation", str(tmp_path / "s/labels/activation"))]
    assert jobs[4].needs == jobs[5].needs == ["labels/negated+activation"] and jobs[1].needs == ["labels/signed"]
    assert jobs[3].stores == (tmp_path / "s/labels/negated", tmp_path / "s/labels/activation")


def test_ntp_wide_matches_the_cocomix_parameter_count():
    from dataclasses import replace

    import torch

    from trainer.config import preset
    from trainer.model import GPT

    width = wide_width(StudyConfig(), vocab_size=8192, n_concepts=3072)
    with torch.device("meta"):
        base = replace(preset("demo"), vocab_size=8192, n_concepts=3072)
        cocomix_params = GPT(base.model_config()).num_params(False)
        ntp_params = GPT(replace(base, mode="ntp", n_embd=width).model_config()).num_params(False)
    assert width == 164 and abs(ntp_params / cocomix_params - 1) < 0.02  # the demo-ntp-wide preset's width


def test_unknown_arm_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "study", "--arms", "ntp,cocomix-typo", "--plan",
                        "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown arm(s) cocomix-typo" in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    """A two-source toy corpus, a tiny teacher trained on it and its SAE (as in test_e2e)."""
    import gzip

    r = tmp_path_factory.mktemp("study")
    (r / "corpus").mkdir()
    for name in ("austen", "python-docs"):
        with gzip.open(f"data/corpus/{name}.jsonl.gz", "rt") as f, open(r / "corpus" / f"{name}.jsonl", "w") as o:
            for _ in range(8):
                d = json.loads(next(f))
                o.write(json.dumps({"id": d["id"], "text": d["text"][:5000]}) + "\n")
    cwd = os.getcwd()
    cocomix("tokenize", "--input", r / "corpus", "--train-tokenizer", 512, "--val-fraction", 0.25,
            "--out", r / "tokens", cwd=cwd)
    cocomix("train", "--preset", "demo-teacher", "--tokens", r / "tokens", "--out", r / "teacher-run", *TOY,
            "--set", "block_size=64", "--set", "eval_windows=2", "--set", "threads=1", "--max-tokens", 20480, cwd=cwd)
    cocomix("export-hf", r / "teacher-run", "--out", r / "teacher", cwd=cwd)
    cocomix("sae", "train", "--teacher", r / "teacher", "--tokens", r / "tokens", "--layer", 0, "--latents", 128,
            "--k", 8, "--tokens-budget", 10000, "--window", 64, "--batch-windows", 8, "--eval-windows", 2,
            "--out", r / "sae", cwd=cwd)
    return r


def study_argv(r: Path, out: Path, keep: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "study", "--out", str(out), "--corpus", str(r / "corpus"),
            *(["--keep", str(keep)] if keep else []),
            "--val-fraction", "0.25",
            "--teacher", str(r / "teacher"), "--sae", str(r / "sae"), "--layer", "0", "--window", "64",
            "--seeds", "2", "--student-tokens", "8192", "--eval-interval", "4", "--arms", "ntp,ntp-wide,cocomix,kd",
            *TOY]


def finished(out: Path) -> dict[str, tuple[float, str]]:
    return {p.parent.name: (p.stat().st_mtime_ns, (p.parent / "metrics.jsonl").read_text())
            for p in (out / "runs").glob("*/run.json")}


@pytest.mark.slow
def test_killed_study_is_finished_by_a_rerun_without_redoing_finished_runs(toy_assets, tmp_path):
    out, keep = tmp_path / "study", tmp_path / "keep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(study_argv(toy_assets, out, keep), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True)
    deadline = time.time() + 240
    while len(finished(out)) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, "the study finished before it could be killed: " + driver.stdout.read()[-2000:]
    os.kill(driver.pid, signal.SIGKILL)  # the driver only: its children must go with it
    driver.wait()
    time.sleep(2)
    before = finished(out)
    assert 2 <= len(before) < 8
    running = subprocess.run(["pgrep", "-f", "--", f"--out {out}/runs"], capture_output=True, text=True).stdout
    assert not running.strip(), "a killed study left a training process behind"

    r = subprocess.run(study_argv(toy_assets, out, keep), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = r.stdout.splitlines()
    assert sum(line.strip().startswith("done ") and "~" in line for line in plan) >= len(before) + 1  # + labels
    after = finished(out)
    assert len(after) == 8  # 4 arms x 2 seeds
    assert {k: after[k] for k in before} == before  # finished runs untouched: same file times, same metrics
    for name in after:  # one metrics log per run, each step once, up to the end (a resumed run included)
        steps = [json.loads(x)["step"] for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 16
    report = (keep / "report" / "report.md").read_text()
    for arm in ("ntp", "ntp-wide", "cocomix", "kd"):
        assert f"| {arm} |" in report
    paired = json.loads((keep / "report" / "summary.json").read_text())["paired"]
    assert set(paired) == {"ntp", "ntp-wide", "cocomix"} and set(paired["cocomix"]) == {"kd"}  # --against cocomix
    evals = [json.loads(x) for x in (out / "runs" / "cocomix-seed0" / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evals if e["val_loss"] is not None][-1]
    assert set(last["val_sources"]) == {"austen", "python-docs"}  # every eval reports both domains
    assert json.loads((out / "runs" / "ntp-seed1" / "run.json").read_text())["seed"] == 1

    again = subprocess.run(study_argv(toy_assets, out, keep), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "8 of 9 jobs done" not in again.stdout and "9 of 9 jobs done" in again.stdout
    assert finished(out) == after  # a third pass does nothing
    for name in after:  # every finished run was kept as it finished
        for f in ("config.json", "metrics.jsonl", "run.json"):
            assert (keep / "runs" / name / f).read_bytes() == (out / "runs" / name / f).read_bytes()

    # a fresh checkout: the kept runs alone (no study folder, no label store) make the study finished
    fresh = tmp_path / "fresh"
    r = subprocess.run(study_argv(toy_assets, fresh, keep), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "8 of 8 jobs done" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "labels/signed" not in r.stdout and not (fresh / "runs").exists() and not (fresh / "labels").exists()
    # a kept run of another config (or of other stores) is not the planned run: it is trained again
    cfg = json.loads((keep / "runs" / "kd-seed1" / "config.json").read_text())
    (keep / "runs" / "kd-seed1" / "config.json").write_text(json.dumps({**cfg, "lr": cfg["lr"] / 2}))
    info = json.loads((keep / "runs" / "ntp-seed0" / "run.json").read_text())
    (keep / "runs" / "ntp-seed0" / "run.json").write_text(json.dumps({**info, "token_fingerprint": "0" * 64}))
    r = subprocess.run([*study_argv(toy_assets, fresh, keep), "--plan"], capture_output=True, text=True, env=env,
                       timeout=300)
    todo = {line.split()[1] for line in r.stdout.splitlines() if line.strip().startswith("todo")}
    assert r.returncode == 0 and todo == {"labels/signed", "kd-seed1", "ntp-seed0"}, r.stdout
