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

Several label sets from one teacher pass (`attribute_many`, one Probe per label set: an SAE at a
hook, k, selection): h is captured at every hook the probes name, the loss computed once, and one
torch.autograd.grad(loss, [h_1, ..., h_m]) gives every g; then steps 4-6 run per probe. `attribute`
is the one-probe case.

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

from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae import TopKSAE, splice

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


def teacher_grads(teacher: nn.Module, hooks: list[tuple[int, str]], windows: Tensor,
                  ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """h (B, W, d) and g = d(sum CE)/dh (B, W, d) at each (layer, location) of hooks, and the logits
    (B, W, V), from one teacher forward and one torch.autograd.grad over every captured h."""
    seen: list[Tensor | None] = [None] * len(hooks)
    with torch.enable_grad(), autocast_for(windows.device), ExitStack() as stack:
        for i, (layer, location) in enumerate(hooks):
            stack.enter_context(splice(teacher, layer, location, partial(_take, seen, i)))
        logits = teacher(input_ids=windows, use_cache=False).logits  # (B, W, V)
        # the last position has no target: ignored, rather than sliced off (a copy of the logits)
        targets = torch.cat([windows[:, 1:], windows.new_full((windows.shape[0], 1), -100)], dim=1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    grads = torch.autograd.grad(loss, seen)
    return [h.detach() for h in seen], list(grads), logits.detach()


def _take(seen: list, i: int, h: Tensor) -> Tensor:
    """Record hook i's hidden state as a tensor autograd can differentiate the loss by.

    A hook whose h needs no gradient (the first the forward reaches, the teacher being frozen) gets a
    fresh leaf, as sae.capture makes it, so there is no backward below it. A hook downstream of such a
    leaf gets a clone instead: a fresh leaf there would cut the graph, and the lower hook would get no
    gradient through the blocks above. The clone has the same values, passes the lower gradient
    through unchanged, and receives its own gradient exactly as the leaf of a one-hook pass would.
    """
    seen[i] = h.clone() if h.requires_grad else h.detach().requires_grad_(True)
    return seen[i]


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


class Probe(NamedTuple):
    """One label set read from a teacher pass: an SAE at a hook, and which labels of it to keep."""

    sae: TopKSAE
    layer: int
    """Teacher block the SAE reads (0-based)."""
    location: str
    """Hook location in the block (sae.LOCATIONS) or a raw module path."""
    k: int = 4
    """Labels per token (at most the SAE's k)."""
    selection: Selection = "signed"
    """Which key picks the k labels among the active latents (module docstring)."""
    sae_k: int | None = None
    """Also return the SAE's own top-sae_k code."""
    teacher_k: int | None = None
    """Also return the teacher's top-teacher_k next-token log-probs, from the same forward."""


@torch.no_grad()
def attribute(teacher: nn.Module, sae: TopKSAE, layer: int, location: str, windows: Tensor, k: int = 4,
              sae_k: int | None = None, teacher_k: int | None = None, selection: Selection = "signed") -> Labels:
    """Concept labels for a batch of windows (B, W) of token ids on the teacher's device (one Probe)."""
    return attribute_many(teacher, [Probe(sae, layer, location, k, selection, sae_k, teacher_k)], windows)[0]


@torch.no_grad()
def attribute_many(teacher: nn.Module, probes: Sequence[Probe], windows: Tensor) -> list[Labels]:
    """The labels of every probe for windows (B, W), from one teacher forward and one backward.

    Each equals `attribute` run for that probe alone: the same ids and the same scores, bit for bit,
    unless a hook at resid_post_attn lies above another hook (sae's splice there adds a +g - g pair to
    the gradient below it, which may round differently). Probes on one hook share h and g; probes of
    one SAE on one hook (other k or selection) also share its code and attributions.
    """
    for p in probes:
        if p.k > p.sae.cfg.k:
            raise ValueError(f"k={p.k} labels cannot exceed the SAE's {p.sae.cfg.k} active latents")
        if p.selection not in SELECTIONS:
            raise ValueError(f"selection={p.selection!r}: choose one of {', '.join(SELECTIONS)}")
    hooks = list(dict.fromkeys((p.layer, p.location) for p in probes))  # each hook once, first seen first
    hs, gs, logits = teacher_grads(teacher, hooks, windows)
    codes, tops, out = {}, {}, []
    for p in probes:
        hook, enc_k = hooks.index((p.layer, p.location)), max(p.sae.cfg.k, p.sae_k or 0)
        key = (id(p.sae), hook, enc_k)
        if key not in codes:
            codes[key] = sae_code(p.sae, hs[hook], gs[hook], enc_k)
        labels = _labels(p, *codes[key], windows)
        if p.teacher_k:
            if p.teacher_k not in tops:
                tops[p.teacher_k] = logits.float().log_softmax(-1).topk(p.teacher_k, dim=-1)  # (B, W, teacher_k)
            labels = labels._replace(teacher_ids=tops[p.teacher_k][1], teacher_logprobs=tops[p.teacher_k][0])
        out.append(labels)
    return out


def sae_code(sae: TopKSAE, h: Tensor, g: Tensor, enc_k: int):
    """The SAE's top-enc_k code of h (B, W, d), and s (N, k_sae) for its own k_sae active latents."""
    d = h.shape[-1]
    h, g = h.reshape(-1, d).to(sae.W_dec.dtype), g.reshape(-1, d).to(sae.W_dec.dtype)  # (N, d)
    # One encode serves both the labels (the SAE's k latents) and the stored code: topk is sorted,
    # so the first k_sae of a larger top-k are the SAE's own top-k_sae.
    enc = sae.encode(h, k=enc_k)
    k_sae = sae.cfg.k
    return enc, active_attribution(sae.W_dec, enc.indices[:, :k_sae], enc.values[:, :k_sae], g)  # (N, k_sae)


def _labels(p: Probe, enc, s: Tensor, windows: Tensor) -> Labels:
    """The probe's k labels (and the SAE code it asks for) from the SAE's code and attributions s."""
    (B, W), k_sae, k = windows.shape, p.sae.cfg.k, p.k
    idx, val = enc.indices[:, :k_sae], enc.values[:, :k_sae]  # (N, k_sae)
    ids, scores = select(idx, val, s, k, p.selection)  # (N, k), best first
    enough = (val > 0).sum(-1) >= k  # (N,)
    valid = enough.reshape(B, W) & (torch.arange(W, device=windows.device) < W - 1)
    out = Labels(ids.reshape(B, W, k), scores.float().reshape(B, W, k), valid)
    if p.sae_k:
        out = out._replace(sae_ids=enc.indices[:, :p.sae_k].reshape(B, W, p.sae_k),
                           sae_vals=enc.values[:, :p.sae_k].float().reshape(B, W, p.sae_k))
    return out
