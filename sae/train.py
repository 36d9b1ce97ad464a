"""Train a TopK SAE on a teacher's activations, streamed from token-store windows.

Recipe of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"): decoder bias initialised
to the data mean (or geometric median), encoder initialised as the decoder's transpose, unit-norm
decoder rows with the radial gradient component removed, AuxK loss for dead latents, Adam with
eps 6.25e-10, gradient clipping at 1, learning rate 2e-4 / sqrt(n_latents / 2**14).

Activations are never cached on disk: each step reads a batch of random windows from the token
store, runs the teacher up to the hook (the blocks above are skipped), and trains on those tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from storage_schemas import TokenStore, UserError

from .formats import check_out_dir, save_sae
from .hooks import activations, load_teacher, teacher_config_checks
from .model import SAEConfig, TopKSAE


@dataclass(frozen=True)
class SAETrainConfig:
    """Everything one `cocomix sae train` run depends on."""

    teacher: str
    """Teacher folder (transformers layout) or cached hub name."""
    tokens: str
    """Token store folder."""
    layer: int
    """Teacher block whose hidden state the SAE reads."""
    out: str
    """Output folder for the SAE checkpoint (cfg.json + sae.safetensors)."""
    location: str = "resid_post_mlp"
    """Hook location (sae.hooks.LOCATIONS) or a raw module path."""
    n_latents: int = 3072
    k: int = 16
    normalize: Literal["none", "layer_norm"] = "layer_norm"
    """Layer-normalise inputs as OpenAI's v5 SAEs (and the CoCoMix paper's SAE) do."""
    tokens_budget: int = 4_000_000
    """Activation tokens to train on (teacher windows x window length)."""
    batch_windows: int = 16
    """Windows per step; a step trains on batch_windows * window tokens."""
    window: int = 256
    """Window length in tokens, on the token store's grid."""
    split: str = "train"
    seed: int = 0
    lr: float | None = None
    """None: 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024, Sec. 2.4)."""
    warmup_steps: int = 50
    lr_decay_frac: float = 0.2
    """Linear decay to zero over this final fraction of the steps."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.: 1/32); 0 turns it off."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (feeds AuxK)."""
    bias_init: Literal["mean", "geometric_median"] = "mean"
    init_tokens: int = 32_768
    """Activation tokens used to initialise the decoder bias."""
    checkpoint_every: int = 0
    """Also save every this many steps (0: only at the end)."""
    log_every: int = 25
    device: str = "auto"
    compile: bool = False
    """torch.compile the SAE forward (useful on GPU)."""
    progress: bool = True

    def __post_init__(self):
        if self.k > self.n_latents:
            raise UserError(f"--k {self.k} is larger than --latents {self.n_latents}; choose k <= latents")
        for name in ("n_latents", "k", "tokens_budget", "batch_windows", "window", "init_tokens", "dead_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.layer < 0:
            raise UserError(f"--layer must be >= 0, got {self.layer}")
        if self.normalize not in ("none", "layer_norm") or self.bias_init not in ("mean", "geometric_median"):
            raise UserError(f"normalize must be none|layer_norm and bias-init mean|geometric_median, "
                            f"got {self.normalize!r}, {self.bias_init!r}")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_windows * self.window


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_windows(tokens: str | Path, split: str, window: int) -> TokenStore:
    """Open the token store and check the split holds at least one full window."""
    store = TokenStore.open(Path(tokens))
    if split not in store.splits:
        raise UserError(f"token store {tokens} has no split {split!r} (it has {', '.join(store.splits)})")
    if store.num_windows(split, window) < 1:
        raise UserError(f"split {split!r} of {tokens} has fewer than {window} tokens: use a smaller --window")
    return store


def window_batches(store: TokenStore, split: str, window: int, batch_windows: int,
                   seed: int) -> Iterator[np.ndarray]:
    """Endless (B, window) int64 batches of grid windows in a seeded random order, epoch after epoch."""
    n = store.num_windows(split, window)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n, batch_windows):
            yield np.stack([store.window(split, int(j), window) for j in order[i:i + batch_windows]]).astype(np.int64)


def activation_batches(teacher: nn.Module, batches: Iterator[np.ndarray], layer: int, location: str,
                       device: torch.device) -> Iterator[Tensor]:
    """(B * window, d) float32 activations at the hook, one teacher forward per batch."""
    for ids in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = activations(teacher, torch.from_numpy(ids).to(device), layer, location)
        yield h.reshape(-1, h.shape[-1]).float()


def geometric_median(x: Tensor, iters: int = 64) -> Tensor:
    """Weiszfeld's algorithm, x: (N, d) -> (d,)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


@torch.no_grad()
def init_pre_bias(sae: TopKSAE, x: Tensor, method: str) -> None:
    """Centre the SAE on the data (Gao et al.): pre_bias = mean or geometric median of the SAE's inputs."""
    x_in, _, _ = sae.normalize_input(x)
    sae.pre_bias.copy_(x_in.mean(0) if method == "mean" else geometric_median(x_in))


def lr_at(step: int, steps: int, cfg: SAETrainConfig) -> float:
    """Linear warmup, constant, then linear decay to zero over the last lr_decay_frac of the steps."""
    base = cfg.learning_rate()
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = steps * (1 - cfg.lr_decay_frac)
    decay = 1.0 if step < decay_start else max(0.0, (steps - step) / max(1.0, steps - decay_start))
    return base * warm * decay


def prepare(cfg: SAETrainConfig) -> tuple[TokenStore, nn.Module, torch.device]:
    """Every check a user can fail, cheapest first, before the teacher's weights are loaded."""
    check_out_dir(cfg.out)
    store = open_windows(cfg.tokens, cfg.split, cfg.window)
    info = teacher_config_checks(cfg.teacher, cfg.layer, cfg.window, location=cfg.location)
    if info["vocab_size"] is not None and store.vocab_size > info["vocab_size"]:
        raise UserError(f"the token store's vocabulary ({store.vocab_size}) is larger than the teacher's "
                        f"({info['vocab_size']}): tokenize with the teacher's tokenizer")
    device = pick_device(cfg.device)
    teacher = load_teacher(cfg.teacher, device)
    probe = torch.zeros(1, 1, dtype=torch.long, device=device)
    activations(teacher, probe, cfg.layer, cfg.location)  # UserError for a bad location, before training
    return store, teacher, device


def train_sae(cfg: SAETrainConfig) -> tuple[TopKSAE, dict]:
    """Train, checkpoint (every `checkpoint_every` steps and at the end) and return (sae, meta)."""
    store, teacher, device = prepare(cfg)
    torch.manual_seed(cfg.seed)
    stream = activation_batches(teacher, window_batches(store, cfg.split, cfg.window, cfg.batch_windows, cfg.seed),
                                cfg.layer, cfg.location, device)
    first = [next(stream)]
    while sum(len(x) for x in first) < cfg.init_tokens:
        first.append(next(stream))
    d_in = first[0].shape[-1]
    sae_cfg = SAEConfig(d_in=d_in, n_latents=cfg.n_latents, k=cfg.k, normalize=cfg.normalize,
                        hook_layer=cfg.layer, hook_location=cfg.location, teacher=cfg.teacher)
    sae = TopKSAE(sae_cfg).to(device)
    init_pre_bias(sae, torch.cat(first)[: cfg.init_tokens], cfg.bias_init)
    forward = torch.compile(sae) if cfg.compile else sae
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate(), eps=6.25e-10)
    steps = -(-cfg.tokens_budget // cfg.tokens_per_step)
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)  # tokens since each latent fired
    dead, history, tokens, t0 = None, [], 0, time.perf_counter()
    meta = {"training": asdict(cfg), "token_fingerprint": store.fingerprint}
    bar = tqdm(range(steps), desc="sae train", unit="step", disable=not cfg.progress)
    for step in bar:
        x = first.pop(0) if first else next(stream)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = forward(x, dead_latents=dead)
        loss = out.fvu if out.auxk_loss is None else out.fvu + cfg.auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        fired = torch.zeros(cfg.n_latents, device=device).index_add_(
            0, out.enc.indices.flatten(), (out.enc.values > 0).flatten().float())
        since_fired = torch.where(fired > 0, 0, since_fired + len(x))
        tokens += len(x)
        if step % cfg.log_every == 0 or step == steps - 1:  # the only host syncs of the loop
            dead_ids = (since_fired >= cfg.dead_tokens).nonzero().squeeze(1)
            dead = dead_ids if cfg.auxk_alpha > 0 else None  # the dead set is refreshed here only
            row = {"step": step, "tokens": tokens, "fvu": float(out.fvu.detach()), "dead": len(dead_ids) / cfg.n_latents,
                   "auxk": None if out.auxk_loss is None else float(out.auxk_loss.detach())}
            history.append(row)
            bar.set_postfix(fvu=f"{row['fvu']:.4f}", dead=f"{row['dead']:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save_sae(sae, cfg.out, {**meta, "steps": step + 1, "tokens": tokens, "history": history})
    seconds = time.perf_counter() - t0
    meta.update(steps=steps, tokens=tokens, seconds=round(seconds, 2),
                tokens_per_second=round(tokens / seconds, 1), history=history)
    save_sae(sae, cfg.out, meta)
    return sae, meta
