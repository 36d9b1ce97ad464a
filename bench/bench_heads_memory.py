"""Peak memory of the wide heads, unchunked against chunked (trainer/chunked.py, issue #14).

One forward + backward of the gpt2-69m student (8 layers, d 512, vocab 50,257; cocomix with C = 32,768
concepts before block 3; kd on top-32 teacher labels; ntp at the same width), random weights and batch
(bench/rehearsal.py), fp32 on the CPU, at 4 x 1024 tokens per micro-batch: the preset's 16 x 1024 does not
fit this benchmark's few minutes on a shared CPU, and 4 x 1024 is already past the default budget for both
heads (2 concept chunks of 2048 tokens, 4 LM chunks of up to 1335). Each run is a fresh subprocess, so each
peak is its own: the child's peak resident set (ru_maxrss), and the part of it above the built model and
batch. Unchunked is the same code with an unbounded budget (trainer.model.GPT's chunk_elements). Step
times are wall seconds and only a hint: chunking adds one forward of the heads, and on a shared CPU the
neighbours' load dominates. About 4 minutes when the cores are free (the cocomix runs took 30-40 s each);
beside the study's training runs at nice 19 it took 37 minutes.
BENCH_HEADS_WINDOWS=N changes the windows per micro-batch, BENCH_THREADS=N torch's threads (default 1).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

GIB = 1 << 30
MODES = ("cocomix", "kd", "ntp")
UNBOUNDED = sys.maxsize


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(mode: str, windows: int, budget: int) -> dict:
    """One forward + backward in this process; its peak memory, time and loss."""
    import torch

    from bench.rehearsal import PAPER, fake_batch, student
    from trainer.model import GPT

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    cpu = torch.device("cpu")
    tc = student(mode, replace(PAPER, train_batch=windows), cpu, dtype="float32")
    batch = fake_batch(tc, cpu, PAPER.teacher_topk)
    torch.manual_seed(0)
    model = GPT(tc.model_config())
    before = _maxrss()
    t0 = time.perf_counter()
    out = model(batch.pop("idx"), batch.pop("targets"), **batch, chunk_elements=budget)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    return {"peak": _maxrss(), "above_model": _maxrss() - before, "seconds": seconds,
            "loss": out.loss.item(), "tokens": tc.batch_size * tc.block_size, "vocab": tc.vocab_size,
            "concepts": tc.n_concepts if tc.mode == "cocomix" else 0}


def run(mode: str, windows: int, budget: int) -> dict:
    """child() in a fresh interpreter, so that its peak is not an earlier run's."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench.bench_heads_memory", "--child", mode, str(windows), str(budget)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _chunks(tokens: int, width: int, budget: int) -> str:
    from trainer.chunked import one_chunk

    if not width:
        return "-"
    step = max(1, budget // width)
    return "1 (unchunked)" if one_chunk(tokens, width, budget) else f"{-(-tokens // step)} of {step} tokens"


def main() -> list[tuple]:
    """Rows (name, value, unit, note) for `make bench`."""
    from trainer.chunked import CHUNK_ELEMENTS

    windows = int(os.environ.get("BENCH_HEADS_WINDOWS", "4"))
    rows = []
    for mode in MODES:
        before, after = run(mode, windows, UNBOUNDED), run(mode, windows, CHUNK_ELEMENTS)
        n, shape = after["tokens"], f"gpt2-69m {mode}, {windows} x 1024 tokens, fp32, one forward + backward"
        for name, r, budget in (("unchunked", before, UNBOUNDED), ("chunked", after, CHUNK_ELEMENTS)):
            rows.append((f"{mode} {name} peak", f"{r['peak'] / GIB:.2f}", "GiB",
                         f"{shape}; {r['above_model'] / GIB:.2f} GiB above the built model; {r['seconds']:.1f}s wall; "
                         f"LM head chunks {_chunks(n, r['vocab'], budget)}, concept head chunks "
                         f"{_chunks(n, r['concepts'], budget)}"))
        rows.append((f"{mode} chunked / unchunked peak", f"{after['peak'] / before['peak']:.2f}", "x",
                     f"above the built model {after['above_model'] / before['above_model']:.2f}x; loss "
                     f"{after['loss']:.6f} chunked vs {before['loss']:.6f}"))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        for row in main():
            print(" | ".join(map(str, row)))
