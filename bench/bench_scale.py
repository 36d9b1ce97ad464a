"""Scale rehearsal on this CPU: `cocomix plan`'s FLOPs and memory against measured steps.

The CPU's achieved fp32 matmul rate (torch.matmul of 1024^3, the threads below) is measured once before
and once after the pieces, and the better is the MFU = 1 reference: for every piece the plan's FLOPs
divided by it give a predicted time, and `predicted / measured` is the share of that matmul peak the
piece achieves (1.0 = as fast as a bare matmul; the plan's GPU wall times assume --mfu, 0.4 by default).
Peak memory is measured per piece (bench/rehearsal.py) beside the plan's estimate at fp32 activations.

Pieces (bench/rehearsal.py): the extraction kernel (pipeline.attribution.attribute) on a random teacher
and SAE, with the paper's dense reference beside it; and optimizer steps of the gpt2-69m students in
each mode: ntp (the same width), ntp-wide (gpt2-69m-ntp, the paper's parameter-matched baseline),
cocomix (C concepts) and kd (top-32 teacher labels).

Default (`make bench`): REDUCED shapes (GPT-2 124M / 6 in width, 12 blocks, hook after block 5, 5504
latents k 32, 4 x 256-token windows; students d 128, 8 layers, C 8192, vocab 8192, 2 x 256 tokens), one
thread, about 20 s. BENCH_SCALE=full: the paper's shapes (GPT-2 124M from GPT2Config() defaults, a
32,768-latent TopK(32) SAE on block 5, 1024-token windows, 1 window per batch; the gpt2-69m students at
vocab 50257, C 32768): a few minutes and ~3 GiB. BENCH_THREADS=N sets torch's threads (default 1).
"""

from __future__ import annotations

import os

import torch

from bench.rehearsal import MODES, PAPER, REDUCED, extraction, matmul_peak, training

GIB = 1 << 30
WOULD_MEASURE = ("BENCH_SCALE=full measures the same rows at the paper's shapes: extraction on GPT-2 124M "
                 "(GPT2Config()) + a 32,768-latent TopK(32) SAE on block 5, 1 x 1024 tokens (tokens/s, peak "
                 "memory, kernel/dense ratio vs the FLOP prediction); one step of each gpt2-69m student "
                 "(ntp, ntp-wide, cocomix C=32768, kd top-32, vocab 50257), 1 x 1024 tokens: step time, peak "
                 "memory, CoCoMix/NTP step ratio")


def _mem(piece: dict) -> str:
    exact = "" if piece["peak_exact"] else " (lifetime ru_maxrss: not exact)"
    return (f"peak {piece['peak_bytes'] / GIB:.2f} GiB measured{exact}, {piece['predicted_bytes'] / GIB:.2f} GiB "
            f"planned at fp32 activations")


def extraction_rows(ex: dict, peak: float, shape: str) -> list[tuple]:
    predicted = ex["flops"] / peak
    return [
        ("extraction kernel", f"{ex['tokens_per_s']:,.0f}", "tokens/s", f"{shape}; {ex['batch']} windows; {_mem(ex)}"),
        ("extraction predicted / measured", f"{predicted / ex['seconds']:.2f}", "x",
         f"plan {ex['flops'] / ex['tokens'] / 1e6:,.0f} MFLOP/token at the matmul peak: {predicted:.3f}s vs "
         f"{ex['seconds']:.3f}s measured"),
        ("extraction kernel / dense reference", f"{ex['dense_ratio']:.2f}", "x",
         f"FLOP-count prediction {ex['predicted_dense_ratio']:.2f}x (dense: full backward + (tokens x latents) product)"),
    ]


def training_rows(runs: dict[str, dict], peak: float, shape: str) -> list[tuple]:
    rows = []
    for name, r in runs.items():
        predicted = r["flops"] / peak
        rows.append((f"train step {name}", f"{r['seconds']:.3f}", "s",
                     f"{r['params'] / 1e6:.2f}M params, d {r['n_embd']}, {r['tokens']} tokens; predicted/measured "
                     f"{predicted / r['seconds']:.2f}; {_mem(r)}"))
    for base in ("ntp", "ntp-wide"):
        measured = runs["cocomix"]["seconds"] / runs[base]["seconds"]
        predicted = runs["cocomix"]["flops"] / runs[base]["flops"]
        rows.append((f"step ratio cocomix / {base}", f"{measured:.2f}", "x", f"FLOP-count prediction {predicted:.2f}x; {shape}"))
    return rows


def main() -> list[tuple]:
    """Rows (name, value, unit, note) for `make bench`."""
    full = os.environ.get("BENCH_SCALE", "") == "full"
    shapes, threads = (PAPER if full else REDUCED), int(os.environ.get("BENCH_THREADS", "1"))
    before, cpu = torch.get_num_threads(), torch.device("cpu")
    torch.set_num_threads(threads)
    try:
        first = matmul_peak(cpu, torch.float32)
        ex = extraction(shapes, cpu, repeats=2 if full else 3, dense=True)
        runs = {name: training(name, shapes, cpu, steps=1 if full else 3) for name in MODES}
        peak = max(first, matmul_peak(cpu, torch.float32))
    finally:
        torch.set_num_threads(before)
    shape = f"{shapes.name} shapes, {threads} thread(s), fp32"
    rows = [("CPU matmul peak", f"{peak / 1e9:.1f}", "GFLOP/s",
             f"fp32 1024^3 torch.matmul, best of before/after ({first / 1e9:.1f} before): the MFU = 1 reference")]
    rows += extraction_rows(ex, peak, shape) + training_rows(runs, peak, shape)
    if not full:
        rows.append(("paper shapes", "not run", "", WOULD_MEASURE))
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(map(str, row)))
