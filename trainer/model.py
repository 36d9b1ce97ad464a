"""The student: GPT-2 (nanoGPT-style) with CoCoMix concept mixing, and the pause and KD baselines.

Modes (GPTConfig.mode):
- ntp:     plain next-token prediction; weights map 1:1 onto transformers' GPT2LMHeadModel.
- cocomix: before block `insert_layer`, predict concepts from the layer-normalised hidden state,
           compress the TopK of them into one vector per token and interleave it after the token
           (length 2T); the next token is predicted from the concept slots (DESIGN.md, Student).
           Ablations: concept_lambda = 0 mixes without the concept loss; concept_mix = False trains the
           concept loss without mixing (the sequence stays T long, predicted from the token slots).
- pause:   a learned pause vector plus the position embedding of the token it follows, interleaved
           at the input; the next token is predicted from the pause slots.
- kd:      the ntp network trained with (1 - alpha) * NTP + alpha * T^2 * KL to the teacher top-K.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from storage_schemas import UserError
from trainer import chunked
from trainer.losses import concept_loss, kd_loss, ntp_loss

LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon, and the eps of the concept head's layer-norm stats


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    """Biases in the Linear layers and LayerNorms of the blocks (GPT-2 has them)."""
    mode: Literal["ntp", "cocomix", "pause", "kd"] = "ntp"
    n_concepts: int = 0
    """C: the label store's SAE latent count (cocomix)."""
    insert_layer: int = 0
    """Concepts are predicted and interleaved before this block runs (cocomix)."""
    k_concept: int = 32
    """TopK of the concept logits kept for compression (paper: 32)."""
    concept_lambda: float = 0.1
    """Weight of the concept loss (paper: 0.1); 0 is the paper's "mixing without prediction" ablation."""
    concept_mix: bool = True
    """Interleave the compressed concepts; False is the paper's "prediction without mixing" ablation: the
    concept loss trains the hidden state at insert_layer, and nothing is inserted into the sequence."""
    kd_alpha: float = 0.5
    """kd: loss = (1 - kd_alpha) * NTP + kd_alpha * T^2 * KL."""
    kd_temperature: float = 1.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.mode not in ("ntp", "cocomix", "pause", "kd"):
            raise UserError(f"unknown mode {self.mode!r}: use ntp, cocomix, pause or kd")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mode == "cocomix":
            self._check_cocomix()
        if self.mode == "kd" and not (0.0 <= self.kd_alpha <= 1.0 and self.kd_temperature > 0):
            raise UserError(
                f"kd needs 0 <= kd_alpha <= 1 and kd_temperature > 0, "
                f"got {self.kd_alpha} and {self.kd_temperature}"
            )

    def _check_cocomix(self):
        if self.n_concepts < 1:
            raise UserError("cocomix mode needs n_concepts > 0: set it to the SAE's latent count")
        if not 0 <= self.insert_layer < self.n_layer:
            raise UserError(
                f"insert_layer {self.insert_layer} is out of range for a {self.n_layer}-layer "
                f"model: choose 0..{self.n_layer - 1}"
            )
        if not 1 <= self.k_concept <= self.n_concepts:
            raise UserError(
                f"k_concept {self.k_concept} must be between 1 and n_concepts {self.n_concepts} "
                f"(the SAE's latent count): lower k_concept"
            )


class Steering(NamedTuple):
    """Edits of the concept logits before TopK, at every position: z[..., ids] = z[..., ids] * scale + add.

    A scale of 0 with no `add` removes the concept: its logit becomes -inf, so TopK never selects it and
    it adds nothing to the compressed vector (a logit of 0 could still rank among the top when most
    logits are negative, since the concept head's logits are only defined up to a shift)."""

    ids: Tensor  # (S,) int64, distinct
    scale: Tensor  # (S,)
    add: Tensor  # (S,)

    @classmethod
    def from_dict(cls, scales: dict[int, float], n_concepts: int, adds: dict[int, float] | None = None):
        """Build from {concept id: scale} (and optional {id: add}); unnamed parts are 1 and 0."""
        adds = adds or {}
        ids = sorted(set(scales) | set(adds))
        bad = [i for i in ids if not 0 <= i < n_concepts]
        if bad:
            raise UserError(f"steered concept ids {bad} are out of range: the model has {n_concepts}")
        return cls(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor([float(scales.get(i, 1.0)) for i in ids]),
            torch.tensor([float(adds.get(i, 0.0)) for i in ids]),
        )

    def apply(self, z: Tensor) -> Tensor:
        """z (..., C) -> edited copy (out of place, so autograd through z stays valid)."""
        ids = self.ids.to(z.device)
        scale, add = self.scale.to(z), self.add.to(z)
        edited = z.index_select(-1, ids) * scale + add
        edited = edited.masked_fill((scale == 0) & (add == 0), float("-inf"))
        return z.index_copy(-1, ids, edited)


class ModelOutput(NamedTuple):
    logits: Tensor | None  # (B, T, V) next-token logits; None when the losses were chunked (trainer/chunked.py)
    loss: Tensor | None  # total loss to backprop
    ntp_loss: Tensor | None  # next-token CE, targets == -1 ignored
    aux_loss: Tensor | None  # concept CE (cocomix) or T^2 * KL (kd), before weighting
    concept_logits: Tensor | None  # (B, T, C) cocomix, after steering; None when chunked


def layer_norm_stats(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h (..., d) -> x, mu, std: x = (h - mu) / (std + eps), std unbiased (the paper's code, OpenAI's SAE)."""
    mu = h.mean(-1, keepdim=True)
    std = h.std(-1, keepdim=True)
    return (h - mu) / (std + LN_EPS), mu, std


def interleave(a: Tensor, b: Tensor) -> Tensor:
    """a, b (B, T, d) -> (B, 2T, d): a_1, b_1, a_2, b_2, ..."""
    B, T, d = a.shape
    return torch.stack([a, b], dim=2).view(B, 2 * T, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2's gelu_new is the tanh approximation
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ConceptMixer(nn.Module):
    """Concept head, TopK and sparse compression (CoCoMix, paper Sec. 3 / DESIGN.md Student)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.k, self.mix = cfg.k_concept, cfg.concept_mix
        self.pre_bias = nn.Parameter(torch.zeros(cfg.n_embd))  # (d,)
        self.head = nn.Linear(cfg.n_embd, cfg.n_concepts)  # d -> C
        if self.mix:  # without mixing there is nothing to compress, and no parameters for it
            # stored (C, d) so compression is a row gather over the k active concepts
            self.comp_weight = nn.Parameter(torch.empty(cfg.n_concepts, cfg.n_embd))
            self.comp_bias = nn.Parameter(torch.zeros(cfg.n_embd))

    def logits(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, T, d) -> z (B, T, C), mu, std (B, T, 1)."""
        x, mu, std = layer_norm_stats(h)
        return self.head(x - self.pre_bias), mu, std

    def compress(self, vals: Tensor, idx: Tensor) -> Tensor:
        """sum_j vals_j * W_comp[idx_j] + b: vals, idx (B, T, k) -> (B, T, d).

        Equal to z_sparse @ W_comp + b, without the dense (T x C) @ (C x d) product."""
        k = idx.shape[-1]
        w = self.comp_weight
        weights = vals.reshape(-1, k).to(w.dtype)  # embedding_bag wants the table's dtype
        c = F.embedding_bag(idx.reshape(-1, k), w, per_sample_weights=weights, mode="sum")  # (B*T, d)
        return c.view(*idx.shape[:-1], -1) + self.comp_bias

    def compressed(self, z_used: Tensor, mu: Tensor, std: Tensor) -> Tensor:
        """TopK of the (steered) logits, compressed and put back on h's scale: z (..., C) -> c (..., d)."""
        vals, idx = z_used.topk(self.k, dim=-1)  # (..., k): the TopK keeps values, zeroes the rest
        return (self.compress(vals, idx) + self.pre_bias) * std + mu

    def forward(self, h: Tensor, steer: Steering | None) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, T, d) -> mixed (B, 2T, d), raw logits z (B, T, C) for the loss, steered logits.
        Without mixing, h comes back unchanged (B, T, d)."""
        z, mu, std = self.logits(h)
        z_used = steer.apply(z) if steer is not None else z
        if not self.mix:
            return h, z, z_used
        c = self.compressed(z_used, mu, std)  # (B, T, d)
        return interleave(h, c.to(h.dtype)), z, z_used

    def forward_chunked(self, h: Tensor, steer: Steering | None, ids: Tensor, mask: Tensor | None,
                        budget: int) -> tuple[Tensor, Tensor]:
        """forward plus the concept loss, a chunk of tokens at a time (trainer/chunked.py):
        h (B, T, d) -> mixed (B, 2T, d) or h unchanged, concept loss. No (B, T, C) logits come back."""
        c, loss = chunked.concepts(self, h, steer, ids, mask, budget)
        return (interleave(h, c.to(h.dtype)) if self.mix else h), loss


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, d),
            wpe=nn.Embedding(cfg.block_size, d),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(d, eps=LN_EPS, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.concept = ConceptMixer(cfg) if cfg.mode == "cocomix" else None
        self.pause = nn.Parameter(torch.empty(d)) if cfg.mode == "pause" else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections, GPT-2 paper
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.pause is not None:
            nn.init.normal_(self.pause, mean=0.0, std=0.02)
        if self.concept is not None and cfg.concept_mix:
            nn.init.normal_(self.concept.comp_weight, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        concept_ids: Tensor | None = None,
        concept_mask: Tensor | None = None,
        teacher_ids: Tensor | None = None,
        teacher_logprobs: Tensor | None = None,
        steer: Steering | None = None,
        chunk_elements: int = chunked.CHUNK_ELEMENTS,
    ) -> ModelOutput:
        """idx (B, T) -> ModelOutput. Without labels (concept_ids / teacher_*) the loss is the NTP loss,
        which is what evaluation on token-only data wants; training must pass them (the loop checks).
        With targets, a head whose (B * T, width) logits exceed chunk_elements computes its losses in
        chunks (trainer/chunked.py) and leaves its logits out of the output (None)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise UserError(f"sequence length {T} is longer than block_size {self.cfg.block_size}")
        tr = self.transformer
        pos = tr.wpe(torch.arange(T, device=idx.device))  # (T, d)
        h = tr.drop(tr.wte(idx) + pos)  # (B, T, d)
        if self.pause is not None:  # at the input, with the position of the token it follows
            h = interleave(h, tr.drop((self.pause + pos).expand(B, T, -1)))
        z = z_used = concept_aux = None
        chunk_concepts = (targets is not None and concept_ids is not None and self.concept is not None
                          and not chunked.one_chunk(B * T, self.cfg.n_concepts, chunk_elements))
        for i, block in enumerate(tr.h):
            if self.concept is not None and i == self.cfg.insert_layer:
                if chunk_concepts:
                    h, concept_aux = self.concept.forward_chunked(h, steer, concept_ids, concept_mask,
                                                                  chunk_elements)
                else:
                    h, z, z_used = self.concept(h, steer)  # (B, 2T, d)
            h = block(h)
        if self.pause is not None or (self.concept is not None and self.cfg.concept_mix):
            h = h[:, 1::2]  # predict the next token from the concept / pause slots
        if targets is None:
            return ModelOutput(self.lm_head(tr.ln_f(h)), None, None, None, z_used)  # (B, T, V)
        logits, ntp, kd = self._head(h, targets, teacher_ids, teacher_logprobs, chunk_elements)
        if concept_ids is not None and z is not None:  # cocomix, concepts not chunked above
            concept_aux = concept_loss(z, concept_ids, concept_mask)
        return self._total(logits, ntp, kd, z_used, concept_aux)

    def _head(self, h, targets, teacher_ids, teacher_lp, budget) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """h (B, T, d) -> logits (B, T, V) (None when chunked), the NTP loss, the KD loss (kd mode with
        teacher labels, else None). Unchunked, the ops and their order are those of the code before
        chunking existed, so small batches (the demo, the study) give bit-identical losses and gradients."""
        use_kd = self.cfg.mode == "kd" and teacher_ids is not None
        teacher = (teacher_ids, teacher_lp) if use_kd else (None, None)
        ln_f, temp = self.transformer.ln_f, self.cfg.kd_temperature
        if not chunked.one_chunk(h.shape[0] * h.shape[1], self.cfg.vocab_size, budget):
            return None, *chunked.head_losses(ln_f, self.lm_head, h, targets, *teacher, temp, budget)
        logits = self.lm_head(ln_f(h))  # (B, T, V)
        ntp = ntp_loss(logits, targets)
        return logits, ntp, kd_loss(logits, *teacher, targets, temp) if use_kd else None

    def _total(self, logits, ntp, kd, z_used, concept_aux) -> ModelOutput:
        """The weighted loss of the mode from its parts (kd and concept_aux are None when absent)."""
        cfg = self.cfg
        if concept_aux is not None:
            return ModelOutput(logits, ntp + cfg.concept_lambda * concept_aux, ntp, concept_aux, z_used)
        if kd is not None:
            return ModelOutput(logits, (1 - cfg.kd_alpha) * ntp + cfg.kd_alpha * kd, ntp, kd, None)
        return ModelOutput(logits, ntp, ntp, None, z_used)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as nanoGPT: >= 2-D parameters (matrices, embeddings) decay; biases, norms don't."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops the position table (wte is tied to the head, so kept)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        steer: Steering | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample continuations of idx (B, T) -> (B, T + max_new_tokens); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:], steer=steer).logits[:, -1]  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# --- transformers GPT-2 conversion -------------------------------------------------------------

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(cfg: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=LN_EPS, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    )


def _check_hf_compatible(c) -> None:
    problems = []
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation {c.activation_function}")
    if c.n_inner not in (None, 4 * c.n_embd):
        problems.append(f"n_inner {c.n_inner}")
    if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
        problems.append("non-standard attention scaling")
    if c.layer_norm_epsilon != LN_EPS or not getattr(c, "tie_word_embeddings", True):
        problems.append("layer_norm_epsilon or untied embeddings")
    if problems:
        raise UserError(f"this checkpoint is not standard GPT-2 ({', '.join(problems)}): cannot convert it")


def from_hf(hf) -> GPT:
    """GPT2LMHeadModel -> GPT in ntp mode with the same weights (Conv1D weights transposed)."""
    c = hf.config
    _check_hf_compatible(c)
    cfg = GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                    n_head=c.n_head, n_embd=c.n_embd, dropout=c.resid_pdrop, bias=True)
    model = GPT(cfg)
    sd = {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in hf.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model


def to_hf(model: GPT):
    """GPT (ntp or kd mode: the same network) -> GPT2LMHeadModel with the same weights, on the CPU."""
    from transformers import GPT2LMHeadModel

    if model.cfg.mode not in ("ntp", "kd"):
        raise UserError(f"only ntp/kd models map onto GPT2LMHeadModel; this one is {model.cfg.mode}")
    hf = GPT2LMHeadModel(hf_config(model.cfg))
    ours = model.state_dict()
    sd = {}
    for k, v in hf.state_dict().items():
        if k in ours:
            w = ours[k].detach().to("cpu", v.dtype)
            sd[k] = w.t() if k.endswith(_CONV1D) else w
        else:  # bias=False: GPT-2 always has biases, zeros give the same function
            sd[k] = torch.zeros_like(v)
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def export_hf(
    model: GPT, out_dir: Path, tokenizer_dir: Path | None = None, eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a standard HF folder (config.json, model.safetensors, tokenizer files copied from
    tokenizer_dir), loadable with AutoModelForCausalLM / AutoTokenizer. Built in a temporary folder
    beside out_dir and renamed into place, so out_dir is never half-written."""
    out_dir = Path(out_dir)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise UserError(f"tokenizer folder {tokenizer_dir} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder: choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and "model_type" not in _json_or_empty(out_dir / "config.json"):
        # replacing is for re-exports: never a token store, a run or a checkpoint that happens to be there
        raise UserError(f"{out_dir} exists and is not a transformers model folder: choose another --out")
    hf = to_hf(model).to(dtype)  # bfloat16 halves a shipped folder; loaders upcast
    if eos_id is not None:
        hf.config.eos_token_id = hf.config.bos_token_id = eos_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise survive the rename into place
    try:
        hf.save_pretrained(tmp)
        for f in Path(tokenizer_dir).iterdir() if tokenizer_dir is not None else ():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder src onto dst; an existing dst is set aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
