"""`cocomix train | eval | export-hf` through the real root app: user mistakes exit 2 with one line, a
TOML-configured run trains, evaluates, and exports a GPT-2 folder that transformers loads unchanged."""

import json

import pytest
import torch
from test_data import make_label_store, make_token_store
from torch.testing import assert_close
from typer.testing import CliRunner

from pipeline.cli import app
from trainer.checkpoint import load_model

TINY = ["--set", "block_size=16", "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32",
        "--set", "batch_size=4", "--set", "eval_windows=4", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("cli")
    ts = make_token_store(root / "tokens", tokenizer_dir)
    return root, ts, make_label_store(root / "labels", ts)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_user_mistakes_exit_2_with_one_line_and_no_run_folder(stores, tmp_path):
    root, ts, ls = stores
    cases = [
        (["--preset", "demo", "--tokens", ts.path], "cocomix mode needs concept labels: pass --labels DIR"),
        (["--preset", "demo", "--tokens", ts.path, "--labels", ls.path], "block_size is 256: set block_size=16"),
        (["--preset", "demo", "--tokens", ts.path, "--labels", ls.path, *TINY, "--set", "insert_layer=2"],
         "insert_layer 2 is out of range for a 2-layer model"),
        (["--preset", "demo", "--tokens", ts.path, "--labels", ls.path, *TINY, "--set", "n_concepts=64"],
         "n_concepts 64 differs from the label store's SAE latents 50"),
        (["--preset", "demo", "--set", "lrr=1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ]
    for args, message in cases:
        r = invoke("train", *args, "--out", tmp_path / "run")
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "run").exists()


def test_toml_run_trains_evaluates_and_exports_a_gpt2_folder(stores, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ts, _ = stores
    cfg = tmp_path / "teacher.toml"
    cfg.write_text('preset = "demo-teacher"\nmax_tokens = 1024\nwarmup_steps = 2\neval_interval = 8\n')
    r = invoke("train", "--config", cfg, "--tokens", ts.path, "--out", tmp_path / "run", *TINY,
               "--set", "n_head=4", "--seed", 3)
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    assert r.stdout.strip().endswith(str(out))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["seed"], saved["n_head"], saved["max_tokens"], saved["lr"]) == (3, 4, 1024, 2e-3)
    final_val = json.loads((out / "run.json").read_text())["final_val_loss"]

    r = invoke("eval", out, "--tokens", ts.path, "--max-windows", 4, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loss"] == pytest.approx(final_val, abs=1e-5)

    r = invoke("export-hf", out, "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours, _ = load_model(out)
    idx = torch.tensor([tok.encode("It is a truth universally acknowledged")[:16]])
    assert_close(hf(idx).logits, ours(idx).logits)
    assert hf.config.eos_token_id == ts.eos_id


def test_export_refuses_a_cocomix_checkpoint_and_eval_a_foreign_tokenizer(stores, tmp_path):
    root, ts, ls = stores
    r = invoke("train", "--preset", "demo", "--tokens", ts.path, "--labels", ls.path, "--out", tmp_path / "cc",
               "--max-tokens", 128, *TINY, "--set", "k_concept=8", "--set", "eval_windows=0")
    assert r.exit_code == 0, r.output
    r = invoke("export-hf", tmp_path / "cc", "--out", tmp_path / "hf")
    assert r.exit_code == 2 and "is a cocomix model; only ntp/kd models" in r.stderr
    assert not (tmp_path / "hf").exists()
    r = invoke("eval", tmp_path / "nothing", "--tokens", ts.path)
    assert r.exit_code == 2 and "neither a checkpoint nor a run folder" in r.stderr


def test_python_m_trainer_train_is_the_train_command():
    """The torchrun entry point: same options, same one-line refusal and exit code 2."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "trainer.train", "--preset", "gpt5"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown preset 'gpt5'"), done.stderr
    assert done.stderr.count("\n") == 1
