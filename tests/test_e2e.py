"""The demo chain end to end at toy size, through the real CLI: tokenizer -> token store -> teacher ->
HF export -> SAE -> the students' token store (the teacher's tokenizer, a share of the train documents)
-> Ray extraction -> ntp / cocomix / pause / kd students -> compare report. Then a second pass of every
stage finds its output and does nothing."""

import gzip
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
TINY = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32", "--set", "block_size=64",
        "--set", "batch_size=8", "--set", "eval_interval=10", "--set", "eval_windows=4", "--set", "threads=1",
        "--set", "warmup_steps=2", "--max-tokens", "15360"]


def cocomix(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"cocomix {' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A slice of the embedded corpus: 16 short documents."""
    root = tmp_path_factory.mktemp("e2e")
    docs = []
    for name in ("austen", "python-docs"):
        with gzip.open(f"data/corpus/{name}.jsonl.gz", "rt") as f:
            docs += [json.loads(next(f)) for _ in range(8)]
    with open(root / "small.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"][:6000]}) + "\n")
    return root


def test_demo_chain_at_toy_size(corpus):
    r, cwd = corpus, os.getcwd()
    cocomix("tokenize", "--input", r / "small.jsonl", "--train-tokenizer", 512, "--val-fraction", 0.25,
            "--out", r / "tokens", cwd=cwd)
    cocomix("train", "--preset", "demo-teacher", "--tokens", r / "tokens", "--out", r / "teacher-run", *TINY,
            "--max-tokens", 40960, cwd=cwd)
    cocomix("export-hf", r / "teacher-run", "--out", r / "teacher", cwd=cwd)
    sae_out = cocomix("sae", "train", "--teacher", r / "teacher", "--tokens", r / "tokens", "--layer", 0,
                      "--latents", 128, "--k", 8, "--tokens-budget", 20000, "--window", 64, "--batch-windows", 8,
                      "--eval-windows", 4, "--out", r / "sae", cwd=cwd)
    assert "FVU" in sae_out
    # as in `make demo`: the students see a share of the train documents, tokenized by the teacher's tokenizer
    student_tokens = ["tokenize", "--input", r / "small.jsonl", "--tokenizer", r / "teacher", "--val-fraction",
                      0.25, "--train-fraction", 0.5, "--out", r / "student-tokens"]
    cocomix(*student_tokens, cwd=cwd)
    teacher_split = json.loads((r / "tokens" / "manifest.json").read_text())["splits"]
    student_split = json.loads((r / "student-tokens" / "manifest.json").read_text())["splits"]
    assert student_split["val"] == teacher_split["val"]
    assert 0 < student_split["train"]["documents"] < teacher_split["train"]["documents"]
    extract = ["extract", "--tokens", r / "student-tokens", "--teacher", r / "teacher", "--sae", r / "sae", "--layer", 0,
               "--window", 64, "--workers", 2, "--threads", 1, "--chunk-windows", 16, "--store-teacher-topk", 8,
               "--no-progress", "--out", r / "labels"]
    cocomix(*extract, cwd=cwd)
    assert "ok" in cocomix("shards", "validate", r / "labels", "--tokens", r / "student-tokens", cwd=cwd)
    runs = []
    for mode in ("ntp", "cocomix", "pause", "kd"):
        labels = ["--labels", r / "labels"] if mode in ("cocomix", "kd") else []
        cocomix("train", "--preset", "demo", "--mode", mode, "--tokens", r / "student-tokens", *labels,
                "--out", r / "runs" / mode, *TINY, cwd=cwd)
        runs.append(r / "runs" / mode)
    cocomix("compare", *runs, "--out", r / "report", cwd=cwd)
    report = (r / "report" / "report.md").read_text()
    for mode in ("ntp", "cocomix", "pause", "kd"):
        assert f"| {mode} | {mode} |" in report
    assert "Sample efficiency against `ntp`" in report and (r / "report" / "val_loss.png").exists()
    label_fp = json.loads((r / "labels" / "manifest.json").read_text())["fingerprint"]
    assert json.loads((r / "runs" / "cocomix" / "run.json").read_text())["label_fingerprint"] == label_fp

    # a second pass reuses every stage
    assert "up to date" in cocomix("tokenize", "--input", r / "small.jsonl", "--train-tokenizer", 512,
                                   "--val-fraction", 0.25, "--out", r / "tokens", cwd=cwd)
    assert "up to date" in cocomix(*student_tokens, cwd=cwd)
    assert "nothing to do" in cocomix(*extract, cwd=cwd)
    before = (r / "runs" / "cocomix" / "metrics.jsonl").read_text()
    cocomix("train", "--preset", "demo", "--mode", "cocomix", "--tokens", r / "student-tokens",
            "--labels", r / "labels", "--out", r / "runs" / "cocomix", *TINY, cwd=cwd)
    assert (r / "runs" / "cocomix" / "metrics.jsonl").read_text() == before
