"""`make gpu-check`: the figures `cocomix plan` needs from a real accelerator, in about 5 minutes on one GPU.

    python -m bench.gpu_check [--device cuda|cpu] [--out report.json] [--peak-tflops X]

On CUDA, at the paper's shapes (bench/rehearsal.py PAPER) in bf16 autocast, as `cocomix extract` and
`cocomix train` run there:
- the device's achieved bf16 matmul rate (8192^3), and the spec peak when known (--peak-tflops, or a few
  known parts by name);
- extraction: GPT-2 124M + a 32,768-latent TopK(32) SAE on block 5, 8 x 1024-token windows: tokens/s, MFU,
  peak memory beside the plan's;
- one optimizer step of each gpt2-69m student (ntp, cocomix, kd) at the presets' micro-batch of 16 x 1024,
  eager and under torch.compile: seconds, tokens/s, MFU, peak memory beside the plan's;
- bf16 against fp32 labels on the same windows (the fp32 ones from the same kernel on the CPU): the share
  of identical label ids (slot by slot, top-1, as sets) and the largest score difference.
MFU = plan FLOPs / seconds / peak: against the spec peak when known, and against the measured matmul rate.
Compiled runs are skipped, with the reason, when the time budget (--budget-s) would be exceeded.

Without CUDA (or --device cpu) the same report at REDUCED shapes, fp32 against a bf16 CPU autocast, no
compile unless --compile: that is what tests/test_gpu_check.py runs. The report prints as a table and,
with --out, is written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.rehearsal import PAPER, REDUCED, extraction, label_agreement, matmul_peak, training
from storage_schemas import UserError

# dense bf16 TFLOP/s of parts this is likely to run on (vendor data sheets, SXM variants)
SPEC_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
TRAIN_MODES = ("ntp", "cocomix", "kd")


@dataclass(frozen=True)
class GPUCheckConfig:
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    extract_batch: int = 0
    """Windows per extraction batch; 0: 8 on CUDA, the reduced shapes' 4 on CPU."""
    train_batch: int = 0
    """Windows per training micro-batch; 0: the presets' 16 on CUDA, 2 on CPU."""
    steps: int = 3
    """Timed optimizer steps per run, after two warm-up steps."""
    compile: bool | None = None
    """Also time torch.compile'd steps; None: on CUDA only."""
    peak_tflops: float | None = None
    """Spec peak of the device; None: SPEC_TFLOPS by device name, else none (MFU against the matmul rate only)."""
    budget_s: float = 280.0
    """Compiled runs are skipped once the next would likely end past this many seconds."""
    out: Path | None = None

    def __post_init__(self):
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device must be auto, cuda or cpu, not {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is available: use --device cpu")
        if min(self.extract_batch, self.train_batch) < 0 or self.steps < 1:
            raise UserError("--extract-batch and --train-batch must be >= 0, --steps >= 1")


def spec_peak(cfg: GPUCheckConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops or device.type != "cuda":
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in SPEC_TFLOPS.items() if k in name), None)


def _mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return flops / seconds / peak if peak else None


def _train_entry(r: dict, matmul: float, spec: float | None) -> dict:
    return {"seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"], "warmup_s": r["warmup_s"],
            "mfu_vs_matmul": _mfu(r["flops"], r["seconds"], matmul), "mfu_vs_spec": _mfu(r["flops"], r["seconds"], spec),
            "peak_gib": r["peak_bytes"] / 2**30, "planned_gib": r["predicted_bytes"] / 2**30, "params": r["params"]}


def run(cfg: GPUCheckConfig) -> dict:
    """The report (module docstring) as a dict."""
    t_start = time.perf_counter()
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    base = PAPER if cuda else REDUCED
    shapes = replace(base, extract_batch=cfg.extract_batch or (8 if cuda else base.extract_batch),
                     train_batch=cfg.train_batch or (16 if cuda else base.train_batch))
    dtype = torch.bfloat16 if cuda else torch.float32
    matmul = matmul_peak(device, dtype, n=8192 if cuda else 1024)
    spec = spec_peak(cfg, device)
    ex = extraction(shapes, device, repeats=3, dense=False)
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "shapes": shapes.name,
        "precision": "bf16 autocast" if cuda else "fp32", "matmul_tflops": matmul / 1e12, "spec_tflops": spec,
        "extraction": {"batch": ex["batch"], "window": shapes.window, "tokens_per_s": ex["tokens_per_s"],
                       "mfu_vs_matmul": _mfu(ex["flops"], ex["seconds"], matmul),
                       "mfu_vs_spec": _mfu(ex["flops"], ex["seconds"], spec),
                       "peak_gib": ex["peak_bytes"] / 2**30, "planned_gib": ex["predicted_bytes"] / 2**30},
        "training": {},
    }
    for mode in TRAIN_MODES:
        report["training"][mode] = {"eager": _train_entry(training(mode, shapes, device, cfg.steps), matmul, spec)}
    compile_on = cfg.compile if cfg.compile is not None else cuda
    for mode in TRAIN_MODES:
        report["training"][mode]["compiled"] = _compiled(cfg, mode, shapes, device, compile_on, t_start, matmul, spec)
    report["labels_bf16_vs_fp32"] = label_agreement(shapes, device, batch=2 if cuda else 1)
    report["seconds"] = time.perf_counter() - t_start
    return report


def _compiled(cfg, mode, shapes, device, on: bool, t_start: float, matmul: float, spec) -> dict:
    if not on:
        return {"skipped": "torch.compile not asked for (default on CUDA only; --compile forces it)"}
    left = cfg.budget_s - (time.perf_counter() - t_start)
    if left < 60:  # a compile of these models takes tens of seconds
        return {"skipped": f"time budget: {left:.0f}s of --budget-s {cfg.budget_s:g} left"}
    return _train_entry(training(mode, shapes, device, cfg.steps, compile=True), matmul, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_report(r: dict) -> str:
    spec = f"{r['spec_tflops']:g}" if r["spec_tflops"] else "unknown"
    ex, lab = r["extraction"], r["labels_bf16_vs_fp32"]
    lines = [f"{r['device']} ({r['shapes']} shapes, {r['precision']}): matmul {r['matmul_tflops']:.2f} TFLOP/s, "
             f"spec {spec} TFLOP/s; {r['seconds']:.0f}s",
             f"extraction   {ex['tokens_per_s']:,.0f} tokens/s ({ex['batch']} x {ex['window']}), MFU "
             f"{_pct(ex['mfu_vs_spec'])} of spec, {_pct(ex['mfu_vs_matmul'])} of matmul; peak {ex['peak_gib']:.2f} "
             f"GiB (planned {ex['planned_gib']:.2f})"]
    for mode, runs in r["training"].items():
        for kind, t in runs.items():
            if "skipped" in t:
                lines.append(f"train {mode:<7} {kind:<8} skipped: {t['skipped']}")
                continue
            lines.append(f"train {mode:<7} {kind:<8} {t['seconds'] * 1e3:,.1f} ms/step, {t['tokens_per_s']:,.0f} "
                         f"tokens/s, MFU {_pct(t['mfu_vs_spec'])} of spec, {_pct(t['mfu_vs_matmul'])} of matmul; "
                         f"peak {t['peak_gib']:.2f} GiB (planned {t['planned_gib']:.2f})")
    lines.append(f"labels bf16 vs fp32: {_pct(lab['ids_identical'])} ids identical slot by slot, "
                 f"{_pct(lab['top1_identical'])} top-1, {_pct(lab['ids_same_set'])} as sets; max score difference "
                 f"{lab['max_score_diff']:.3g} (largest |score| {lab['max_abs_score']:.3g}); {lab['positions']} positions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--extract-batch", type=int, default=0)
    p.add_argument("--train-batch", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=280.0)
    p.add_argument("--out", type=Path, default=None)
    try:
        cfg = GPUCheckConfig(**vars(p.parse_args(argv)))
    except UserError as e:  # one line and exit 2, as the cocomix CLI does
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    report = run(cfg)
    print(format_report(report))
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
