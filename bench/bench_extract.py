"""Extraction throughput: the attribution kernel against the paper-style dense computation, the Ray
job with 1 and 2 workers, N label stores from one teacher pass against N extractions one after
another, and the bytes per token of the labels (ids + scores) raw and zstd.

One random teacher with the paper's proportions scaled down (GPT-2 124M + OpenAI's 32k SAE on block 5:
12 layers, hook after block 5, vocabulary ~64x d_model, latents ~43x d_model, SAE k 32), so the share
of each part (blocks below and above the hook, output head, SAE) matches the paper's setting.
Kernel and dense reference run side by side, interleaved, best of `repeats`. Target: kernel >= 1.8x.
The kernel runs on the teacher as `cocomix extract` loads it (torch's fused tanh GELU in place of
transformers' `gelu_new`), the dense reference on the plain transformers model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

D, LAYERS, HOOK, HEADS, VOCAB, CONTEXT = 128, 12, 5, 4, 8192, 128
LATENTS, SAE_K, K, BATCH = 43 * D, 32, 4, 8
TARGET = 1.8
MULTI_HOOKS = (HOOK - 2, HOOK, HOOK + 2)  # N = 3 stores, an SAE on each of three layers (a layer sweep)


def predicted_ratio(d=D, layers=LAYERS, hook=HOOK, vocab=VOCAB, window=CONTEXT, latents=LATENTS) -> float:
    """Dense / kernel multiply-adds per token.

    forward F = layers * block + vocab*d, block = 12 d^2 (qkv, proj, 4x MLP) + 2 W d (attention).
    kernel: F + input-gradients of the blocks above the hook and of the head + SAE encode.
    dense:  F + full backward (input and weight gradients, ~2F) + SAE encode + the dense
            (tokens x latents) product grad @ W_dec^T.
    """
    block, head, encode = 12 * d * d + 2 * window * d, vocab * d, latents * d
    fwd = layers * block + head
    kernel = fwd + (layers - hook - 1) * block + head + encode
    dense = 3 * fwd + encode + latents * d
    return dense / kernel


def predicted_multi_ratio(hooks=MULTI_HOOKS, d=D, layers=LAYERS, vocab=VOCAB, window=CONTEXT,
                          latents=LATENTS) -> float:
    """N separate extractions / one pass for N stores, in multiply-adds per token (as predicted_ratio).

    separate: each runs the forward, the input-gradients above its own hook and of the head, its encode.
    one pass: one forward, the input-gradients above the lowest hook and of the head, every encode.
    """
    block, head, encode = 12 * d * d + 2 * window * d, vocab * d, latents * d
    fwd = layers * block + head
    separate = sum(fwd + (layers - h - 1) * block + head + encode for h in hooks)
    one = fwd + (layers - min(hooks) - 1) * block + head + len(hooks) * encode
    return separate / one


def build(work: Path):
    """The teacher folder and SAE checkpoint, both random (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae import SAEConfig, TopKSAE, save_sae

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=LAYERS, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=CONTEXT,
                     bos_token_id=0, eos_token_id=0)
    teacher = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    teacher.save_pretrained(work / "teacher")
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=LATENTS, k=SAE_K, normalize="layer_norm")).eval()
    save_sae(sae, work / "sae")
    return teacher, sae


def dense_reference(teacher, sae, windows):
    """What the paper's code computes: parameter gradients, the whole backward, dense attributions."""
    from bench.rehearsal import dense_reference as reference

    return reference(teacher, sae, HOOK, windows, K)


def kernel_vs_dense(teacher, hf_teacher, sae, repeats: int) -> tuple[float, float]:
    """The kernel on the teacher as the pipeline loads it (`load_teacher`), the dense reference on the
    plain transformers model, as the paper's code runs it; the same weights."""
    from pipeline.attribution import attribute

    windows = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(1))
    ours, dense = [], []
    attribute(teacher, sae, HOOK, "resid_post_mlp", windows, k=K)  # warm-up (allocator, kernels)
    dense_reference(hf_teacher, sae, windows)
    for _ in range(repeats):  # interleaved: both see the same machine load
        t0 = time.perf_counter()
        attribute(teacher, sae, HOOK, "resid_post_mlp", windows, k=K)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dense_reference(hf_teacher, sae, windows)
        dense.append(time.perf_counter() - t0)
    n = windows.numel()
    return n / min(ours), n / min(dense)


def multi_saes() -> list:
    """An SAE on each layer of MULTI_HOOKS, random (seeded)."""
    from sae import SAEConfig, TopKSAE

    saes = []
    for i in range(len(MULTI_HOOKS)):
        torch.manual_seed(10 + i)
        saes.append(TopKSAE(SAEConfig(d_in=D, n_latents=LATENTS, k=SAE_K, normalize="layer_norm")).eval())
    return saes


def kernel_one_vs_many(teacher, repeats: int) -> tuple[float, float]:
    """Seconds per batch: the stores' probes in one attribute_many, and one attribute per store;
    interleaved, best of repeats."""
    from pipeline.attribution import Probe, attribute, attribute_many

    windows = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(1))
    probes = [Probe(sae, hook, "resid_post_mlp", K) for sae, hook in zip(multi_saes(), MULTI_HOOKS, strict=True)]
    one, separate = [], []
    for r in range(repeats + 1):  # the first round warms up (allocator, kernels)
        t0 = time.perf_counter()
        attribute_many(teacher, probes, windows)
        t1 = time.perf_counter()
        for p in probes:
            attribute(teacher, p.sae, p.layer, p.location, windows, k=K)
        if r:
            one.append(t1 - t0)
            separate.append(time.perf_counter() - t1)
    return min(one), min(separate)


def make_tokens(work: Path, n_tokens: int) -> Path:
    """A token store of random ids, one long document per split (a word-level tokenizer as its vocabulary)."""
    from tokenizers import Tokenizer, models

    from storage_schemas import TokenStoreWriter

    (work / "tok").mkdir()
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(str(work / "tok" / "tokenizer.json"))
    rng = np.random.default_rng(0)
    w = TokenStoreWriter(work / "tokens", dtype="uint16", eos_id=0, vocab_size=VOCAB, tokenizer_dir=work / "tok")
    w.add_document("train", rng.integers(1, VOCAB, n_tokens - 1))
    w.finish({"sources": ["random"]})
    return work / "tokens"


def ray_job(work: Path, workers: int) -> tuple[float, float]:
    """tokens/s of the whole job (actor start-up included), and of the units once workers are up
    (from each unit's recorded seconds, assuming the workers were kept equally busy)."""
    from pipeline.extract import ExtractConfig, run_extract
    from storage_schemas import LabelStore

    cfg = ExtractConfig(tokens=work / "tokens", teacher=str(work / "teacher"), sae=work / "sae", layer=HOOK,
                        out=work / f"labels{workers}", window=CONTEXT, workers=workers, batch_windows=BATCH,
                        chunk_windows=16, progress=False)
    s = run_extract(cfg)
    busy = sum(r["seconds"] for r in LabelStore.open(cfg.out).manifest["units"].values()) / workers
    return s["tokens"] / s["seconds"], s["tokens"] / busy


def multi_vs_separate(work: Path) -> dict[str, float]:
    """Seconds for N stores (an SAE on each layer of MULTI_HOOKS) written by one extraction, and by N
    extractions one after another (one worker each): wall time with actor start-up, and the labelling
    time from the unit records (one pass: each unit's last-written record; N runs: every record)."""
    from dataclasses import replace

    from pipeline.extract import ExtractConfig, run_extract, run_extracts
    from sae import save_sae
    from storage_schemas import LabelStore

    cfgs = []
    for sae, hook in zip(multi_saes(), MULTI_HOOKS, strict=True):
        save_sae(sae, work / f"sae{hook}")
        cfgs.append(ExtractConfig(tokens=work / "tokens", teacher=str(work / "teacher"), sae=work / f"sae{hook}",
                                  layer=hook, out=work / "multi" / f"layer{hook}", window=CONTEXT, batch_windows=BATCH,
                                  chunk_windows=16, progress=False))
    t0 = time.perf_counter()
    run_extracts(cfgs)
    one = time.perf_counter() - t0
    singles = [replace(cfg, out=work / "separate" / cfg.out.name) for cfg in cfgs]
    t0 = time.perf_counter()
    for cfg in singles:
        run_extract(cfg)
    separate = time.perf_counter() - t0
    units = [LabelStore.open(cfg.out).manifest["units"] for cfg in cfgs]
    one_busy = sum(max(u[key]["seconds"] for u in units) for key in units[0])
    separate_busy = sum(r["seconds"] for cfg in singles for r in LabelStore.open(cfg.out).manifest["units"].values())
    return {"one": one, "separate": separate, "one_busy": one_busy, "separate_busy": separate_busy}


def label_bytes(work: Path) -> dict[str, float]:
    """Bytes per token of ids + scores, raw (as written) and re-encoded with zstd."""
    from dataclasses import replace

    from storage_schemas import LabelStore, store_info

    raw = LabelStore.open(work / "labels1")
    zstd = LabelStore.create(work / "labels-zstd", replace(raw.spec, codec="zstd"),
                             {s: raw.num_rows(s) for s in raw.manifest["splits"]})
    for split in raw.manifest["splits"]:
        for unit, a, b in raw.units(split):
            arrays = {n: raw.array(split, n)[a:b] for n in raw.spec.arrays()}
            zstd.write_unit(split, unit, arrays, tokens=np.zeros(b - a), seconds=0)
    out = {}
    for name, path in (("raw", raw.path), ("zstd", zstd.path)):
        per = store_info(path)["bytes_per_token"]
        out[name] = per["ids"] + per["scores"]
    return out


def main(repeats: int = 5, job_tokens: int = 1 << 15) -> list[tuple[str, str, str, str]]:
    """Rows (name, value, unit, note) for `make bench`."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        from sae.hooks import load_teacher

        hf_teacher, sae = build(work)
        loaded = load_teacher(str(work / "teacher"))
        ours, dense = kernel_vs_dense(loaded, hf_teacher, sae, repeats)
        kernel_one, kernel_separate = kernel_one_vs_many(loaded, repeats)
        make_tokens(work, job_tokens)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        try:
            job = {w: ray_job(work, w) for w in (1, 2)}
            multi = multi_vs_separate(work)
        finally:
            ray.shutdown()
        size = label_bytes(work)
        n = len(MULTI_HOOKS)
        shape = f"{LAYERS} layers d {D}, hook after block {HOOK}, vocab {VOCAB}, {LATENTS} latents k {SAE_K}"
        return [
            ("kernel (grad on h only, sparse gather)", f"{ours:,.0f}", "tokens/s", f"{shape}; {BATCH}x{CONTEXT} tokens"),
            ("dense reference (full backward, dense product)", f"{dense:,.0f}", "tokens/s", "the paper's computation"),
            ("ratio kernel / dense", f"{ours / dense:.2f}", "x",
             f"target >= {TARGET}; FLOP-count prediction {predicted_ratio():.2f}x; best of {repeats}"),
            *[(f"Ray job, {w} worker{'s' * (w > 1)}", f"{job[w][0]:,.0f}", "tokens/s",
               f"{job_tokens:,} tokens, {os.cpu_count()} CPUs shared; wall time incl. actor start-up; "
               f"{job[w][1]:,.0f} tokens/s once running") for w in job],
            (f"kernel, {n} stores in one pass", f"{BATCH * CONTEXT / kernel_one:,.0f}", "tokens/s",
             f"attribute_many, SAEs on layers {', '.join(map(str, MULTI_HOOKS))}; {BATCH}x{CONTEXT} tokens"),
            (f"kernel, {n} stores one at a time", f"{BATCH * CONTEXT / kernel_separate:,.0f}", "tokens/s",
             f"{n} attribute calls"),
            (f"ratio {n} passes / one", f"{kernel_separate / kernel_one:.2f}", "x",
             f"FLOP-count prediction {predicted_multi_ratio():.2f}x; best of {repeats}, interleaved"),
            (f"{n} stores, one extraction (one teacher pass)", f"{multi['one']:.1f}", "s",
             f"SAEs on layers {', '.join(map(str, MULTI_HOOKS))}; {job_tokens:,} tokens each; 1 worker; wall time "
             f"incl. actor start-up; {multi['one_busy']:.1f}s labelling"),
            (f"{n} stores, {n} extractions", f"{multi['separate']:.1f}", "s",
             f"one after another; {multi['separate_busy']:.1f}s labelling"),
            (f"ratio {n} extractions / one", f"{multi['separate'] / multi['one']:.2f}", "x",
             f"wall; {multi['separate_busy'] / multi['one_busy']:.2f}x labelling; FLOP-count prediction "
             f"{predicted_multi_ratio():.2f}x"),
            ("labels ids+scores, raw", f"{size['raw']:.2f}", "bytes/token", f"k={K}: uint16 ids + float16 scores"),
            ("labels ids+scores, zstd", f"{size['zstd']:.2f}", "bytes/token", "Blosc-zstd, bit-shuffle"),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
