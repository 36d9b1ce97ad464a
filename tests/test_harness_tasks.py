"""The offline downstream tasks and `cocomix downstream`: the shipped tasks are what the builder makes, hold only
validation documents and their true continuations, and load through lm-eval's own command line offline from
any directory; `cocomix downstream` scores students (its numbers are the adapter's), `cocomix compare` tables
them over seeds, and bad input is refused in one line with exit code 2 and nothing written."""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXT
from test_data import make_label_store, make_token_store
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tasks import TaskBuildConfig, build, paragraphs, split_of
from storage_schemas import TokenStoreWriter
from trainer.config import TrainConfig
from trainer.train import train

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports `datasets`, which reads it once
pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "tasks"
DEMO_TOKENIZER = REPO / "data" / "demo" / "teacher"
W = 128  # the tasks' continuations (a sentence of up to 40 words) must fit the window


def tiny_student(tokens, out, mode="ntp", seed=0, labels=None):
    cfg = TrainConfig(tokens=str(tokens), labels=str(labels) if labels else "", out=str(out), mode=mode,
                      block_size=W, n_layer=2, n_head=2, n_embd=32, insert_layer=1, k_concept=8, batch_size=2,
                      grad_accum=1, max_tokens=3 * 2 * W, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_interval=3,
                      eval_windows=1, log_interval=3, ckpt_interval=3, seed=seed, device="cpu")
    return train(cfg)


@pytest.fixture(scope="module")
def demo_students(tmp_path_factory):
    """Two seeds of an NTP student and a CoCoMix student with the demo tokenizer (the shipped tasks' own)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("downstream")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_TOKENIZER / name, tok_dir / name)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    w = TokenStoreWriter(root / "tokens", dtype="uint16", eos_id=tok.eos_token_id, vocab_size=len(tok),
                         tokenizer_dir=tok_dir, chunk_tokens=W * 16)
    for i, text in enumerate(TEXT * 4):
        w.add_document("val" if i % 4 == 0 else "train", np.asarray(tok.encode(text)))
    w.finish({"sources": ["conftest.TEXT"]})
    from storage_schemas import TokenStore

    ts = TokenStore.open(root / "tokens")
    labels = make_label_store(root / "labels", ts, window=W, chunk_windows=2)
    return [tiny_student(ts.path, root / "tiny-seed0", seed=0), tiny_student(ts.path, root / "tiny-seed1", seed=1),
            tiny_student(ts.path, root / "mix-seed0", mode="cocomix", labels=labels.path)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_shipped_tasks_are_what_the_builder_makes(tmp_path):
    counts = build(TaskBuildConfig(out=tmp_path / "tasks", corpus=(REPO / "data" / "corpus",), tokenizer=DEMO_TOKENIZER))
    assert counts == {"cocomix_cloze": 250, "cocomix_continuation": 250, "cocomix_ppl": 20}
    built = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert built == sorted(p.name for p in SHIPPED.iterdir() if p.name != "__pycache__")
    for name in built:
        assert (tmp_path / "tasks" / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert sum((SHIPPED / n).stat().st_size for n in built) < 800_000


def write_corpus(folder: Path) -> dict[str, str]:
    """Two sources of eight documents, each of paragraphs of distinct sentences; {key: text}."""
    folder.mkdir()
    docs = {}
    for src in ("tales", "manual"):
        with open(folder / f"{src}.jsonl", "w") as f:
            for d in range(8):
                paras = ["\n".join(f"The {src} record {d} tells in part {p} how the number {s} was written "
                                   f"down by the {['clerk', 'reader', 'writer', 'keeper'][s % 4]} of the house."
                                   for s in range(4)) for p in range(3)]
                key = f"{src}/{d}"
                docs[key] = "\n\n".join(paras)
                f.write(json.dumps({"id": key, "text": docs[key]}) + "\n")
    return docs


def rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_builder_takes_only_validation_documents_and_their_true_continuations(tmp_path, tokenizer_dir):
    docs = write_corpus(tmp_path / "corpus")
    val = {k for k in docs if split_of(k, 0, 0.4) == "val"}
    assert 2 <= len(val) < len(docs)
    cfg = TaskBuildConfig(out=tmp_path / "tasks", corpus=(tmp_path / "corpus",), tokenizer=tokenizer_dir,
                          val_fraction=0.4, n_cloze=6, n_choice=6)
    build(cfg)
    flat = {k: "\n\n".join(paragraphs(t)) for k, t in docs.items()}  # line wrapping folded, as the tasks are
    cloze, choice, ppl = (rows(cfg.out, n) for n in ("cocomix_cloze", "cocomix_continuation", "cocomix_ppl"))
    assert sorted(r["doc"] for r in ppl) == sorted(val) and all(r["text"] == docs[r["doc"]] for r in ppl)
    assert cloze and choice and {r["doc"] for r in cloze + choice} <= val
    for r in cloze:  # the passage, then its true final word, as in the document
        assert r["context"] + " " + r["target"] + "." in flat[r["doc"]]
    for r in choice:
        assert r["context"] + " " + r["choices"][r["label"]] in flat[r["doc"]]
        others = [c for i, c in enumerate(r["choices"]) if i != r["label"]]
        assert len(others) == 3 and not any(c in flat[r["doc"]] for c in others)
        assert all(any(c in flat[k] for k in val if k.split("/")[0] == r["source"]) for c in others)
    meta = (cfg.out / "cocomix_cloze.yaml").read_text()
    assert "tokenizer_fingerprint" in meta and "val_fraction: 0.4" in meta


@pytest.mark.slow
def test_shipped_tasks_run_through_lm_eval_command_line_offline_from_anywhere(demo_students, tmp_path):
    """`python -m trainer.harness` is lm-eval's own CLI with `cocomix` registered; a fresh HF cache and
    HF_DATASETS_OFFLINE=1 prove the tasks need no hub, another working directory that their paths are their own."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "trainer.harness", "--model", "cocomix", "--model_args",
                        f"checkpoint={demo_students[2]},device=cpu", "--tasks", "cocomix_offline", "--limit", "3",
                        "--batch_size", "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for task, metric in [("cocomix_cloze", "perplexity"), ("cocomix_continuation", "acc_norm"),
                         ("cocomix_ppl", "word_perplexity")]:
        assert task in r.stdout and metric in r.stdout


@pytest.mark.slow
def test_lm_eval_script_itself_sees_the_cocomix_model_and_the_offline_tasks(demo_students, tmp_path):
    """`make setup` installs cocomix_lm_eval.pth, so lm-eval's own `lm_eval` command (not our wrapper) knows
    `cocomix`, finds the shipped tasks from any directory, and refuses a bad checkpoint in one line."""
    if not (Path(sysconfig.get_paths()["purelib"]) / "cocomix_lm_eval.pth").is_file():
        pytest.skip("this virtualenv was not made by `make setup` (no cocomix_lm_eval.pth)")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    lm_eval = [str(Path(sys.executable).with_name("lm_eval")), "--model", "cocomix", "--tasks", "cocomix_cloze",
               "--limit", "3", "--batch_size", "8"]
    r = subprocess.run([*lm_eval, "--model_args", f"checkpoint={demo_students[2]},device=cpu"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cocomix_cloze" in r.stdout and "perplexity" in r.stdout
    bad = subprocess.run([*lm_eval, "--model_args", f"checkpoint={tmp_path / 'nothing'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "neither a checkpoint nor a run folder" in bad.stderr
    # any other program of the virtualenv is untouched by the hook
    plain = subprocess.run([sys.executable, "-c", "import sys; print('lm_eval' in sys.modules)"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "False"


def test_downstream_scores_students_and_compare_tables_them_over_seeds(demo_students, tmp_path):
    from lm_eval.api.instance import Instance

    from trainer.harness import CocomixLM

    r = invoke("downstream", *demo_students, "--limit", 4, "--batch-size", 8)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("(4 of 250 items scored)") == 2 * len(demo_students)
    results = [json.loads((run / "downstream.json").read_text()) for run in demo_students]
    assert [s["mode"] for s in results] == ["ntp", "ntp", "cocomix"]
    first = results[0]
    assert {t: set(m) for t, m in first["metrics"].items()} == {
        "cocomix_cloze": {"acc", "perplexity"}, "cocomix_continuation": {"acc", "acc_norm"},
        "cocomix_ppl": {"word_perplexity", "byte_perplexity", "bits_per_byte"}}
    assert first["samples"]["cocomix_ppl"] == {"scored": 4, "total": 20}
    # the table's number is the adapter's: bits per byte over the first four documents, by hand
    lm = CocomixLM(checkpoint=str(demo_students[0]))
    docs = rows(SHIPPED, "cocomix_ppl")[:4]
    ll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d["text"],), i) for i, d in enumerate(docs)])
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    assert first["metrics"]["cocomix_ppl"]["bits_per_byte"] == pytest.approx(-sum(ll) / n_bytes / math.log(2), rel=1e-6)

    c = invoke("compare", *demo_students, "--out", tmp_path / "report")
    assert c.exit_code == 0, c.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream tasks" in report and "cocomix_cloze 4, cocomix_continuation 4, cocomix_ppl 4" in report
    tiny = next(line for line in report.splitlines() if line.startswith("| tiny | ntp | 2 |"))
    accs = [s["metrics"]["cocomix_continuation"]["acc"] for s in results[:2]]
    mean, std = np.mean(accs), np.std(accs, ddof=1)
    assert f"{mean:.4g} ± {std:.4g}" in tiny  # mean ± sample std over the two seeds
    down = json.loads((tmp_path / "report" / "summary.json").read_text())["downstream"]
    assert [(d["run"], d["seeds"]) for d in down] == [("tiny", 2), ("mix", 1)]


def test_downstream_refuses_bad_input_in_one_line_and_writes_nothing(demo_students, tokenizer_dir, tmp_path):
    ts = make_token_store(tmp_path / "tokens", tokenizer_dir)
    other = tiny_student(ts.path, tmp_path / "other")  # the tiny test tokenizer, not the demo's
    good = shutil.copytree(demo_students[0], tmp_path / "good", ignore=shutil.ignore_patterns("downstream.json"))
    cases = [
        ([good, "--tasks", "cocomix_cloze,no_such_task"], "unknown task 'no_such_task'"),
        ([tmp_path / "missing"], "is neither a checkpoint nor a run folder"),
        ([good, other], "but the data of task cocomix_cloze was built for"),
        ([good, "--limit", 0], "--limit must be at least 1"),
    ]
    for args, message in cases:
        r = invoke("downstream", *args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1
    assert not (good / "downstream.json").exists() and not (other / "downstream.json").exists()
