"""Validation loss and perplexity: during training (`val_loss`) and of a saved checkpoint (`evaluate`),
over all evaluated tokens and per source of the corpus (its domains, e.g. Austen and the Python docs).

The loss is the next-token cross-entropy on windows of the extraction grid, averaged over every
predicted token (the split's very last token has no target). In cocomix mode the student predicts
and mixes its own concepts, so evaluation needs no labels; it is the same number for every mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from storage_schemas import TokenStore, UserError
from trainer.checkpoint import load_model, resolve
from trainer.data import WindowData, to_device


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: WindowData, windows: np.ndarray, batch_size: int,
              device: torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and predicted-token counts over `windows`, as (1 + S,) float64 device
    tensors: entry 0 over every token, entry 1 + s over the tokens of source s of the corpus (S = 0
    when `data` does not know sources). No host sync here; under DDP the caller all-reduces."""
    was_training = model.training
    model.eval()
    n_src = len(data.source_names)
    total = torch.zeros(1 + n_src, device=device, dtype=torch.float64)
    count = torch.zeros(1 + n_src, device=device, dtype=torch.float64)
    for a in range(0, len(windows), batch_size):
        b = to_device(data.batch(windows[a : a + batch_size]), device)
        with autocast():
            logits = model(b["idx"]).logits  # labels are not needed: every mode predicts from its own state
        ce = F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].flatten(), ignore_index=-1,
                             reduction="none").double()  # (B*T,), 0 where ignored
        kept = (b["targets"] != -1).flatten().double()
        total[0] += ce.sum()
        count[0] += kept.sum()
        if n_src:
            src = b["target_sources"].flatten()
            total[1:] += torch.zeros(n_src, device=device, dtype=torch.float64).index_add_(0, src, ce)
            count[1:] += torch.zeros(n_src, device=device, dtype=torch.float64).index_add_(0, src, kept)
    model.train(was_training)
    return total, count


def eval_windows(n_windows: int, wanted: int) -> np.ndarray:
    """`wanted` window ids spread evenly over the split (all of them when wanted >= n_windows), so that a
    partial eval covers every part of the corpus (e.g. both domains of the demo), the same every time."""
    if wanted >= n_windows:
        return np.arange(n_windows)
    return np.unique(np.linspace(0, n_windows - 1, wanted).round().astype(np.int64))


def val_loss(model: torch.nn.Module, data: WindowData, n_windows: int, batch_size: int,
             device: torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Mean val loss (1 + S,): over all evaluated tokens, then per source (see eval_loss; NaN for a source
    with no evaluated token), on n_windows windows spread over the split (the same every eval), shared
    among DDP ranks."""
    windows = eval_windows(data.n_windows, n_windows)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total, count = eval_loss(model, data, windows[rank::world], batch_size, device, autocast)
    if world > 1:
        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def torch_device(name: str, option: str = "--device", use_cpu: str = "--device cpu") -> torch.device:
    """A user's device name -> torch.device; a name torch does not know, or CUDA where there is none, is one
    line naming the option (`option`) and what to pass instead (`use_cpu`)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option} {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} cuda but no CUDA device is available: use {use_cpu}")
    return dev


def evaluate(checkpoint: Path, tokens: Path, split: str = "val", max_windows: int | None = None,
             batch_size: int = 8, device: str = "cpu") -> dict:
    """Val loss and perplexity of a checkpoint (or a run folder's latest) on a token store's split."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    dev = torch_device(device)
    ckpt = resolve(checkpoint)
    model, meta = load_model(ckpt)
    ts = TokenStore.open(tokens)
    want = meta.get("tokenizer_fingerprint")
    if want and ts.tokenizer_fingerprint != want:
        raise UserError(f"{tokens} uses tokenizer {ts.tokenizer_fingerprint[:12]}, but {ckpt} was trained "
                        f"with {want[:12]}: evaluate on a token store made with the same tokenizer")
    if ts.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{tokens} has a vocabulary of {ts.vocab_size}, the model {model.cfg.vocab_size}")
    W = model.cfg.block_size
    data = WindowData(ts, split, W, by_source=True)
    n = data.n_windows if max_windows is None else min(max_windows, data.n_windows)
    if n < 1:
        raise UserError(f"split {split} of {tokens} has {data.n_tokens} tokens, fewer than one window of {W}")
    total, count = eval_loss(model.to(dev), data, eval_windows(data.n_windows, n), batch_size, dev)
    losses = (total / count.clamp(min=1)).tolist()
    return {"checkpoint": str(ckpt), "tokens": str(tokens), "split": split, "windows": n,
            "predicted_tokens": int(count[0].item()), "loss": losses[0], "ppl": math.exp(losses[0]),
            "sources": source_losses(data.source_names, losses[1:], count[1:].tolist())}


def source_losses(names: list[str], losses: list[float], counts: list[float]) -> dict[str, float] | None:
    """{source name: loss} over the sources with evaluated tokens; None when the store has no sources."""
    if not names:
        return None
    return {n: v for n, v, c in zip(names, losses, counts, strict=True) if c > 0}
