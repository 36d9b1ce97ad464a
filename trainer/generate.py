"""`cocomix generate`: sample from a student, show its predicted concepts, and steer them.

Steering follows the paper (section 4.4): the named concepts' logits are scaled (or shifted) before the
TopK and the compression, at every position, so the continuous concept vector the later layers read is
built from the edited prediction. A scale of 0 suppresses a concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from storage_schemas import UserError
from trainer.checkpoint import load_model, resolve, trained_on
from trainer.model import GPT, Steering


@dataclass(frozen=True)
class GenerateConfig:
    """One `cocomix generate` call."""

    checkpoint: Path
    """Checkpoint folder, or a run folder (its latest checkpoint)."""
    prompt: str
    """Text to continue."""
    max_new_tokens: int = 40
    temperature: float = 1.0
    """0 samples greedily."""
    top_k: int | None = None
    seed: int = 0
    show_concepts: int = 0
    """Print this many top predicted concepts beside each generated token (cocomix students)."""
    steer: dict[int, float] = field(default_factory=dict)
    """{concept id: scale} applied to the concept logits before TopK."""
    steer_add: dict[int, float] = field(default_factory=dict)
    """{concept id: value} added to the concept logits before TopK."""
    tokenizer: Path | None = None
    """Tokenizer folder; default: the one in the token store the student trained on."""

    def __post_init__(self):
        if self.max_new_tokens < 0 or self.temperature < 0:
            raise UserError("--max-new-tokens and --temperature must not be negative")


class Step(NamedTuple):
    token: int
    concepts: list[tuple[int, float]]  # (concept id, probability under the concept head), best first


def parse_steer(items: list[str]) -> dict[int, float]:
    """['12=0', '7=4.5'] -> {12: 0.0, 7: 4.5}, with one clear line for anything else."""
    out = {}
    for item in items:
        cid, eq, val = item.partition("=")
        try:
            out[int(cid)] = float(val)
        except ValueError:
            raise UserError(f"--steer takes ID=SCALE (e.g. 12=0 or 7=4.5), got {item!r}") from None
        if not eq:
            raise UserError(f"--steer takes ID=SCALE (e.g. 12=0 or 7=4.5), got {item!r}")
    return out


def load_tokenizer(cfg: GenerateConfig, meta: dict):
    from tokenizers import Tokenizer

    folder = cfg.tokenizer or trained_on(meta, resolve(cfg.checkpoint)) / "tokenizer"
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"no tokenizer at {file}: pass --tokenizer DIR (a folder with tokenizer.json)")
    return Tokenizer.from_file(str(file))


def steering_for(model: GPT, cfg: GenerateConfig) -> Steering | None:
    if not (cfg.steer or cfg.steer_add):
        return None
    if model.cfg.mode != "cocomix":
        raise UserError(f"--steer needs a cocomix student; this checkpoint is {model.cfg.mode!r}")
    return Steering.from_dict(cfg.steer, model.cfg.n_concepts, cfg.steer_add)


@torch.no_grad()
def sample(model: GPT, idx: torch.Tensor, cfg: GenerateConfig, steer: Steering | None) -> list[Step]:
    """Autoregressive sampling from idx (1, T); each step records the concepts that predicted its token."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = []
    for _ in range(cfg.max_new_tokens):
        out = model(idx[:, -model.cfg.block_size :], steer=steer)
        logits = out.logits[0, -1].float()  # (V,)
        if cfg.temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / cfg.temperature
            if cfg.top_k:
                kth = logits.topk(min(cfg.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        concepts = []
        if cfg.show_concepts and out.concept_logits is not None:
            p = out.concept_logits[0, -1].float().softmax(-1).topk(cfg.show_concepts)
            concepts = list(zip(p.indices.tolist(), p.values.tolist(), strict=True))
        steps.append(Step(nxt, concepts))
        idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    return steps


def generate(cfg: GenerateConfig) -> tuple[str, list[Step], list[str]]:
    """(full text, steps, decoded piece of each generated token)."""
    model, meta = load_model(cfg.checkpoint)
    tok = load_tokenizer(cfg, meta)
    steer = steering_for(model, cfg)
    ids = tok.encode(cfg.prompt, add_special_tokens=False).ids
    if not ids:
        raise UserError("--prompt is empty after tokenization: give some text")
    steps = sample(model, torch.tensor([ids]), cfg, steer)
    out_ids = ids + [s.token for s in steps]
    pieces = [tok.decode(out_ids[: len(ids) + i + 1])[len(tok.decode(out_ids[: len(ids) + i])):]
              for i in range(len(steps))]
    return tok.decode(out_ids), steps, pieces
