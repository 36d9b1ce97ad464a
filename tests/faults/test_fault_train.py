"""Training faults through `cocomix train` (cocomix mode, dropout on, CPU, one thread): a run SIGKILLed
mid-step and resumed ends with the same weights and optimizer state as an uninterrupted run, bit for
bit; a checkpoint half-written by a process that died is never taken as the latest; a disk that fills
up while checkpointing leaves the previous checkpoint usable, and the run resumes from it."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from trainer import checkpoint

from .faultkit import COCOMIX, TRAIN, cli, refusal, wait_for

pytestmark = pytest.mark.slow
STEPS = 120  # 1.5 epochs of the train split's 309 windows, 4 windows a step


def train_args(world, labels, out):
    return ["train", *TRAIN, "--tokens", world / "tokens", "--labels", labels, "--out", out,
            "--max-tokens", STEPS * 4 * 16, "--set", "ckpt_interval=5", "--set", "eval_interval=50",
            "--set", "eval_windows=4", "--set", "log_interval=5"]  # logs align with checkpoints


@pytest.fixture(scope="module")
def straight(world, synthetic, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = cli(*train_args(world, synthetic, out))
    assert r.exit_code == 0, r.output
    return out


def assert_same_run(a, b):
    """Same final weights and optimizer state bit for bit, and the same losses at every logged step."""
    sa, sb = (checkpoint.load_state(checkpoint.latest(x)) for x in (a, b))
    assert sa["step"] == sb["step"] == STEPS
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    opt_a, opt_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][n], opt_b[i][n]) for i in opt_a for n in ("exp_avg", "exp_avg_sq"))
    timing = ("elapsed", "tokens_per_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in (x / "metrics.jsonl").open()]
            for x in (a, b)]
    assert rows[0] == rows[1]


def test_sigkill_mid_step_then_resume_is_bit_identical(world, synthetic, straight, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen([COCOMIX, *map(str, train_args(world, synthetic, out))], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: checkpoint.latest(out) or proc.poll() is not None, 180, "the first checkpoint")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, (tmp_path / "train.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = checkpoint.latest(out)
    assert killed_at is not None and not (out / "run.json").exists()  # it died mid-run
    r = cli(*train_args(world, synthetic, out))
    assert r.exit_code == 0, r.output
    assert_same_run(straight, out)


# A cocomix train process whose second checkpoint write is cut in half, after which it dies at once
# (SIGKILL: no cleanup runs), as a process killed or out of power in the middle of torch.save would.
DIES_IN_SAVE = """
import os, signal, sys, torch
saves, real = [], torch.save
def save(obj, f, *args, **kwargs):
    saves.append(f)
    real(obj, f, *args, **kwargs)
    if len(saves) == 2:
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from pipeline.cli import main
sys.argv = ["cocomix", *sys.argv[1:]]
main()
"""


def test_half_written_checkpoint_is_never_the_latest(world, synthetic, straight, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", DIES_IN_SAVE, *map(str, train_args(world, synthetic, out))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    [half] = (out / "checkpoints").glob(".step-0000010.tmp-*")
    with pytest.raises(RuntimeError, match="zip archive"):  # really half a file
        torch.load(half / "state.pt", weights_only=False)
    (out / "checkpoints" / "step-0000015").mkdir()  # a step folder without its files (a copy cut short)
    assert checkpoint.latest(out).name == "step-0000005"
    r = cli(*train_args(world, synthetic, out))
    assert r.exit_code == 0, r.output
    assert_same_run(straight, out)
    assert not half.exists()  # the dead writer's leftovers are cleaned up


def test_disk_full_while_checkpointing_keeps_the_previous_one(world, synthetic, straight, tmp_path, monkeypatch):
    out, real = tmp_path / "run", torch.save
    saves = []

    def full_disk(obj, f, *args, **kwargs):  # the second checkpoint runs out of space half-way
        saves.append(f)
        if len(saves) < 2:
            return real(obj, f, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    r = cli(*train_args(world, synthetic, out))
    refusal(r, 1, "No space left on device", str(checkpoint.checkpoint_dir(out, 10)), alone=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000005"]  # no partial folder
    model, meta = checkpoint.load_model(out)  # the previous checkpoint is whole and loads
    assert checkpoint.load_state(checkpoint.latest(out))["step"] == 5 and meta["model"]["mode"] == "cocomix"
    monkeypatch.undo()
    r = cli(*train_args(world, synthetic, out))  # space freed: the same command resumes from step 5
    assert r.exit_code == 0, r.output
    assert_same_run(straight, out)
