"""Measured pieces of the scale rehearsal, shared by bench/bench_scale.py (CPU) and bench/gpu_check.py (GPU).

Each piece builds what it measures from random weights at the given shapes (no hub, no stores: weights
change the values, not the cost), times it, and reads its peak memory. FLOPs and memory predictions come
from pipeline/plan.py, so every figure here is a check of `cocomix plan`:
    predicted time = plan FLOPs / the device's measured matmul peak   (MFU = 1 against that peak)
    ratio          = predicted / measured = the share of the matmul peak the piece achieves.
Peak memory: on CUDA torch's allocator peak; on Linux CPUs the process's resident high-water mark (VmHWM),
reset before the piece through /proc/self/clear_refs after returning freed heap to the OS (malloc_trim),
minus the resident size at the start; elsewhere ru_maxrss, a lifetime peak (marked not exact).
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import plan


@dataclass(frozen=True)
class Shapes:
    """One set of sizes for every piece. PAPER is the paper's setting; REDUCED keeps its proportions."""

    name: str
    teacher: dict = field(default_factory=dict)
    """transformers.GPT2Config overrides ({}: GPT-2 124M)."""
    latents: int = 32768
    sae_k: int = 32
    layer: int = 5
    window: int = 1024
    extract_batch: int = 1
    student: dict = field(default_factory=dict)
    """TrainConfig overrides of the gpt2-69m presets ({}: the presets' sizes)."""
    wide_embd: int = 624
    """n_embd of the widened NTP student (gpt2-69m-ntp)."""
    vocab: int = 50257
    train_batch: int = 1
    teacher_topk: int = 32
    """K of the KD labels."""


PAPER = Shapes("paper")
# GPT-2 124M / 6 in width with its 12 blocks and hook; latents 43 x d and the student's C 64 x d as in the
# paper (32768 = 43 x 768 = 64 x 512); the widened NTP student 152 ~ 624/512 x 128, a multiple of its 8 heads.
REDUCED = Shapes("reduced", teacher=dict(n_embd=128, n_head=2, n_positions=256, vocab_size=8192, bos_token_id=0,
                                         eos_token_id=0), latents=43 * 128, window=256, extract_batch=4,
                 student=dict(n_embd=128, n_concepts=64 * 128), wide_embd=152, vocab=8192, train_batch=2)
MODES = {"ntp": ("gpt2-69m", "ntp"), "ntp-wide": ("gpt2-69m-ntp", "ntp"), "cocomix": ("gpt2-69m", "cocomix"),
         "kd": ("gpt2-69m", "kd")}
"""name -> (preset, mode): every student is the gpt2-69m preset in that mode; ntp-wide is the paper's
parameter-matched NTP baseline."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of repeated (n x n) @ (n x n) products: the best of several timed blocks."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)
    best, reps, t_end = 0.0, 1, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 * reps / dt)
        reps = reps * 2 if dt < 0.05 else reps
    return best


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.bytes: the piece's peak memory above its start."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.exact = device, 0, True

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self.exact = _reset_high_water()
            self.start = _status_bytes("VmRSS") if self.exact else _maxrss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.bytes = (_status_bytes("VmHWM") if self.exact else _maxrss()) - self.start
        return False


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# --- extraction --------------------------------------------------------------------------------------

def build_extraction(shapes: Shapes, device: torch.device, seed: int = 0):
    """(teacher, sae) with random weights. The teacher uses torch's fused tanh GELU, as `load_teacher` swaps
    in for GPT-2's gelu_new (the same formula)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae import SAEConfig, TopKSAE

    torch.manual_seed(seed)
    cfg = GPT2Config(**shapes.teacher, activation_function="gelu_pytorch_tanh")
    teacher = GPT2LMHeadModel(cfg).to(device).eval().requires_grad_(False)
    sae = TopKSAE(SAEConfig(d_in=cfg.n_embd, n_latents=shapes.latents, k=shapes.sae_k, normalize="layer_norm"))
    return teacher, sae.to(device).eval()


def windows(shapes: Shapes, batch: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    vocab = shapes.teacher.get("vocab_size", 50257)
    return torch.randint(0, vocab, (batch, shapes.window), generator=torch.Generator().manual_seed(seed)).to(device)


def dense_reference(teacher, sae, layer: int, x: torch.Tensor, k: int = 4):
    """The paper's computation (bench/bench_extract.py's reference, for any SAE width): parameter gradients,
    the full backward, and the dense (tokens x latents) attribution product."""
    import torch.nn.functional as F

    seen = {}

    def keep(module, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out
        seen["h"].retain_grad()

    teacher.requires_grad_(True)
    handle = teacher.transformer.h[layer].register_forward_hook(keep)
    try:
        logits = teacher(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").backward()
        h, g = seen["h"].detach().flatten(0, 1), seen["h"].grad.flatten(0, 1)  # (N, d)
        with torch.no_grad():
            enc = sae.encode(h)
            dense = torch.zeros(h.shape[0], sae.cfg.n_latents, device=h.device).scatter_(-1, enc.indices, enc.values)
            return (dense * (g @ sae.W_dec.T)).topk(k, dim=-1)
    finally:
        handle.remove()
        teacher.zero_grad(set_to_none=True)
        teacher.requires_grad_(False)


def extraction(shapes: Shapes, device: torch.device, repeats: int, dense: bool, batch: int | None = None) -> dict:
    """The kernel (pipeline.attribution.attribute) at these shapes: seconds per batch (best of repeats),
    tokens/s, plan FLOPs and memory, measured peak memory; with dense, the paper's reference beside it,
    interleaved so both see the same machine load."""
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401  imported outside the meter: modules are not the piece's

    from pipeline.attribution import attribute

    b = batch or shapes.extract_batch
    x = windows(shapes, b, device)
    with PeakMemory(device) as mem:  # building included: the plan's figure counts the weights too
        teacher, sae = build_extraction(shapes, device)
        attribute(teacher, sae, shapes.layer, "resid_post_mlp", x)
    if dense:
        dense_reference(teacher, sae, shapes.layer, x)
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(_timed(device, lambda: attribute(teacher, sae, shapes.layer, "resid_post_mlp", x)))
        if dense:
            ref.append(_timed(device, lambda: dense_reference(teacher, sae, shapes.layer, x)))
    t = plan.model_shape(teacher, "teacher")
    s = plan.SAEShape(shapes.latents, t.d, shapes.sae_k, "random")
    flops = plan.extract_flops(t, s, shapes.layer, shapes.window, x.numel())
    act = 2 if device.type == "cuda" else 4  # bf16 autocast on CUDA (autocast_for), fp32 on CPU
    out = {"batch": b, "tokens": x.numel(), "seconds": min(ours), "tokens_per_s": x.numel() / min(ours),
           "flops": flops["total"], "peak_bytes": mem.bytes, "peak_exact": mem.exact,
           "predicted_bytes": plan.extract_memory(t, s, shapes.layer, shapes.window, b, act)["total"],
           "teacher_params": t.params, "predicted_dense_ratio": flops["dense_over_kernel"]}
    if dense:
        out |= {"dense_seconds": min(ref), "dense_ratio": min(ref) / min(ours)}
    return out


def label_agreement(shapes: Shapes, device: torch.device, batch: int = 1) -> dict:
    """bf16 labels against fp32 ones on the same windows and weights. bf16: on CUDA the kernel's own
    autocast (the teacher in bf16, what `cocomix extract` runs there); on a CPU the whole kernel under a bf16
    CPU autocast (the SAE encode too: a stricter test). fp32: the same kernel on the CPU, no autocast."""
    from pipeline.attribution import attribute

    teacher, sae = build_extraction(shapes, device)
    x, cpu = windows(shapes, batch, device, seed=2), torch.device("cpu")
    if device.type == "cuda":
        low = attribute(teacher, sae, shapes.layer, "resid_post_mlp", x)
        teacher, sae = teacher.to(cpu), sae.to(cpu)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attribute(teacher, sae, shapes.layer, "resid_post_mlp", x)
    ref = attribute(teacher, sae, shapes.layer, "resid_post_mlp", x.to(cpu))
    keep = ref.valid & low.valid.to(cpu)  # (B, W)
    ids, ref_ids = low.ids.to(cpu)[keep], ref.ids[keep]  # (n, k)
    overlap = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean()
    return {"positions": int(keep.sum()), "ids_identical": float((ids == ref_ids).float().mean()),
            "ids_same_set": float(overlap), "top1_identical": float((ids[:, 0] == ref_ids[:, 0]).float().mean()),
            "max_score_diff": float((low.scores.to(cpu)[keep] - ref.scores[keep]).abs().max()),
            "max_abs_score": float(ref.scores[keep].abs().max())}


# --- training ----------------------------------------------------------------------------------------

def student(name: str, shapes: Shapes, device: torch.device, compile: bool = False, dtype: str = "auto"):
    """The TrainConfig of a MODES student at these shapes (dtype auto: bf16 on CUDA, fp32 on CPU)."""
    from trainer.config import build_config

    preset, mode = MODES[name]
    sizes = dict(shapes.student, n_embd=shapes.wide_embd) if name == "ntp-wide" else dict(shapes.student)
    if mode != "cocomix":
        sizes.pop("n_concepts", None)
    return build_config(preset, None, {**sizes, "mode": mode, "vocab_size": shapes.vocab, "block_size": shapes.window,
                                       "batch_size": shapes.train_batch, "compile": compile, "device": device.type,
                                       "dtype": dtype})


def fake_batch(tc, device: torch.device, teacher_topk: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random windows and labels with the shapes and dtypes trainer.data.WindowData yields."""
    g = torch.Generator().manual_seed(seed)
    b, T, V = tc.batch_size, tc.block_size, tc.vocab_size
    idx = torch.randint(0, V, (b, T + 1), generator=g)
    out = {"idx": idx[:, :-1], "targets": idx[:, 1:]}
    if tc.mode == "cocomix":
        out["concept_ids"] = torch.randint(0, tc.n_concepts, (b, T, 4), generator=g)
        out["concept_mask"] = torch.rand(b, T, 4, generator=g) > 0.2
    if tc.mode == "kd":  # distinct ids with normalised, sorted log-probs (mass left for the tail)
        out["teacher_ids"] = torch.randint(0, V - teacher_topk, (b, T, 1), generator=g) + torch.arange(teacher_topk)
        lp = torch.randn(b, T, teacher_topk + 1, generator=g).log_softmax(-1)[..., :-1]
        out["teacher_logprobs"] = lp.sort(-1, descending=True).values
    return {k: v.to(device) for k, v in out.items()}


def training(name: str, shapes: Shapes, device: torch.device, steps: int, compile: bool = False,
             dtype: str = "auto") -> dict:
    """Optimizer steps of a student as trainer/train.py runs them (autocast, backward, clip, AdamW):
    seconds per step (mean of `steps` after warm-up), plan FLOPs and memory, measured peak memory."""
    from trainer.model import GPT
    from trainer.train import autocast_ctx, make_optimizer

    tc = student(name, shapes, device, compile, dtype)
    batch = fake_batch(tc, device, shapes.teacher_topk)
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        raw = GPT(tc.model_config()).to(device)
        opt = make_optimizer(raw, tc, device)
        model = torch.compile(raw) if compile else raw

        def step():
            with autocast_ctx(tc, device):
                o = model(batch["idx"], batch["targets"], **{k: v for k, v in batch.items() if k not in ("idx", "targets")})
            o.loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        # two steps: the second holds AdamW's states beside the gradients and activations (the plan's peak);
        # compilation, when asked, happens in the first
        warm = _timed(device, step) + _timed(device, step)
    seconds = sum(_timed(device, step) for _ in range(steps)) / steps
    tokens = tc.batch_size * tc.block_size
    act = 2 if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda") else 4
    return {"mode": tc.mode, "n_embd": tc.n_embd, "params": raw.num_params(non_embedding=False), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "warmup_s": warm,
            "flops": plan.train_flops(tc, tokens)["total"], "peak_bytes": mem.bytes, "peak_exact": mem.exact,
            "predicted_bytes": plan.train_memory(tc, tc.batch_size, act, shapes.teacher_topk)["total"]}


def _timed(device: torch.device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
