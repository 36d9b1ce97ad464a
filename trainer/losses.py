"""Losses of the student: next-token CE, the CoCoMix concept CE, and top-K knowledge distillation.

Pure functions of tensors, so the tests can check each against a plain reference.
All reductions run in float32 (the inputs may be bf16 under autocast), as
`F.cross_entropy` does under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ntp_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy. logits (B, T, V), targets (B, T); targets == -1 are ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def concept_loss(z: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """CoCoMix concept loss: mean over the valid (position, label slot) pairs of CE(z, label).

    z (B, T, C) concept logits; ids (B, T, k) label concept ids; mask (B, T, k) or (B, T) bool,
    True where the slot (or the position) has a real label (None: all do). One pass over the
    C-way logits: one log-sum-exp per position and a gather of the k label logits, instead of k
    separate cross-entropies.
    With every slot valid this is the paper's mean over the k labels of the per-label mean CE.
    Masked slots contribute neither to the value nor to the gradient; their ids may be anything.
    """
    mask = concept_mask(ids, mask)
    return concept_ce(z, ids, mask).sum() / mask.sum().clamp(min=1)


def concept_mask(ids: Tensor, mask: Tensor | None) -> Tensor:
    """The (B, T, k) slot mask of concept_loss: None means every slot, a (B, T) mask every slot of a position."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if mask.dim() == ids.dim() - 1:  # one flag per position (B, T): applies to all k slots
        return mask[..., None].expand_as(ids)
    return mask


def concept_ce(z: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Per-slot CE of concept_loss, zero at masked slots: z (..., C), ids and mask (..., k) -> (..., k) float32.
    Apart so that a chunked caller can sum it chunk by chunk and divide once by the whole count."""
    safe_ids = torch.where(mask, ids, torch.zeros_like(ids))  # sentinels would be out of range
    lse = torch.logsumexp(z.float(), dim=-1, keepdim=True)  # (B, T, 1)
    picked = z.gather(-1, safe_ids).float()  # (B, T, k)
    return torch.where(mask, lse - picked, torch.zeros_like(picked))


def _log_rest_mass(log_probs: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """log of the probability mass outside `ids`, exactly: a log-sum-exp with the ids masked.

    log_probs (N, V) float32, normalised (a log_softmax), ids (N, K) -> (log mass (N, 1), empty
    (N, 1) bool). Masking with the dtype's minimum (not -inf) keeps value and gradient finite when
    the ids cover the vocabulary.
    """
    neg = torch.finfo(log_probs.dtype).min
    rest = torch.logsumexp(log_probs.scatter(-1, ids, neg), dim=-1, keepdim=True)
    return rest, rest < neg / 2  # empty: every token is among the ids


def kd_loss(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    targets: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """T^2 * KL(teacher || student) over the teacher's stored top-K, mean over the kept positions.

    logits (B, T, V) student; teacher_ids (B, T, K) int64; teacher_logprobs (B, T, K) the teacher's
    log-probabilities at temperature 1 (as stored); targets (B, T) or None.

    Tail mass, handled explicitly with K+1 buckets: the K stored ids, plus one "rest" bucket that
    holds the teacher mass 1 - sum(exp(top-K)) and the student's exact mass outside those ids
    (a log-sum-exp with the K ids masked). Temperature: the student's full logits are divided by
    T before the softmax; the teacher's stored log-probabilities are divided by T and renormalised
    over the K+1 buckets. That is exact when K == V (the rest bucket is empty) or T == 1; for T != 1
    and K < V the teacher's tail is tempered as if it were one token, since its shape is not stored.
    Positions are dropped where targets == -1 or any teacher id is negative (no teacher data).
    """
    kl, ok = kd_terms(logits, teacher_ids, teacher_logprobs, targets, temperature)
    return temperature**2 * kl.sum() / ok.sum().clamp(min=1)


def kd_positions(teacher_ids: Tensor, targets: Tensor | None) -> Tensor:
    """(B, T) bool: the positions kd_loss keeps (a target, and teacher data: no negative id)."""
    ok = (teacher_ids >= 0).all(-1)  # (B, T)
    return ok & (targets != -1) if targets is not None else ok


def kd_terms(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    targets: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """kd_loss before the mean: -> KL per position (B, T) float32, zero where dropped, and the kept (B, T).
    Apart so that a chunked caller can sum it chunk by chunk and divide once by the whole count."""
    B, T, V = logits.shape
    ok = kd_positions(teacher_ids, targets)
    ids = teacher_ids.clamp(min=0).flatten(0, 1)  # (N, K)
    t_lp = torch.where(ok[..., None], teacher_logprobs.float(), 0.0).flatten(0, 1)  # (N, K)
    s = logits.float().flatten(0, 1) / temperature  # (N, V)
    s_lp = torch.log_softmax(s, dim=-1)
    s_rest, empty = _log_rest_mass(s_lp, ids)
    s_buckets = torch.cat([s_lp.gather(-1, ids), s_rest], dim=-1)  # (N, K+1)
    # an empty tail (K == V) holds no teacher mass: what 1 - sum leaves there is rounding
    t_rest = (1.0 - t_lp.exp().sum(-1, keepdim=True)).clamp(min=0.0).masked_fill(empty, 0.0)  # (N, 1)
    t_buckets = torch.cat([t_lp, t_rest.log()], dim=-1) / temperature  # -inf where the rest is empty
    t_logq = torch.log_softmax(t_buckets, dim=-1)
    t_p = t_logq.exp()
    kl_terms = torch.where(t_p > 0, t_p * (t_logq - s_buckets), torch.zeros_like(t_p))
    kl = kl_terms.sum(-1).view(B, T)  # (B, T)
    return torch.where(ok, kl, torch.zeros_like(kl)), ok
