"""SAE training and evaluation end to end on a tiny token store and a tiny random GPT-2, and the
`cocomix sae` command line (refusals: exit code 2, one line, before any heavy work)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from sae.formats import load_sae, read_meta
from sae.hooks import load_teacher
from sae.metrics import evaluate_sae
from sae.model import SAEConfig, TopKSAE
from sae.train import SAETrainConfig, init_pre_bias, open_windows, train_sae, window_batches
from storage_schemas import TokenStore, TokenStoreWriter, UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def token_store(tmp_path_factory, tokenizer_dir) -> Path:
    """~40k train and ~4k val tokens: sentences of the shared test text, words shuffled per document."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("tokens") / "store"
    w = TokenStoreWriter(out, dtype="uint16", eos_id=tok.eos_token_id, vocab_size=len(tok),
                         tokenizer_dir=tokenizer_dir, chunk_tokens=4096)
    rng = np.random.default_rng(0)
    words = " ".join(TEXT).split()
    for d in range(1000):
        doc = " ".join(rng.choice(words, size=int(rng.integers(15, 40))))
        w.add_document("val" if d % 10 == 0 else "train", np.asarray(tok(doc)["input_ids"]))
    w.finish({"seed": 0})
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, token_store) -> Path:
    """A tiny GPT-2 trained for a few seconds, so that splicing a bad reconstruction visibly costs loss."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = window_batches(TokenStore.open(token_store), "train", 32, 16, seed=0)
    for _ in range(120):
        ids = torch.from_numpy(next(batches))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("teacher") / "gpt2"
    model.save_pretrained(out)
    return out


def tiny_cfg(token_store, teacher_dir, out, **kw) -> SAETrainConfig:
    base = dict(teacher=str(teacher_dir), tokens=str(token_store), layer=0, out=str(out), n_latents=128, k=8,
                tokens_budget=40_000, batch_windows=16, window=32, dead_tokens=4096, init_tokens=2048,
                warmup_steps=10, log_every=10, progress=False)
    return SAETrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(token_store, teacher_dir, tmp_path_factory):
    cfg = tiny_cfg(token_store, teacher_dir, tmp_path_factory.mktemp("sae") / "sae")
    sae, meta = train_sae(cfg)
    return cfg, sae, meta


def test_training_beats_a_fresh_sae(trained, token_store, teacher_dir):
    cfg, sae, meta = trained
    store, teacher = TokenStore.open(token_store), load_teacher(str(teacher_dir))
    metrics = evaluate_sae(sae, teacher, store, layer=0, location="resid_post_mlp", split="val", window=32,
                           max_windows=64)
    torch.manual_seed(0)
    fresh = TopKSAE(sae.cfg)
    ids = torch.from_numpy(next(window_batches(store, "train", 32, 16, seed=1)))
    from sae.hooks import activations

    init_pre_bias(fresh, activations(teacher, ids, 0, "resid_post_mlp").reshape(-1, 32), "mean")
    base = evaluate_sae(fresh, teacher, store, layer=0, location="resid_post_mlp", split="val", window=32,
                        max_windows=64)
    assert metrics["fvu"] < 0.5 * base["fvu"], (metrics, base)
    assert metrics["fvu"] < 0.3
    assert metrics["dead_fraction"] < 0.1
    assert 0 < metrics["l0"] <= 8
    assert metrics["tokens"] == 64 * 32
    assert 0 < metrics["loss_increase"] < 0.5 * base["loss_increase"]
    assert meta["steps"] == -(-40_000 // 512) and meta["tokens"] == meta["steps"] * 512
    assert meta["history"][-1]["fvu"] < meta["history"][0]["fvu"]


def test_checkpoint_round_trip_and_meta(trained, token_store):
    cfg, sae, meta = trained
    back = load_sae(cfg.out)
    assert back.cfg == sae.cfg and back.cfg.hook_layer == 0 and back.cfg.normalize == "layer_norm"
    torch.testing.assert_close(back.W_dec.norm(dim=-1), torch.ones(128))  # unit-norm decoder rows
    saved = read_meta(cfg.out)
    assert saved["training"]["window"] == 32
    assert saved["token_fingerprint"] == TokenStore.open(token_store).fingerprint


def test_training_is_deterministic(token_store, teacher_dir, tmp_path):
    a = tiny_cfg(token_store, teacher_dir, tmp_path / "a", tokens_budget=4096)
    sa, _ = train_sae(a)
    sb, _ = train_sae(replace(a, out=str(tmp_path / "b")))
    sc, _ = train_sae(replace(a, out=str(tmp_path / "c"), seed=1))
    for name, p in sa.state_dict().items():
        assert torch.equal(p, sb.state_dict()[name]), name
    assert not torch.equal(sa.W_dec, sc.W_dec)


def test_pre_bias_init_is_data_mean(token_store, teacher_dir):
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, normalize="none"))
    x = torch.randn(100, 8) + 3
    init_pre_bias(sae, x, "mean")
    torch.testing.assert_close(sae.pre_bias.data, x.mean(0))
    init_pre_bias(sae, x, "geometric_median")
    gm = sae.pre_bias.data
    dist = lambda y: (x - y).norm(dim=-1).sum()  # noqa: E731
    assert dist(gm) <= dist(x.mean(0)) + 1e-4


def test_train_refusals_before_heavy_work(token_store, teacher_dir, tmp_path):
    with pytest.raises(UserError, match="--k 200 is larger than --latents 100"):
        tiny_cfg(token_store, teacher_dir, tmp_path / "x", k=200, n_latents=100)
    with pytest.raises(UserError, match="layer 5 is out of range: the teacher has 2 blocks"):
        train_sae(tiny_cfg(token_store, teacher_dir, tmp_path / "x", layer=5))
    with pytest.raises(UserError, match="window 128 is longer than the teacher's context"):
        train_sae(tiny_cfg(token_store, teacher_dir, tmp_path / "x", window=128))
    with pytest.raises(UserError, match="no split 'test'"):
        open_windows(token_store, "test", 32)
    assert not (tmp_path / "x").exists()


# -- command line --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    """The real root group (pipeline.cli.CocomixGroup turns UserError into exit 2) with our `sae` group."""
    import typer

    from pipeline.cli import CocomixGroup
    from sae.cli import app

    root = typer.Typer(cls=CocomixGroup, add_completion=False, pretty_exceptions_enable=False)
    root.add_typer(app, name="sae")
    runner = CliRunner()
    return lambda *args: runner.invoke(root, [str(a) for a in args])


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], result.output


def test_cli_refusals(cli, token_store, teacher_dir, trained, tmp_path):
    common = ("--teacher", teacher_dir, "--tokens", token_store, "--out", tmp_path / "o", "--window", 32)
    one_line_error(cli("sae", "train", *common, "--layer", 0, "--latents", 100, "--k", 200), "larger than --latents")
    one_line_error(cli("sae", "train", *common, "--layer", 9, "--latents", 64, "--k", 4), "out of range")
    one_line_error(cli("sae", "train", *common, "--layer", 0, "--location", "nope"), "unknown hook location")
    one_line_error(cli("sae", "info", tmp_path), "supported:")
    other = tmp_path / "wide"
    from sae.formats import save_sae

    save_sae(TopKSAE(SAEConfig(d_in=48, n_latents=64, k=4, hook_layer=0)), other)
    one_line_error(cli("sae", "eval", other, "--teacher", teacher_dir, "--tokens", token_store, "--window", 32),
                   "d_in 48 does not match the teacher's hidden size 32")
    assert not (tmp_path / "o").exists()


def test_cli_info_and_eval(cli, trained, token_store, teacher_dir):
    cfg, sae, _ = trained
    res = cli("sae", "info", cfg.out)
    assert res.exit_code == 0, res.output
    assert "format         cocomix" in res.output and "latents        128" in res.output
    assert "hook           layer 0 resid_post_mlp" in res.output
    res = cli("sae", "eval", cfg.out, "--teacher", teacher_dir, "--tokens", token_store, "--max-windows", 8, "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)  # stderr carries transformers' loading bar
    assert m["tokens"] == 8 * 32 and 0 <= m["fvu"] < 0.3 and m["loss_zero_ablation"] > m["loss_clean"]


def test_cli_eval_save_stores_metrics_and_keeps_the_weights(cli, trained, token_store, teacher_dir, tmp_path):
    cfg, _, _ = trained
    copy = tmp_path / "sae"
    shutil.copytree(cfg.out, copy)
    weights, mtime = (copy / "sae.safetensors").read_bytes(), (copy / "sae.safetensors").stat().st_mtime_ns
    res = cli("sae", "eval", copy, "--teacher", teacher_dir, "--tokens", token_store, "--max-windows", 4,
              "--save", "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert read_meta(copy)["metrics"] == {**m, "split": "val"} and m["tokens"] == 4 * 32
    assert read_meta(copy)["history"] == read_meta(cfg.out)["history"]  # the rest of meta is kept
    assert (copy / "sae.safetensors").read_bytes() == weights  # label fingerprints hash these bytes
    assert (copy / "sae.safetensors").stat().st_mtime_ns == mtime  # and make compares this time
    assert "tokens 128" in cli("sae", "info", copy).output
    # other formats keep no metrics: refused in one line before the teacher is loaded
    raw = json.loads((copy / "cfg.json").read_text())
    (copy / "cfg.json").write_text(json.dumps({**raw, "format": "not-ours"}))
    one_line_error(cli("sae", "eval", copy, "--teacher", teacher_dir, "--tokens", token_store, "--save"),
                   "only cocomix checkpoints store metrics")


def test_cli_train_end_to_end(cli, token_store, teacher_dir, tmp_path):
    res = cli("sae", "train", "--teacher", teacher_dir, "--tokens", token_store, "--layer", 1, "--out",
              tmp_path / "s", "--latents", 64, "--k", 4, "--tokens-budget", 8192, "--window", 32,
              "--batch-windows", 8, "--eval-windows", 8)
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.output and "val: FVU" in res.output
    assert read_meta(tmp_path / "s")["metrics"]["split"] == "val"
