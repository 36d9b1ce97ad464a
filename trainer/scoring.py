"""Scoring token sequences with a student's own forward: the numbers lm-evaluation-harness asks for.

`score_pairs` gives, for each (context, continuation) pair of token ids, the summed log-probability of the
continuation and whether greedy decoding would have produced it; `generate_tokens` continues contexts until
a stop rule fires. Both call `GPT.forward`, so every mode is scored on what it computes in training and eval:
CoCoMix's concept prediction, TopK and interleaving, and the pause slots, with nothing mode-specific here.

Batches are right-padded. That is exact for every mode: attention is causal, and the concept head, its TopK
and the pause slot of a position read only that position's own state, so padding after a sequence changes
none of its logits. Inputs longer than the student's window lose tokens from the left, as lm-eval's `hf`
model truncates them. Nothing here imports lm_eval (trainer/harness.py is the adapter).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from storage_schemas import UserError
from trainer.model import GPT

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids), the context non-empty


def pad_right(rows: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """rows -> ids (B, T) int64 padded on the right with `pad`, and lengths (B,)."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return ids, lengths


def window_input(context: list[int], continuation: list[int], window: int) -> list[int]:
    """The tokens the model reads to score `continuation`: context + continuation less its last token, cut
    on the left to the window (lm-eval hf: `(context + continuation)[-(max_length + 1):][:-1]`)."""
    return (context + continuation)[-(window + 1):][:-1]


def continuation_targets(rows: list[list[int]], conts: list[list[int]], T: int) -> Tensor:
    """(B, T) next-token targets: continuation ids at the positions that predict them, -1 elsewhere."""
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (row, cont) in enumerate(zip(rows, conts, strict=True)):
        targets[i, len(row) - len(cont) : len(row)] = torch.as_tensor(cont, dtype=torch.long)
    return targets


@torch.no_grad()
def score_batch(model: GPT, rows: list[list[int]], conts: list[list[int]],
                device: torch.device) -> tuple[list[float], list[bool]]:
    """One forward over right-padded `rows`: summed log p of each continuation (float64) and greedy match."""
    ids, _ = pad_right(rows)
    targets = continuation_targets(rows, conts, ids.shape[1]).to(device)
    logits = model(ids.to(device)).logits.float()  # (B, T, V)
    scored = targets >= 0
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    logp = (picked - logits.logsumexp(-1)).double() * scored  # log-softmax at the target only
    greedy = ((logits.argmax(-1) == targets) | ~scored).all(-1)
    return logp.sum(-1).tolist(), greedy.tolist()  # one host sync per batch


def score_pairs(model: GPT, pairs: list[Pair], batch_size: int = 16,
                device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy match) for each pair, in the order given.

    Pairs are scored longest first, so each batch pads little. A continuation longer than the window is
    refused: no truncation of the context could score it in one forward."""
    device, W = torch.device(device), model.cfg.block_size
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError(f"a pair of {len(ctx)} context and {len(cont)} continuation tokens: both must be non-empty")
        if len(cont) > W:  # lm-eval's hf model asserts the same
            raise UserError(f"a continuation of {len(cont)} tokens does not fit the student's {W}-token window: "
                            f"this task cannot be scored with this student")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        rows = [window_input(*pairs[i], W) for i in idx]
        logps, greedy = score_batch(model, rows, [pairs[i][1] for i in idx], device)
        for i, lp, g in zip(idx, logps, greedy, strict=True):
            out[i] = (lp, g)
    return out


def next_tokens(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> (B,) next ids: argmax at temperature 0, else a sample (top-k filtered)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: GPT, contexts: list[list[int]], max_new_tokens: int, done: Callable[[int, list[int]], bool],
                    device: torch.device | str = "cpu", temperature: float = 0.0, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each context (batched) until `done(row, generated ids)` or max_new_tokens; the generated ids.

    The model reads the last block_size tokens of each row at every step, as GPT.generate does (the student
    has no key-value cache, so each step is one full forward of the batch's unfinished rows)."""
    device, W = torch.device(device), model.cfg.block_size
    gen: list[list[int]] = [[] for _ in contexts]
    live = [i for i, c in enumerate(contexts) if c and max_new_tokens > 0]
    for _ in range(max_new_tokens):
        if not live:
            break
        rows = [(contexts[i] + gen[i])[-W:] for i in live]
        ids, lengths = pad_right(rows)
        logits = model(ids.to(device)).logits  # (B, T, V)
        last = logits[torch.arange(len(rows), device=device), lengths.to(device) - 1]  # (B, V)
        for i, t in zip(live, next_tokens(last, temperature, top_k, generator).tolist(), strict=True):
            gen[i].append(t)
        live = [i for i in live if not done(i, gen[i])]
    return gen
