"""DDP on CPU: `torchrun --nproc_per_node 2 -m trainer.train` (gloo) takes the same steps as one process
with the same grad_accum: each rank runs half the micro-batches and DDP averages the gradients."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from test_data import make_label_store, make_token_store
from torch.testing import assert_close

from trainer.checkpoint import load_model
from trainer.config import TrainConfig
from trainer.train import train

pytestmark = pytest.mark.slow


def test_two_gloo_processes_match_one(tmp_path, tokenizer_dir):
    ts = make_token_store(tmp_path / "tokens", tokenizer_dir)
    ls = make_label_store(tmp_path / "labels", ts)
    cfg = TrainConfig(tokens=str(ts.path), labels=str(ls.path), out=str(tmp_path / "one"), mode="cocomix",
                      block_size=16, n_layer=2, n_head=2, n_embd=32, insert_layer=1, k_concept=8, batch_size=4,
                      grad_accum=2, max_tokens=8 * 128, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=4,
                      eval_windows=6, log_interval=2, ckpt_interval=100, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    sets = [a for k in ("block_size", "n_layer", "n_head", "n_embd", "insert_layer", "k_concept", "batch_size",
                        "grad_accum", "lr", "min_lr", "warmup_steps", "eval_interval", "eval_windows",
                        "log_interval", "ckpt_interval", "device", "max_tokens")
            for a in ("--set", f"{k}={getattr(cfg, k)}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer.train", "--preset", "demo", "--tokens", str(ts.path), "--labels", str(ls.path),
           "--out", str(tmp_path / "two"), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(tmp_path / "two")  # printed once, by rank 0

    one, two = (
        [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 2, 4, 6, 8]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "ntp_loss", "aux_loss", "val_loss"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], abs=2e-4), (a["step"], key)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2
    p1, p2 = load_model(tmp_path / "one")[0].state_dict(), load_model(tmp_path / "two")[0].state_dict()
    for k in p1:
        assert_close(p2[k], p1[k], atol=2e-4, rtol=1e-3)
    assert not torch.equal(p1["transformer.wte.weight"], replace_init(cfg)["transformer.wte.weight"])


def replace_init(cfg: TrainConfig) -> dict:
    """The untrained weights (same seed): the comparison above must be between trained models."""
    from trainer.model import GPT

    torch.manual_seed(cfg.seed)
    return GPT(replace(cfg, vocab_size=300, n_concepts=50).model_config()).state_dict()
