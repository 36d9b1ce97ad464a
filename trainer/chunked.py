"""Bounded memory for the wide heads: the concept head (C = 32,768 in the paper) and the LM head
(V = 50,257) with their losses, computed a chunk of tokens at a time (issue #14).

At 16 x 1024 tokens one (tokens, V) tensor is 3.3 GB in fp32, and the losses make several (the
log-softmax, its gradient, the KD buckets' masked copy); the concept head adds the same at C. Chunking
the arithmetic alone would not bound that, since autograd would keep every chunk's logits for backward.
So each chunk runs under torch.utils.checkpoint: backward keeps the chunk's slice of the hidden state
(a view of a tensor kept anyway) and its small outputs, and recomputes the wide tensors of one chunk at
a time. The cost is one more forward of the heads.

The model takes this path only in training (targets and labels given) and only when tokens x width
exceeds the budget; below it, it runs its unchunked code op for op (bit-identical loss and gradients),
which is what the demo's and the study's shapes do (16 x 256 tokens at V 8192, C 3072).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trainer.losses import concept_ce, concept_mask, kd_positions, kd_terms

CHUNK_ELEMENTS = 2**26
"""Elements of one chunk's (tokens, width) tensor: 256 MiB in fp32, 1335 tokens at V 50,257 and 2048 at
C 32,768. Chunks that size still keep a GPU's matmuls large, and the demo and study shapes (4096 tokens x
8192 = 2**25) stay below it, on the unchunked path."""


def one_chunk(n_tokens: int, width: int, budget: int = CHUNK_ELEMENTS) -> bool:
    """True when a (n_tokens, width) tensor fits the budget: the caller runs its unchunked code."""
    return n_tokens * width <= budget


def checkpointed(fn: Callable, width: int, budget: int, *tensors: Tensor | None) -> list:
    """[fn(*chunk) for each chunk of rows of `tensors`], each under checkpoint so that backward keeps only
    the chunk's inputs. budget // width rows per chunk (the last may be shorter); None passes through."""
    n, step = tensors[0].shape[0], max(1, budget // width)
    return [checkpoint(fn, *(None if t is None else t[a:a + step] for t in tensors), use_reentrant=False)
            for a in range(0, n, step)]


def concepts(mixer: nn.Module, h: Tensor, steer, ids: Tensor, mask: Tensor | None,
             budget: int = CHUNK_ELEMENTS) -> tuple[Tensor | None, Tensor]:
    """ConceptMixer's logits, TopK and compression with concept_loss, a chunk of tokens at a time.

    h (B, T, d), ids (B, T, k), mask (B, T, k) or (B, T) or None -> the compressed vectors c (B, T, d)
    (None without mixing) and the concept loss. The (tokens, C) logits never exist whole."""
    B, T, d = h.shape
    mask = concept_mask(ids, mask)

    def chunk(h, ids, mask):  # (n, d), (n, k), (n, k)
        z, mu, std = mixer.logits(h)  # (n, C)
        ce = concept_ce(z, ids, mask).sum()
        if not mixer.mix:
            return ce, None
        return ce, mixer.compressed(steer.apply(z) if steer is not None else z, mu, std)  # (n, d)

    outs = checkpointed(chunk, mixer.head.out_features, budget, h.flatten(0, 1), ids.flatten(0, 1),
                        mask.flatten(0, 1))
    loss = torch.stack([ce for ce, _ in outs]).sum() / mask.sum().clamp(min=1)
    c = torch.cat([c for _, c in outs]).view(B, T, d) if mixer.mix else None
    return c, loss


def head_losses(ln_f: nn.Module, lm_head: nn.Linear, h: Tensor, targets: Tensor, teacher_ids: Tensor | None,
                teacher_logprobs: Tensor | None, temperature: float = 1.0,
                budget: int = CHUNK_ELEMENTS) -> tuple[Tensor, Tensor | None]:
    """ntp_loss and (with teacher_ids) kd_loss of lm_head(ln_f(h)), a chunk of tokens at a time.

    h (B, T, d), targets (B, T), teacher_* (B, T, K) or None -> (NTP CE, T^2 * KL or None), the same
    means as ntp_loss and kd_loss. The (tokens, V) logits never exist whole."""

    def chunk(h, targets, t_ids, t_lp):  # (n, d), (n,), (n, K), (n, K)
        logits = lm_head(ln_f(h))  # (n, V)
        ce = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")
        if t_ids is None:
            return ce, None
        kl, _ = kd_terms(logits[None], t_ids[None], t_lp[None], targets[None], temperature)  # (1, n)
        return ce, kl.sum()

    flat = (t if t is None else t.flatten(0, 1) for t in (h, targets, teacher_ids, teacher_logprobs))
    outs = checkpointed(chunk, lm_head.out_features, budget, *flat)
    ntp = torch.stack([ce for ce, _ in outs]).sum() / (targets != -1).sum()  # 0/0 = nan, as ntp_loss
    if teacher_ids is None:
        return ntp, None
    kl = torch.stack([kl for _, kl in outs]).sum()
    return ntp, temperature**2 * kl / kd_positions(teacher_ids, targets).sum().clamp(min=1)
