"""The attribution kernel: a batch of token windows -> concept labels (DESIGN.md "Concept labels").

One pure function, `attribute`, testable without Ray:
    h     = hidden state at the SAE's (layer, location), captured as a fresh leaf        # (B, W, d)
    loss  = sum over positions 0..W-2 of next-token cross-entropy
    g     = d loss / d h  (torch.autograd.grad on h alone: no parameter gradients, and no backward
            through the blocks below the hook, because h is detached from them)
    a, j  = the SAE's top-k_sae active latents of h (layer-normalised first when the SAE says so)
    s_j   = a_j * <g, W_dec[j]>  for the active latents only (a gather of k_sae decoder rows per
            token, never a dense (tokens x latents) product)
    labels = the k active latents with the largest selection key, best first, and that key as their score:
        signed      s_j    the default, as the official code selects them
        negated     -s_j
        absolute    |s_j|
        activation  a_j    the SAE's own top-k (the gradient is computed and unused: one code path)

Since L is the loss, s_j > 0 means latent j's activation raises the teacher's loss to first order and
s_j < 0 that it lowers it. The stored score is the selection key, so the trainer's rule "train only on
slots whose score > 0" (concept_positive_only) keeps exactly the slots that have the selected property:
signed, the latent raises the loss; negated, it lowers the loss; absolute, the loss is sensitive to it
at all; activation, the latent is active. Scores are not clipped at 0: a slot whose score is <= 0 (fewer
than k active latents have that property there) is kept with its score, and the trainer decides
(DESIGN.md step 6). Ties between equal keys keep torch.topk's order, which is unspecified; with float
scores they happen only between latents whose decoder rows are equally aligned with g (or, for
activation, equal activations, in the SAE's own order).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae import TopKSAE, capture

SCORE_DEFINITION = "a_j*<dL/dh, W_dec_j> over the SAE's active latents; L = sum of next-token CE over positions 0..W-2"
Selection = Literal["signed", "negated", "absolute", "activation"]
SELECTIONS: tuple[Selection, ...] = ("signed", "negated", "absolute", "activation")
# What each selection stores as the score, for the label store's fingerprinted inputs. Signed keeps the
# string above alone (no "selection" entry), so that stores made before selections existed keep their
# fingerprint; the others name their key and what a positive score means.
SCORE_DEFINITIONS: dict[str, str] = {
    "signed": SCORE_DEFINITION,
    "negated": "-a_j*<dL/dh, W_dec_j> over the SAE's active latents, > 0 where latent j's activation lowers L to "
               "first order; L = sum of next-token CE over positions 0..W-2",
    "absolute": "|a_j*<dL/dh, W_dec_j>| over the SAE's active latents, > 0 where L is sensitive to latent j to "
                "first order; L = sum of next-token CE over positions 0..W-2",
    "activation": "a_j, the SAE's activation (its own top-k, no gradient), > 0 where latent j is active",
}
GATHER_ELEMENTS = 1 << 24  # rows of W_dec gathered per slice: (rows, k_sae, d) stays near 64 MiB in fp32


class Labels(NamedTuple):
    ids: Tensor
    """(B, W, k) int64 concept ids, largest selection key first."""
    scores: Tensor
    """(B, W, k) float32 the selection key, not clipped: s (signed), -s (negated), |s| (absolute) or a
    (activation), where s = a * <dL/dh, W_dec>; > 0 exactly where the slot has the selected property."""
    valid: Tensor
    """(B, W) bool: False at each window's last position and where fewer than k latents are active."""
    sae_ids: Tensor | None = None
    """(B, W, sae_k) int64 the SAE's own top-k code, largest activation first."""
    sae_vals: Tensor | None = None
    """(B, W, sae_k) float32 its activations."""
    teacher_ids: Tensor | None = None
    """(B, W, teacher_k) int64 the teacher's most likely next tokens."""
    teacher_logprobs: Tensor | None = None
    """(B, W, teacher_k) float32 their log-probabilities."""


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the paper's precision for the teacher), full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def teacher_grad(teacher: nn.Module, layer: int, location: str, windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h (B, W, d), g = d(sum CE)/dh (B, W, d) and the logits (B, W, V) of one teacher forward."""
    with torch.enable_grad(), autocast_for(windows.device), capture(teacher, layer, location, True) as cap:
        logits = teacher(input_ids=windows, use_cache=False).logits  # (B, W, V)
        # the last position has no target: ignored, rather than sliced off (a copy of the logits)
        targets = torch.cat([windows[:, 1:], windows.new_full((windows.shape[0], 1), -100)], dim=1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    (g,) = torch.autograd.grad(loss, cap.value)
    return cap.value.detach(), g, logits.detach()


def active_attribution(w_dec: Tensor, indices: Tensor, values: Tensor, g: Tensor) -> Tensor:
    """s (N, k_sae) = values * <g, W_dec[indices]>, gathering k_sae decoder rows per token.

    w_dec (n_latents, d); indices, values (N, k_sae); g (N, d). Sliced along N so that the gathered
    (rows, k_sae, d) block stays bounded however many tokens a batch holds.
    """
    n, k_sae = indices.shape
    step = max(1, GATHER_ELEMENTS // (k_sae * w_dec.shape[1]))
    # F.embedding is the same row gather as w_dec[indices], through a faster kernel on CPU
    dots = [torch.bmm(F.embedding(indices[i : i + step], w_dec), g[i : i + step, :, None])[..., 0]
            for i in range(0, n, step)]
    return values * torch.cat(dots)


def select(idx: Tensor, val: Tensor, s: Tensor, k: int, selection: Selection) -> tuple[Tensor, Tensor]:
    """ids and scores (N, k): the k of the active latents idx (N, k_sae) with the largest selection key.

    val: their activations, sorted largest first (the SAE's top-k); s: their attributions (N, k_sae).
    """
    if selection == "activation":  # already in the SAE's order: its own first k, ties as it broke them
        return idx[:, :k], val[:, :k]
    key = {"signed": s, "negated": -s, "absolute": s.abs()}[selection]
    scores, order = key.topk(k, dim=-1)
    return idx.gather(-1, order), scores


@torch.no_grad()
def attribute(teacher: nn.Module, sae: TopKSAE, layer: int, location: str, windows: Tensor, k: int = 4,
              sae_k: int | None = None, teacher_k: int | None = None, selection: Selection = "signed") -> Labels:
    """Concept labels for a batch of windows (B, W) of token ids on the teacher's device.

    k: labels per token (at most the SAE's k). sae_k: also return the SAE's own top-sae_k code.
    teacher_k: also return the teacher's top-teacher_k next-token log-probs, from the same forward.
    selection: which key picks the k labels among the active latents (module docstring).
    """
    k_sae = sae.cfg.k
    if k > k_sae:
        raise ValueError(f"k={k} labels cannot exceed the SAE's {k_sae} active latents")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: choose one of {', '.join(SELECTIONS)}")
    B, W = windows.shape
    h, g, logits = teacher_grad(teacher, layer, location, windows)
    d = h.shape[-1]
    h, g = h.reshape(-1, d).to(sae.W_dec.dtype), g.reshape(-1, d).to(sae.W_dec.dtype)  # (N, d)
    # One encode serves both the labels (the SAE's k latents) and the stored code: topk is sorted,
    # so the first k_sae of a larger top-k are the SAE's own top-k_sae.
    enc = sae.encode(h, k=max(k_sae, sae_k or 0))
    idx, val = enc.indices[:, :k_sae], enc.values[:, :k_sae]  # (N, k_sae)
    s = active_attribution(sae.W_dec, idx, val, g)  # (N, k_sae)
    ids, scores = select(idx, val, s, k, selection)  # (N, k), best first
    enough = (val > 0).sum(-1) >= k  # (N,)
    valid = enough.reshape(B, W) & (torch.arange(W, device=windows.device) < W - 1)
    out = Labels(ids.reshape(B, W, k), scores.float().reshape(B, W, k), valid)
    if sae_k:
        out = out._replace(sae_ids=enc.indices[:, :sae_k].reshape(B, W, sae_k),
                           sae_vals=enc.values[:, :sae_k].float().reshape(B, W, sae_k))
    if teacher_k:
        logp, tid = logits.float().log_softmax(-1).topk(teacher_k, dim=-1)  # (B, W, teacher_k)
        out = out._replace(teacher_ids=tid, teacher_logprobs=logp)
    return out
