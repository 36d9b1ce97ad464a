"""SAE quality on validation windows: FVU, mean L0, dead fraction, and the teacher's loss increase.

The loss increase is the standard figure of merit for an SAE in a language model: the teacher's
mean next-token cross-entropy with the SAE's reconstruction spliced in at the hook, minus the clean
loss. Zero ablation (the hidden state replaced by zeros) is reported beside it for scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storage_schemas import TokenStore

from .hooks import capture, splice
from .model import TopKSAE


@dataclass
class _Sums:
    """Running float64 sums, so the FVU is pooled over all eval tokens (one global mean)."""

    n: int = 0
    x: Tensor | None = None
    x2: Tensor | None = None
    err2: float = 0.0
    l0: float = 0.0
    fired: Tensor | None = None

    def add_hidden(self, h: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor, n_latents: int) -> None:
        h, x_hat = h.double(), x_hat.double()
        if self.x is None:
            self.x, self.x2 = torch.zeros_like(h[0]), torch.zeros_like(h[0])
            self.fired = torch.zeros(n_latents, dtype=torch.bool, device=h.device)
        self.n += len(h)
        self.x += h.sum(0)
        self.x2 += h.pow(2).sum(0)
        self.err2 += float((h - x_hat).pow(2).sum())
        self.l0 += float((values > 0).sum())
        self.fired[indices[values > 0]] = True


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy over a batch of windows: logits (B, T, V), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, teacher: nn.Module, store: TokenStore, *, layer: int, location: str,
                 split: str = "val", window: int = 256, max_windows: int = 64, batch_windows: int = 8) -> dict:
    """Metrics over the first `max_windows` grid windows of `split` (deterministic, no sampling)."""
    device = sae.device
    n_windows = min(max_windows, store.num_windows(split, window))
    sums, losses = _Sums(), {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    reconstruct = lambda h: sae.decode(sae.encode(h.float())).to(h.dtype)  # noqa: E731
    for start in range(0, n_windows, batch_windows):
        ids = torch.from_numpy(store.tokens(split)[start * window:min(n_windows, start + batch_windows) * window]
                               .astype("int64")).to(device).view(-1, window)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with capture(teacher, layer, location) as cap:
                losses["clean"] += float(next_token_loss(teacher(input_ids=ids).logits, ids))
            h = cap.value.reshape(-1, cap.value.shape[-1]).float()
            enc = sae.encode(h)
            sums.add_hidden(h, sae.decode(enc), enc.values, enc.indices, sae.cfg.n_latents)
            with splice(teacher, layer, location, reconstruct):
                losses["spliced"] += float(next_token_loss(teacher(input_ids=ids).logits, ids))
            with splice(teacher, layer, location, torch.zeros_like):
                losses["zero"] += float(next_token_loss(teacher(input_ids=ids).logits, ids))
    return _summary(sums, losses, n_windows * (window - 1), sae.cfg.n_latents)


def _summary(s: _Sums, losses: dict, n_targets: int, n_latents: int) -> dict:
    total_var = float((s.x2 - s.x.pow(2) / s.n).sum())  # sum over tokens of |h - mean|^2
    loss = {k: v / n_targets for k, v in losses.items()}
    return {
        "tokens": s.n,
        "fvu": s.err2 / total_var,
        "l0": s.l0 / s.n,
        "dead_fraction": 1.0 - float(s.fired.sum()) / n_latents,
        "loss_clean": loss["clean"],
        "loss_spliced": loss["spliced"],
        "loss_increase": loss["spliced"] - loss["clean"],
        "loss_zero_ablation": loss["zero"],
    }
