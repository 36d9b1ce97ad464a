"""Training throughput, side by side in one run on the same tiny config:

- `ntp`: the student without concepts;
- `cocomix offline`: the CoCoMix student fed memory-mapped labels from a label store (this project);
- `cocomix online`: what the paper's code does every step: a teacher GPT-2 (transformers) forward and
  full backward, a TopK SAE on the output of block 5, dense attribution latents * (grad @ W_dec.T) and
  top-k to make the labels, then the same student step.

Sizes are the paper's proportions scaled down: teacher 12 layers with the SAE after block 5 and
latents = 43 x d_model (GPT-2 124M: 768 -> 32768), student 8 layers with concepts before block 3, and
teacher : student parameters about 1.8 (124M : 69M). Target: offline >= 1.8x online; the FLOP-count
prediction is printed beside the measured ratio.

Also: label-loader throughput (trainer.data.WindowReader over a raw label store) against bare
`np.memmap` slices of the same chunk files, on the same random windows. Target >= 0.5x.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V, W, B = 2048, 128, 8  # vocab, window, windows per step
TEACHER = dict(n_layer=12, n_embd=128, n_head=4, hook_block=5)
STUDENT = dict(n_layer=8, n_embd=72, n_head=6, insert_layer=3)
C, K_SAE, K_LABELS = 43 * TEACHER["n_embd"], 32, 4
TARGET_SPEEDUP, TARGET_LOADER = 1.8, 0.5


def make_stores(root: Path, n_windows: int = 512):
    """A token store of random ids and a raw label store of random labels on the W grid."""
    from tokenizers import Tokenizer, models

    from storage_schemas import LabelSpec, LabelStore, TokenStore, TokenStoreWriter

    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")).save(str(tok_dir / "tokenizer.json"))
    rng = np.random.default_rng(0)
    w = TokenStoreWriter(root / "tokens", dtype="uint16", eos_id=0, vocab_size=V, tokenizer_dir=tok_dir)
    for split, n in (("train", n_windows * W), ("val", 4 * W)):
        w.add_document(split, rng.integers(1, V, n - 1))
    w.finish({"sources": ["random"]})
    ts = TokenStore.open(root / "tokens")
    spec = LabelSpec(token_fingerprint=ts.fingerprint, window=W, k=K_LABELS, n_latents=C)
    ls = LabelStore.create(root / "labels", spec, {s: ts.num_tokens(s) for s in ts.splits})
    for split in ts.splits:
        for unit, a, b in ls.units(split):
            n = b - a
            arrays = {"ids": rng.integers(0, C, (n, K_LABELS)), "valid": rng.random(n) > 0.1,
                      "scores": np.abs(rng.standard_normal((n, K_LABELS))).astype(np.float16)}
            ls.write_unit(split, unit, arrays, ts.tokens(split)[a:b], seconds=0.0)
    return ts, LabelStore.open(root / "labels")


def students():
    import torch

    from trainer.config import TrainConfig
    from trainer.model import GPT
    from trainer.train import make_optimizer

    out = {}
    for mode in ("ntp", "cocomix"):
        cfg = TrainConfig(mode=mode, vocab_size=V, block_size=W, n_concepts=C, k_concept=32, batch_size=B,
                          **STUDENT)
        torch.manual_seed(0)
        model = GPT(cfg.model_config())
        out[mode] = (model, make_optimizer(model, cfg, torch.device("cpu")))
    return out


def student_step(model, opt, batch: dict) -> None:
    import torch

    o = model(batch["idx"], batch["targets"], concept_ids=batch.get("concept_ids"),
              concept_mask=batch.get("concept_mask"))
    o.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


class OnlineTeacher:
    """The paper's per-step labelling: teacher forward + full backward, dense SAE and attribution."""

    def __init__(self):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        t = TEACHER
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=W, n_embd=t["n_embd"],
                                                n_layer=t["n_layer"], n_head=t["n_head"], bos_token_id=0,
                                                eos_token_id=0))
        g = torch.Generator().manual_seed(0)
        d = t["n_embd"]
        self.W_enc = torch.randn(d, C, generator=g) / d**0.5  # a TopK SAE (random weights: cost, not quality)
        self.W_dec = torch.randn(C, d, generator=g) / d**0.5
        self.b_pre, self.b_lat = torch.zeros(d), torch.zeros(C)

    def labels(self, idx, targets):
        import torch
        import torch.nn.functional as F

        h = {}
        hook = self.model.transformer.h[TEACHER["hook_block"]].register_forward_hook(
            lambda m, i, o: h.setdefault("h", o[0] if isinstance(o, tuple) else o))
        try:
            logits = self.model(idx).logits
        finally:
            hook.remove()
        h["h"].retain_grad()
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").backward()
        self.model.zero_grad(set_to_none=True)
        x = h["h"].detach()
        x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
        pre = (x - self.b_pre) @ self.W_enc + self.b_lat  # (B, T, C)
        vals, ids = pre.topk(K_SAE, dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, ids, vals.relu())  # dense, as the paper's code
        scores = latents * (h["h"].grad @ self.W_dec.T)  # (B, T, C) dense attribution
        s, concept_ids = scores.topk(K_LABELS, dim=-1)
        return concept_ids, s > 0


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt_train_flops(n_layer, d, vocab, T, tokens, doubled_from=None, concepts=0) -> float:
    """6 x (matmul params) per token plus attention (Kaplan et al.); CoCoMix blocks after the insert
    layer run on 2T positions, and its concept head is a d x C matmul."""
    per_block = 24 * d * d + 4 * T * d  # qkv/proj/mlp matmuls + QK^T and AV (forward, per token)
    fwd = n_layer * per_block + 2 * d * vocab
    if doubled_from is not None:
        fwd += (n_layer - doubled_from) * (24 * d * d + 8 * T * d)  # the concept slots: 2T positions
        fwd += 2 * d * concepts
    return 3 * fwd * tokens


def flop_prediction(student) -> float:
    t, s, tokens = TEACHER, STUDENT, B * W
    off = gpt_train_flops(s["n_layer"], s["n_embd"], V, W, tokens, s["insert_layer"], C)
    teacher = gpt_train_flops(t["n_layer"], t["n_embd"], V, W, tokens)  # forward + full backward
    sae = 2 * 2 * t["n_embd"] * C * tokens  # dense encoder + grad @ W_dec.T
    return (off + teacher + sae) / off


def time_steps(variants: dict, rounds: int, steps: int) -> dict[str, float]:
    """Seconds per step of each variant, interleaved round by round so all see the same machine load."""
    spent = dict.fromkeys(variants, 0.0)
    for r in range(rounds + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            if r:  # round 0 warms up
                spent[name] += time.perf_counter() - t0
    return {k: v / (rounds * steps) for k, v in spent.items()}


def training_rows(ts, ls) -> list[tuple]:
    import torch

    from trainer.data import WindowData, WindowOrder, to_device

    order = WindowOrder(ts.num_windows("train", W), seed=0)
    data = {"ntp": WindowData(ts, "train", W), "cocomix": WindowData(ts, "train", W, ls, "cocomix")}
    models, teacher, pos = students(), OnlineTeacher(), [0]

    def batch(kind):
        pos[0] += B
        return to_device(data[kind].batch(order.take(pos[0], B)), torch.device("cpu"))

    def online():
        b = batch("ntp")
        b["concept_ids"], b["concept_mask"] = teacher.labels(b["idx"], b["targets"])
        student_step(*models["cocomix"], b)

    per_step = time_steps({"ntp": lambda: student_step(*models["ntp"], batch("ntp")),
                           "offline": lambda: student_step(*models["cocomix"], batch("cocomix")),
                           "online": online}, rounds=3, steps=2)
    tok = B * W
    ratio, predicted = per_step["online"] / per_step["offline"], flop_prediction(models["cocomix"][0])
    p_t, p_s = params(teacher.model), params(models["cocomix"][0])
    size = (f"teacher 12L d128 {p_t / 1e6:.2f}M, student 8L d72 {p_s / 1e6:.2f}M (x{p_t / p_s:.2f}), "
            f"C={C}, {B}x{W} tokens/step, {torch.get_num_threads()} thread(s)")
    return [("ntp", f"{tok / per_step['ntp']:,.0f}", "tokens/s", "student without concepts"),
            ("cocomix offline (memmapped labels)", f"{tok / per_step['offline']:,.0f}", "tokens/s", size),
            ("cocomix online (teacher in the step)", f"{tok / per_step['online']:,.0f}", "tokens/s",
             "teacher fwd + full bwd, dense SAE attribution, top-4"),
            ("speedup offline / online", f"{ratio:.2f}", "x",
             f"target >= {TARGET_SPEEDUP}; FLOP-count prediction {predicted:.2f}x")]


def loader_rows(ls, repeats: int = 200) -> list[tuple]:
    """WindowReader (what the trainer uses) against bare memmap slices of the same chunk files."""
    from storage_schemas.io import chunk_file
    from trainer.data import WindowReader

    names = ("ids", "scores", "valid")
    readers = {n: WindowReader(ls.array("train", n), W) for n in names}
    rows, per_chunk = ls.spec.chunk_rows, ls.spec.chunk_windows
    bare = {}
    for n in names:
        dtype, row_shape = ls.spec.arrays()[n]
        bare[n] = [np.memmap(chunk_file(ls.path / "train" / n, u, 1 + len(row_shape)), dtype=dtype, mode="r",
                             shape=(rows, *row_shape)) for u, _, _ in ls.units("train")]
    n_windows = ls.num_rows("train") // W
    batches = [np.random.default_rng(i).choice(n_windows, 32, replace=False) for i in range(repeats)]

    def ours():
        for w in batches:
            for n in names:
                readers[n](w)

    def plain():
        for w in batches:
            for n in names:
                np.stack([bare[n][c][i * W : (i + 1) * W] for c, i in zip(*np.divmod(w, per_chunk), strict=True)])

    t = time_steps({"ours": ours, "bare": plain}, rounds=3, steps=1)
    nbytes = sum(readers[n](batches[0]).nbytes for n in names) * repeats
    ratio = t["bare"] / t["ours"]
    return [("label loader (WindowReader)", f"{nbytes / t['ours'] / 1e6:,.0f}", "MB/s",
             f"ids+scores+valid, 32 random windows of {W} per batch, raw store"),
            ("bare np.memmap slices", f"{nbytes / t['bare'] / 1e6:,.0f}", "MB/s", "same chunk files and windows"),
            ("ratio loader / bare", f"{ratio:.2f}", "x", f"target >= {TARGET_LOADER}")]


def main(threads: int = 1) -> list[tuple]:
    """Rows (name, value, unit, note) for `make bench`. One thread by default: on a shared 2-core machine
    two threads per process oversubscribe the cores and run ~10x slower and noisier; the targets are
    ratios, which one thread measures steadily."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        ts, ls = make_stores(root)
        return training_rows(ts, ls) + loader_rows(ls)
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for row in main():
        print(" | ".join(map(str, row)))
