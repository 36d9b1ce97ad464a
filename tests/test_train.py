"""The training loop: a short run learns, resuming is bit-identical, half-written checkpoints are ignored,
a changed config is refused, every mode trains, and a finished checkpoint evaluates to what it logged."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_data import make_label_store, make_token_store

from storage_schemas import UserError
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.train import lr_at, train


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("train")
    ts = make_token_store(root / "tokens", tokenizer_dir)
    ls = make_label_store(root / "labels", ts, teacher_k=4)
    return root, ts, ls


def tiny(stores, out, **kw) -> TrainConfig:
    root, ts, ls = stores
    base = TrainConfig(tokens=str(ts.path), labels=str(ls.path), out=str(out), mode="ntp", block_size=16,
                       n_layer=2, n_head=2, n_embd=32, insert_layer=1, k_concept=8, batch_size=4,
                       grad_accum=2, max_tokens=12 * 4 * 2 * 16, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                       eval_interval=6, eval_windows=8, log_interval=3, ckpt_interval=4, device="cpu")
    return replace(base, **kw)


def rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_ntp_run_learns_and_writes_its_run_folder(stores, tmp_path):
    out = train(tiny(stores, tmp_path / "run", max_tokens=40 * 4 * 2 * 16, eval_interval=20))
    r = rows(out)
    vals = [x["val_loss"] for x in r if x["val_loss"] is not None]
    assert [x["step"] for x in r if x["val_loss"] is not None] == [0, 20, 40]
    assert vals[-1] < vals[0] - 1.0  # from ~ln(300) = 5.7 down, on real repeated text
    assert set(r[-1]) == {"step", "tokens", "lr", "train_loss", "ntp_loss", "aux_loss", "val_loss", "val_ppl",
                          "val_sources", "tokens_per_s", "elapsed"}
    assert r[-1]["tokens"] == 40 * 128 and r[-1]["aux_loss"] is None and r[-1]["tokens_per_s"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["final_val_loss"] == vals[-1] and run["token_fingerprint"] == stores[1].fingerprint
    assert run["label_fingerprint"] is None and run["n_params"] > 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300  # resolved from the store
    final = checkpoint.latest(out)
    assert final.name == "step-0000040" and (final / "model.safetensors").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-0000036", "step-0000040"]  # keep 2
    again = evaluate(out, stores[1].path, max_windows=8)
    assert again["loss"] == pytest.approx(vals[-1], abs=1e-5)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(max_tokens=100 * 16 * 256, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert cfg.max_steps == 100
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5.5e-4) and lr_at(100, cfg) == pytest.approx(1e-4)


def params(out):
    model, _ = checkpoint.load_model(out)
    return model.state_dict()


@pytest.mark.parametrize("mode", ["cocomix", "ntp"])
def test_resume_is_bit_identical(stores, tmp_path, mode):
    cfg = tiny(stores, tmp_path / "straight", mode=mode, dropout=0.1)  # dropout: the RNG must resume too
    straight = train(cfg)
    split = train(replace(cfg, out=str(tmp_path / "split"), stop_after=6))  # not a checkpoint step
    assert checkpoint.latest(split).name == "step-0000006" and not (split / "run.json").exists()
    train(replace(cfg, out=str(tmp_path / "split")))
    a, b = params(straight), params(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = checkpoint.load_state(checkpoint.latest(straight))["optimizer"]["state"]
    sb = checkpoint.load_state(checkpoint.latest(split))["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    drop = ("elapsed", "tokens_per_s")
    clean = lambda rs: [{k: v for k, v in x.items() if k not in drop} for x in rs]  # noqa: E731
    assert clean(rows(straight)) == clean(rows(split))  # same losses at every logged step


def test_half_written_checkpoint_is_ignored(stores, tmp_path):
    cfg = tiny(stores, tmp_path / "run", stop_after=4)
    out = train(cfg)
    good = checkpoint.latest(out)
    shutil.copytree(good, out / "checkpoints" / ".step-0000008.tmp-99999")  # a writer that died mid-rename
    (out / "checkpoints" / "step-0000009").mkdir()  # a step folder without its state.pt
    assert checkpoint.latest(out) == good
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')  # a line the crashed run was writing
    train(replace(cfg, stop_after=0))
    assert checkpoint.latest(out).name == "step-0000012"
    assert not list((out / "checkpoints").glob(".step-*"))  # the dead writer's folder was cleaned up
    assert [x["step"] for x in rows(out)].count(6) == 1  # logged once, although the first run stopped


def test_resume_refuses_a_changed_config_and_finished_runs_return(stores, tmp_path):
    cfg = tiny(stores, tmp_path / "run")
    out = train(cfg)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"different config \(lr: 0.003 -> 0.001\)"):
        train(replace(cfg, lr=1e-3))
    assert train(replace(cfg, eval_windows=2)) == out and (out / "metrics.jsonl").read_text() == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a run folder"):
        train(replace(cfg, out=str(tmp_path / "junk")))


@pytest.mark.parametrize("mode,dtype", [("cocomix", "float32"), ("pause", "float32"), ("kd", "float32"),
                                        ("cocomix", "bfloat16")])  # bf16 autocast runs on the CPU too
def test_every_mode_trains(stores, tmp_path, mode, dtype):
    out = train(tiny(stores, tmp_path / mode, mode=mode, max_tokens=6 * 128, eval_interval=6, dtype=dtype))
    r = rows(out)
    assert r[-1]["step"] == 6 and torch.isfinite(torch.tensor(r[-1]["val_loss"]))
    if mode != "pause":
        assert r[-1]["aux_loss"] > 0
        assert r[-1]["train_loss"] != pytest.approx(r[-1]["ntp_loss"])
    run = json.loads((out / "run.json").read_text())
    assert (run["label_fingerprint"] == stores[2].fingerprint) == (mode != "pause")


@pytest.mark.slow
def test_compiled_run_matches_eager(stores, tmp_path):
    eager = rows(train(tiny(stores, tmp_path / "eager", mode="cocomix", max_tokens=4 * 128, eval_interval=4)))
    compiled = rows(train(tiny(stores, tmp_path / "compiled", mode="cocomix", max_tokens=4 * 128,
                               eval_interval=4, compile=True)))
    assert compiled[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], abs=1e-3)
    assert compiled[-1]["train_loss"] == pytest.approx(eager[-1]["train_loss"], abs=1e-3)


def test_a_run_recorded_with_relative_paths_finds_its_stores_from_any_directory(tmp_path, monkeypatch):
    """`make demo` records out/demo/tokens (relative to the repository): lm_eval, generate and export-hf
    started elsewhere find it through the checkpoint's own location."""
    project = tmp_path / "project"
    ckpt = project / "out" / "demo" / "runs" / "cocomix" / "checkpoints" / "step-0000305"
    ckpt.mkdir(parents=True)
    (project / "out" / "demo" / "tokens").mkdir()
    meta = {"train": {"tokens": "out/demo/tokens", "out": "out/demo/runs/cocomix"}}
    monkeypatch.chdir(tmp_path)  # not where training ran
    assert checkpoint.trained_on(meta, ckpt) == project / "out" / "demo" / "tokens"
    monkeypatch.chdir(project)  # where training ran: the recorded path as it is
    assert checkpoint.trained_on(meta, ckpt) == Path("out/demo/tokens")
    monkeypatch.chdir(tmp_path)  # a checkpoint moved away from its run folder: nothing to infer
    moved = tmp_path / "elsewhere" / "checkpoints" / "step-0000305"
    assert checkpoint.trained_on(meta, moved) == Path("out/demo/tokens")
