"""`cocomix plan`: the FLOPs, memory, label-store bytes and wall time of a run at any scale, on paper.

No weights are loaded: the student's shape comes from its TrainConfig (preset, TOML, --set), the teacher's
from its transformers config (modules built on the meta device), the SAE's from its checkpoint or from
--sae-latents/--sae-k. bench/bench_scale.py checks these formulas against measured steps on the CPU.

Notation: D tokens (the budget: every token is labelled once and trained on once), T the window
(= block_size = the label grid), b windows per micro-batch, d width, L blocks, V vocabulary, C concepts
(= the SAE's latents), k_c = k_concept, a heads. FLOPs count 2 per multiply-add; attention's QK^T and AV
are counted at the full context, not halved for the causal mask, and a backward is 2x its forward: the
PaLM (Chowdhery et al. 2022, App. B) and nanoGPT `estimate_mfu` convention, so MFU figures compare.

Student parameters (exact; equal to trainer.model.GPT.num_params):
    P_blk = 12 d^2 + 13 d (bias) | 12 d^2 + 2 d (no bias)
    total = V d + T d + L P_blk + ln_f [+ cocomix: d + (d C + C) + (C d + d) if mixing] [+ pause: d]
    N     = total - T d   (non-embedding: the position table is a lookup; wte counts once, as the tied head)
Training FLOPs:
    ntp, kd:  F = 6 N D + 12 L d T D
    cocomix:  F = 6 N' D + 12 d T D (L_b + 4 L_a) + 6 k_c d D,   N' = N - C d + L_a P_blk
              L_b = insert_layer blocks on T positions, L_a = L - insert_layer blocks on the interleaved 2T
              (twice the matmuls per token, and 2 positions x a 2T context = 4x the attention); the
              compression is a gather of k_c rows (2 k_c d), not a (C x d) matmul; the concept head's
              d x C matmul is in N. Without mixing L_a = 0 and N' = N.
    pause:    as cocomix with L_a = L and no concept head.
    Vectors (biases, norms) count as matrices, as in nanoGPT (< 0.1%). Top-k, softmax and log-sum-exp over
    the C and V logits are memory-bound and not counted: they are why real MFU is below 1.
Extraction FLOPs per token (teacher: L_t blocks of P_t parameters, width d_t, head V d_t; hook at the
output of block l (resid_post_mlp; another location in block l moves the hook by less than a block),
u = L_t - l - 1 blocks above it; SAE with C latents, k_sae active, on d_t):
    forward   2 (L_t P_t + V d_t) + 4 L_t T d_t
    backward  2 (u P_t + V d_t) + 8 u T d_t    input gradients only, from the loss down to the hook
    SAE       2 d_t C                          dense pre-activations (every latent is scored)
    attrib.   2 k_sae d_t                      k_sae decoder rows gathered and dotted with dL/dh
    dense reference (the paper's code): 3 forward + 2 d_t C + 2 d_t C (full backward, (N x C) product)
Memory per device, bytes (act = 2 for bf16 activations, 4 for fp32). Each is the sum of its parts, as if
all were alive at once: an upper bound, since activations are freed as the gradients appear. The head
constants were measured (bench/rehearsal.py, CPU, torch 2.13: slopes of peak memory over V and C); the
block term is Korthikanti et al.'s:
    training   16 P                  fp32 weights 4 P, grads 4 P, AdamW exp_avg + exp_avg_sq 8 P (DDP:
                                     every device holds all; FSDP/ZeRO-3 would divide this by the devices)
               34 s b d act/2        per block (Korthikanti et al. 2022, Sec. 4.1) with fused attention
                                     (FlashAttention / SDPA store no scores); s = T, or 2T above insert_layer;
                                     unfused attention adds 5 a s^2 b act/2 per block (shown apart)
               b T V (act + 6)       LM-head logits, their fp32 log-softmax and its gradient (measured 6.4
                                     bytes at bf16, 9.9 at fp32)
               b T C (act + 16)      cocomix concept logits: their fp32 copy for the log-sum-exp, its
                                     softmax, the dense gradient TopK's backward scatters, and the sum of
                                     both gradients (measured 17.9 at bf16, 18.8 at fp32)
               b T V 22              kd on top: the tempered fp32 logits, their log-softmax, the tail's
                                     masked copy and their gradients (measured 21.3 at bf16, 20.3 at fp32)
    extraction 4 P_t + 4 (2 C d_t + C + d_t)   fp32 teacher (bf16 autocast) and SAE weights
               34 s b d_t act/2 u    activations kept for the partial backward (blocks above the hook)
               b T V (act + 12)      logits, the fp32 log-softmax and the gradients (measured 15.4 at fp32)
               4 b T C + min(64 MiB, 4 b T k_sae d_t)   fp32 SAE pre-activations (measured 4.4), the decoder-row
                                     gather (pipeline.attribution slices it at about 64 MiB)
Label store (storage_schemas.LabelSpec.arrays(), raw codec): per token k (2|4) ids (uint16 up to 65,536
latents, else uint32) + 2 k scores (float16) + 1 valid (bool) [+ 6 K teacher top-K (uint32 ids, float16
log-probs)] [+ (2|4 + 2) k_sae SAE code]; one work unit = chunk_windows x T rows (x shard_chunks, sharded)
= one file per array plus one completion record, so files per 1B tokens = ceil(1e9 / unit rows) x (arrays + 1).
Wall time = F / (devices x peak x MFU). Default peak 989 TFLOP/s (H100/H200 SXM dense bf16) and MFU 0.4,
a typical well-tuned GPU figure; `python -m bench.gpu_check` measures both kinds of MFU on a real GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from storage_schemas import LabelSpec, UserError, dtype_for_vocab
from trainer.config import TrainConfig, build_config, parse_sets

DEFAULT_LATENTS, DEFAULT_SAE_K, DEFAULT_KD_TOPK = 32768, 32, 32  # OpenAI v5 32k TopK(32); the demo's KD K
GATHER_BYTES = 64 << 20  # pipeline.attribution slices its decoder-row gather to about this


@dataclass(frozen=True)
class PlanConfig:
    """Everything `cocomix plan` needs. Sizes only: no weights are read."""

    preset: str | None = None
    """Student preset (trainer.config.PRESETS)."""
    config: Path | None = None
    """TOML file of TrainConfig fields (may name a preset), as `cocomix train --config`."""
    sets: tuple[str, ...] = ()
    """key=value TrainConfig overrides."""
    teacher: str | None = None
    """Local transformers folder or cached hub name (config only); None: transformers.GPT2Config() defaults,
    which are GPT-2 124M, the paper's teacher."""
    sae: Path | None = None
    """SAE checkpoint (any format sae.load_sae reads); None: --sae-latents/--sae-k."""
    sae_latents: int | None = None
    """SAE latents without a checkpoint (default 32768)."""
    sae_k: int | None = None
    """SAE active latents per token without a checkpoint (default 32)."""
    layer: int | None = None
    """Teacher block the SAE reads; None: the SAE checkpoint's recorded hook layer, else 5 (the paper's)."""
    label_k: int = 4
    """Concept labels per token."""
    teacher_topk: int | None = None
    """Teacher top-K stored for KD; None: 32 in kd mode, else none. 0 stores none."""
    tokens: int = 0
    """Token budget; 0 takes the config's max_tokens."""
    micro_batch: int = 0
    """Training windows per micro-batch per device; 0 takes the config's batch_size."""
    extract_batch: int = 8
    """Windows per teacher forward in extraction (`cocomix extract --batch-windows`)."""
    chunk_windows: int = 64
    """Windows per label-store chunk (`cocomix extract --chunk-windows`)."""
    shard_chunks: int = 1
    """Chunks per label-store shard file (`cocomix extract --shard-chunks`); 1: unsharded."""
    devices: int = 1
    peak_tflops: float = 989.0
    """Peak dense TFLOP/s of one device at the activations' precision."""
    mfu: float = 0.4
    """Model FLOPs utilisation assumed for training."""
    extract_mfu: float | None = None
    """MFU assumed for extraction; None: the same as mfu."""
    act_bytes: int = 2
    """Bytes per activation: 2 (bf16 autocast, the GPU default) or 4 (fp32)."""

    def __post_init__(self):
        for name in ("devices", "label_k", "extract_batch", "chunk_windows", "shard_chunks"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("tokens", "micro_batch"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.peak_tflops <= 0:
            raise UserError(f"--peak-tflops must be positive, got {self.peak_tflops}")
        for name in ("mfu", "extract_mfu"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.act_bytes not in (2, 4):
            raise UserError(f"--act-bytes must be 2 (bf16) or 4 (fp32), got {self.act_bytes}")
        if self.sae is not None and (self.sae_latents or self.sae_k):
            raise UserError("give --sae PATH or --sae-latents/--sae-k, not both")
        if min(self.sae_latents or 1, self.sae_k or 1) < 1 or self.teacher_topk is not None and self.teacher_topk < 0:
            raise UserError("--sae-latents, --sae-k and --teacher-topk must be positive")


class TeacherShape(NamedTuple):
    name: str
    n_layer: int
    d: int
    vocab: int
    context: int | None
    params: int
    """All parameters, a tied head counted once."""
    block_params: int
    """One block's (blocks are assumed alike)."""
    head_params: int
    """The output embedding, V x d."""


class SAEShape(NamedTuple):
    latents: int
    d_in: int
    k: int
    source: str
    hook_layer: int | None = None
    hook_location: str = "resid_post_mlp"


# --- shapes ------------------------------------------------------------------------------------------

def teacher_shape(name: str | None) -> TeacherShape:
    """Sizes of a teacher from its config alone: its modules are built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from pipeline.teacher import resolve_teacher, teacher_config

    config = GPT2Config() if name is None else teacher_config(resolve_teacher(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model_shape(model, name or "GPT-2 124M (transformers.GPT2Config() defaults)")


def model_shape(model, name: str) -> TeacherShape:
    """Sizes of a transformers causal LM (on any device, meta included)."""
    from pipeline.teacher import context_length
    from sae.hooks import blocks

    config, first = model.config, blocks(model)[0]
    return TeacherShape(name, len(blocks(model)), int(config.hidden_size), int(config.vocab_size),
                        context_length(config), sum(p.numel() for p in model.parameters()),
                        sum(p.numel() for p in first.parameters()), model.get_output_embeddings().weight.numel())


def sae_shape(cfg: PlanConfig, d_teacher: int) -> SAEShape:
    """From the checkpoint (sae.load_sae, any format) or from the flags (d_in = the teacher's width)."""
    if cfg.sae is None:
        return SAEShape(cfg.sae_latents or DEFAULT_LATENTS, d_teacher, cfg.sae_k or DEFAULT_SAE_K, "flags")
    from sae import load_sae

    c = load_sae(cfg.sae).cfg
    return SAEShape(c.n_latents, c.d_in, c.k, str(cfg.sae), c.hook_layer, c.hook_location)


def student_config(cfg: PlanConfig, vocab: int, latents: int) -> TrainConfig:
    """The TrainConfig as `cocomix train` would build it, with vocab and C taken from teacher and SAE."""
    tc = build_config(cfg.preset, cfg.config, parse_sets(list(cfg.sets)))
    if tc.mode == "cocomix" and tc.n_concepts and tc.n_concepts != latents:
        raise UserError(f"n_concepts {tc.n_concepts} differs from the SAE's {latents} latents: "
                        f"set n_concepts={latents} or use that SAE")
    resolved = {"vocab_size": tc.vocab_size or vocab, "n_concepts": latents if tc.mode == "cocomix" else 0}
    return build_config(cfg.preset, cfg.config, parse_sets(list(cfg.sets)) | resolved)


def check_sae(cfg: PlanConfig, t: TeacherShape, s: SAEShape, layer: int) -> None:
    """The refusals `cocomix extract` would give for this teacher and SAE."""
    if not 0 <= layer < t.n_layer:
        raise UserError(f"layer {layer} is out of range: the teacher has {t.n_layer} blocks (0..{t.n_layer - 1})")
    if s.d_in != t.d:
        raise UserError(f"SAE d_in {s.d_in} does not match the teacher's hidden size {t.d}; use an SAE on this teacher")
    if cfg.label_k > s.k:
        raise UserError(f"--label-k {cfg.label_k} cannot exceed the SAE's {s.k} active latents")


def check_student(t: TeacherShape, tc: TrainConfig) -> None:
    """The refusals `cocomix train` would give for a student on this teacher's labels."""
    if t.context is not None and tc.block_size > t.context:
        raise UserError(f"block_size {tc.block_size} is longer than the teacher's context ({t.context}): lower it")
    if tc.vocab_size > t.vocab:
        raise UserError(f"the student's vocab_size {tc.vocab_size} is larger than the teacher's {t.vocab}")


# --- formulas (module docstring) ---------------------------------------------------------------------

def student_params(tc: TrainConfig) -> dict[str, int]:
    """total, non_embedding (= GPT.num_params()) and block parameters of the student tc describes."""
    d, bias = tc.n_embd, tc.bias
    ln = 2 * d if bias else d
    block = 12 * d * d + 2 * ln + (9 * d if bias else 0)  # 4 matrices; 2 norms; qkv, proj, fc, proj biases
    total = tc.vocab_size * d + tc.block_size * d + tc.n_layer * block + ln
    if tc.mode == "cocomix":
        C = tc.n_concepts
        total += d + (d * C + C) + ((C * d + d) if tc.concept_mix else 0)  # pre_bias, head, compression
    elif tc.mode == "pause":
        total += d
    return {"total": total, "non_embedding": total - tc.block_size * d, "block": block}


def doubled_blocks(tc: TrainConfig) -> int:
    """Blocks that run on the interleaved 2T positions."""
    if tc.mode == "pause":
        return tc.n_layer
    return tc.n_layer - tc.insert_layer if tc.mode == "cocomix" and tc.concept_mix else 0


def train_flops(tc: TrainConfig, tokens: int) -> dict[str, float]:
    """Training FLOPs: per token, total, and the 6 N D part alone."""
    p, d, T, L = student_params(tc), tc.n_embd, tc.block_size, tc.n_layer
    n, up = p["non_embedding"], doubled_blocks(tc)
    matmul = n + up * p["block"]
    gather = 0
    if tc.mode == "cocomix" and tc.concept_mix:
        matmul -= tc.n_concepts * d
        gather = 2 * tc.k_concept * d
    fwd = 2 * matmul + 4 * d * T * ((L - up) + 4 * up) + gather
    return {"per_token": 3 * fwd, "total": 3 * fwd * tokens, "six_nd": 6 * n * tokens, "n": n, "matmul_params": matmul}


def extract_flops(t: TeacherShape, s: SAEShape, layer: int, window: int, tokens: int) -> dict[str, float]:
    """Extraction FLOPs per token (kernel and the paper's dense reference) and in total."""
    up, W, d = t.n_layer - layer - 1, window, t.d
    fwd = 2 * (t.n_layer * t.block_params + t.head_params) + 4 * t.n_layer * W * d
    bwd = 2 * (up * t.block_params + t.head_params) + 8 * up * W * d
    enc, attr = 2 * d * s.latents, 2 * s.k * d
    kernel, dense = fwd + bwd + enc + attr, 3 * fwd + 2 * enc
    return {"per_token": kernel, "total": kernel * tokens, "forward": fwd, "partial_backward": bwd, "sae_encode": enc,
            "attribution": attr, "dense_reference_per_token": dense, "dense_over_kernel": dense / kernel}


def block_activations(b: int, s: int, d: int, heads: int, act_bytes: int) -> tuple[float, float]:
    """Bytes one block keeps for its backward (Korthikanti et al. 2022): fused attention, and the score
    matrices an unfused attention would add."""
    return 34 * s * b * d * act_bytes / 2, 5 * heads * s * s * b * act_bytes / 2


def train_memory(tc: TrainConfig, b: int, act_bytes: int, teacher_topk: int) -> dict[str, float]:
    """Bytes per device of a training step with b windows per micro-batch."""
    P, T, L, up = student_params(tc)["total"], tc.block_size, tc.n_layer, doubled_blocks(tc)
    low, low_scores = block_activations(b, T, tc.n_embd, tc.n_head, act_bytes)
    high, high_scores = block_activations(b, 2 * T, tc.n_embd, tc.n_head, act_bytes)
    out = {"weights": 4 * P, "grads": 4 * P, "adamw": 8 * P, "activations": (L - up) * low + up * high,
           "lm_logits": b * T * tc.vocab_size * (act_bytes + 6),
           "concept_logits": b * T * tc.n_concepts * (act_bytes + 16) if tc.mode == "cocomix" else 0,
           "kd_head": b * T * tc.vocab_size * 22 if tc.mode == "kd" and teacher_topk else 0}
    out["total"] = sum(out.values())
    out["attention_scores_if_unfused"] = (L - up) * low_scores + up * high_scores
    return out


def extract_memory(t: TeacherShape, s: SAEShape, layer: int, window: int, b: int, act_bytes: int) -> dict[str, float]:
    """Bytes per extraction worker (one per device) with b windows per teacher forward."""
    kept, _ = block_activations(b, window, t.d, 1, act_bytes)
    out = {"teacher_weights": 4 * t.params, "sae_weights": 4 * (2 * s.latents * s.d_in + s.latents + s.d_in),
           "activations": kept * (t.n_layer - layer - 1), "logits": b * window * t.vocab * (act_bytes + 12),
           "sae_pre_acts": 4 * b * window * s.latents, "gather": min(GATHER_BYTES, 4 * b * window * s.k * s.d_in)}
    out["total"] = sum(out.values())
    return out


def label_store(latents: int, k: int, window: int, tokens: int, chunk_windows: int, teacher_topk: int,
                vocab: int, shard_chunks: int = 1) -> dict:
    """Bytes and files of the label store `cocomix extract` would write (raw codec, zarr), and the token store."""
    spec = LabelSpec(token_fingerprint="plan", window=window, k=k, n_latents=latents, teacher_k=teacher_topk or None,
                     chunk_windows=chunk_windows, shard_chunks=shard_chunks)
    per_array = {name: np.dtype(dt).itemsize * math.prod(shape) for name, (dt, shape) in spec.arrays().items()}
    per_token = sum(per_array.values())
    return {"per_token": per_token, "per_array": per_array, "total": per_token * tokens, "ids_dtype": spec.ids_dtype,
            "chunk_rows": spec.chunk_rows, "files": spec.files(tokens), "files_per_billion": spec.files(10**9),
            "token_store_total": np.dtype(dtype_for_vocab(vocab)).itemsize * tokens}


def wall_seconds(flops: float, devices: int, peak_tflops: float, mfu: float) -> float:
    """Seconds to do `flops` on `devices` devices of `peak_tflops` each at utilisation `mfu`."""
    return flops / (devices * peak_tflops * 1e12 * mfu)


# --- the plan ---------------------------------------------------------------------------------------

def make_plan(cfg: PlanConfig) -> dict:
    """Every figure of the plan as one JSON-able dict (refusing inconsistent sizes first)."""
    t = teacher_shape(cfg.teacher)
    s = sae_shape(cfg, t.d)
    layer = cfg.layer if cfg.layer is not None else s.hook_layer if s.hook_layer is not None else 5
    check_sae(cfg, t, s, layer)
    tc = student_config(cfg, t.vocab, s.latents)
    check_student(t, tc)
    tokens, b = cfg.tokens or tc.max_tokens, cfg.micro_batch or tc.batch_size
    topk = cfg.teacher_topk if cfg.teacher_topk is not None else (DEFAULT_KD_TOPK if tc.mode == "kd" else 0)
    if topk > t.vocab:
        raise UserError(f"--teacher-topk {topk} is larger than the teacher's vocabulary ({t.vocab})")
    if tc.mode == "kd" and not topk:
        raise UserError("kd mode trains on the teacher's stored top-K: give --teacher-topk K > 0")
    train, extract = train_flops(tc, tokens), extract_flops(t, s, layer, tc.block_size, tokens)
    e_mfu = cfg.extract_mfu or cfg.mfu
    times = {"extract_s": wall_seconds(extract["total"], cfg.devices, cfg.peak_tflops, e_mfu),
             "train_s": wall_seconds(train["total"], cfg.devices, cfg.peak_tflops, cfg.mfu)}
    return {
        "student": {"preset": cfg.preset, "mode": tc.mode, "n_layer": tc.n_layer, "n_embd": tc.n_embd,
                    "n_head": tc.n_head, "block_size": tc.block_size, "vocab_size": tc.vocab_size,
                    "n_concepts": tc.n_concepts, "insert_layer": tc.insert_layer, "params": student_params(tc)},
        "teacher": t._asdict(), "sae": {**s._asdict(), "layer": layer},
        "tokens": tokens, "flops": {"train": train, "extract": extract},
        "memory": {"act_bytes": cfg.act_bytes, "micro_batch": b, "extract_batch": cfg.extract_batch,
                   "train": train_memory(tc, b, cfg.act_bytes, topk),
                   "extract": extract_memory(t, s, layer, tc.block_size, cfg.extract_batch, cfg.act_bytes)},
        "label_store": {"k": cfg.label_k, "teacher_topk": topk, "chunk_windows": cfg.chunk_windows,
                        "shard_chunks": cfg.shard_chunks,
                        **label_store(s.latents, cfg.label_k, tc.block_size, tokens, cfg.chunk_windows, topk, t.vocab,
                                      cfg.shard_chunks)},
        "time": {"devices": cfg.devices, "peak_tflops": cfg.peak_tflops, "mfu": cfg.mfu, "extract_mfu": e_mfu,
                 **times, "train_tokens_per_s_per_device": tokens / times["train_s"] / cfg.devices,
                 "extract_tokens_per_s_per_device": tokens / times["extract_s"] / cfg.devices},
    }

