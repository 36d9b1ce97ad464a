"""Validation loss and perplexity: during training (`eval_loss`) and of a saved checkpoint (`evaluate`).

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

from storage_schemas import TokenStore, UserError
from trainer.checkpoint import load_model, resolve
from trainer.data import WindowData, to_device


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: WindowData, windows: np.ndarray, batch_size: int,
              device: torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and the number of predicted tokens over `windows`, as device tensors
    (no host sync here; under DDP the caller passes each rank its share and all-reduces)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for a in range(0, len(windows), batch_size):
        b = to_device(data.batch(windows[a : a + batch_size]), device)
        with autocast():
            out = model(b["idx"], b["targets"])
        n = (b["targets"] != -1).sum()
        total += out.ntp_loss.double() * n
        count += n
    model.train(was_training)
    return total, count


def val_loss(model: torch.nn.Module, data: WindowData, n_windows: int, batch_size: int,
             device: torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Mean val loss over the first n_windows windows (the same every eval), shared among DDP ranks."""
    windows = np.arange(min(n_windows, data.n_windows))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total, count = eval_loss(model, data, windows[rank::world], batch_size, device, autocast)
    if world > 1:
        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    return total / count.clamp(min=1)


def evaluate(checkpoint: Path, tokens: Path, split: str = "val", max_windows: int | None = None,
             batch_size: int = 8, device: str = "cpu") -> dict:
    """Val loss and perplexity of a checkpoint (or a run folder's latest) on a token store's split."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available: use --device cpu")
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
    data = WindowData(ts, split, W)
    n = data.n_windows if max_windows is None else min(max_windows, data.n_windows)
    if n < 1:
        raise UserError(f"split {split} of {tokens} has {data.n_tokens} tokens, fewer than one window of {W}")
    total, count = eval_loss(model.to(dev), data, np.arange(n), batch_size, dev)
    loss = (total / count).item()
    return {"checkpoint": str(ckpt), "tokens": str(tokens), "split": split, "windows": n,
            "predicted_tokens": int(count.item()), "loss": loss, "ppl": math.exp(loss)}
