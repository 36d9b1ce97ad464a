"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    x_in    = layer_norm(x) if normalize == "layer_norm" else x       # OpenAI v5 SAEs normalise
    pre     = W_enc @ (x_in - pre_bias) + latent_bias                  # (N, n_latents)
    top-k   = topk(pre, k); values = relu(values)                     # (N, k) indices and values
    x_hat   = sum_j values_j * W_dec[j] + pre_bias  (then de-normalised)

The encoder never builds the dense (N, n_latents) *output*: callers get indices and values, and
decode is a sparse gather (`F.embedding_bag`) of k decoder rows per token. The pre-activations are
dense by nature (every latent must be scored to find the top k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storage_schemas import UserError

LN_EPS = 1e-5  # DESIGN.md "Layer-norm statistics"; OpenAI's LN() uses the same


@dataclass(frozen=True)
class SAEConfig:
    """Shape and semantics of one SAE; saved as the `config` section of our cfg.json."""

    d_in: int
    """Width of the hidden state the SAE reads (the teacher's hidden size for residual locations)."""
    n_latents: int
    """Number of dictionary latents ("concepts")."""
    k: int
    """Latents kept per token. For relu/jumprelu SAEs: a cap on the active latents returned."""
    normalize: Literal["none", "layer_norm"] = "none"
    """"layer_norm": per-token (x - mean) / (unbiased std + 1e-5) before encoding, as OpenAI v5."""
    activation: Literal["topk", "relu", "jumprelu"] = "topk"
    """topk: Gao et al.; relu: SAELens "standard"; jumprelu: ReLU gated by a per-latent threshold."""
    hook_layer: int | None = None
    """Teacher block the SAE was trained on, when known."""
    hook_location: str = "resid_post_mlp"
    """One of sae.hooks.LOCATIONS or a raw module path."""
    teacher: str | None = None
    """Teacher model id or folder, when known."""
    source_format: str = "cocomix"
    """The format the weights were first loaded from: cocomix, openai, saelens or sparsify."""

    def __post_init__(self):
        if min(self.d_in, self.n_latents, self.k) < 1:
            raise UserError(f"SAE sizes must be positive: d_in={self.d_in}, latents={self.n_latents}, k={self.k}")
        if self.k > self.n_latents:
            raise UserError(f"k={self.k} is larger than the number of latents ({self.n_latents}); choose k <= latents")
        if self.normalize not in ("none", "layer_norm"):
            raise UserError(f"normalize must be 'none' or 'layer_norm', not {self.normalize!r}")
        if self.activation not in ("topk", "relu", "jumprelu"):
            raise UserError(f"activation must be topk, relu or jumprelu, not {self.activation!r}")


class EncoderOutput(NamedTuple):
    indices: Tensor
    """(..., k) int64 latent ids, largest value first."""
    values: Tensor
    """(..., k) activations >= 0; 0 means the slot is not active."""
    mu: Tensor
    """(..., 1) per-token mean removed by the input layer-norm (0 when normalize="none")."""
    std: Tensor
    """(..., 1) per-token unbiased std of the input layer-norm (1 when normalize="none")."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """(N, d_in) reconstruction in the caller's space (de-normalised)."""
    enc: EncoderOutput
    fvu: Tensor
    """Fraction of variance unexplained in the SAE's input space (normalised when layer_norm): the training loss."""
    auxk_loss: Tensor | None
    """AuxK loss (Gao et al. App. B.1) when a dead mask was given, else None."""


def layer_norm_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mu) / (std + eps), mu, std with the unbiased std, in OpenAI's order of operations."""
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    return x / (std + LN_EPS), mu, std


class TopKSAE(nn.Module):
    """Parameters: pre_bias (d_in), W_enc (n_latents, d_in), latent_bias (n_latents),
    W_dec (n_latents, d_in) with unit-norm rows for SAEs trained here; jumprelu adds threshold (n_latents)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        w_dec = torch.randn(n, d)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())  # encoder starts as the decoder's transpose (Gao et al. 2024)
        self.latent_bias = nn.Parameter(torch.zeros(n))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(n))

    # -- encode -------------------------------------------------------------------------------

    def normalize_input(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x in the SAE's input space, with the mu and std needed to undo it. x: (..., d_in)."""
        if self.cfg.normalize == "layer_norm":
            return layer_norm_stats(x)
        return x, x.new_zeros(*x.shape[:-1], 1), x.new_ones(*x.shape[:-1], 1)

    def pre_acts(self, x_in: Tensor) -> Tensor:
        """Pre-activations of every latent, (..., n_latents), from an already-normalised input."""
        return F.linear(x_in - self.pre_bias, self.W_enc, self.latent_bias)

    def select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest activations from dense pre-activations: (indices, values), each (..., k),
        sorted largest first.

        topk ranks the pre-activations and applies ReLU to the winners (OpenAI's TopK); relu and
        jumprelu compute their dense activations first, then keep the k largest (zeros = inactive).
        """
        if self.cfg.activation == "topk":
            values, indices = pre.topk(k, dim=-1)
            return indices, values.relu()
        acts = pre.relu()
        if self.cfg.activation == "jumprelu":
            acts = acts * (pre > self.threshold.relu())  # SAELens >= 6 clamps the threshold at 0
        values, indices = acts.topk(k, dim=-1)
        return indices, values

    def codes(self, x_in: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(indices, values), each (..., k), from a normalised input x_in (..., d_in).

        For TopK the encoder is one autograd Function whose backward touches only the k winners per
        token, so training never builds a dense (N, n_latents) gradient.
        """
        if self.cfg.activation != "topk":
            return self.select(self.pre_acts(x_in), k)
        flat = (x_in - self.pre_bias).reshape(-1, self.cfg.d_in)
        values, indices = _TopKEncode.apply(flat, self.W_enc, self.latent_bias, k)
        return indices.view(*x_in.shape[:-1], k), values.view(*x_in.shape[:-1], k)

    def encode(self, x: Tensor, k: int | None = None) -> EncoderOutput:
        """x: (..., d_in) -> top-k indices and values (..., k), plus the layer-norm stats."""
        x_in, mu, std = self.normalize_input(x)
        indices, values = self.codes(x_in, k or self.cfg.k)
        return EncoderOutput(indices, values, mu, std)

    # -- decode -------------------------------------------------------------------------------

    def decode_latents(self, indices: Tensor, values: Tensor) -> Tensor:
        """sum_j values_j * W_dec[indices_j], (..., d_in), as one fused gather-and-sum (no pre_bias)."""
        k, d = indices.shape[-1], self.cfg.d_in
        out = F.embedding_bag(indices.reshape(-1, k), self.W_dec,
                              per_sample_weights=values.reshape(-1, k).to(self.W_dec.dtype), mode="sum")
        return out.reshape(*indices.shape[:-1], d)

    def decode(self, enc: EncoderOutput) -> Tensor:
        """Reconstruction (..., d_in) in the caller's space: undoes the input layer-norm."""
        x = self.decode_latents(enc.indices, enc.values) + self.pre_bias
        if self.cfg.normalize == "layer_norm":
            x = x * (enc.std + LN_EPS) + enc.mu  # exact inverse of (h - mu) / (std + eps)
        return x

    # -- training forward -----------------------------------------------------------------------

    def forward(self, x: Tensor, dead_latents: Tensor | None = None) -> ForwardOutput:
        """x: (N, d_in). dead_latents: (n_dead,) int64 ids of latents that have not fired for a while."""
        x_in, mu, std = self.normalize_input(x)
        indices, values = self.codes(x_in, self.cfg.k)
        recon = self.decode_latents(indices, values) + self.pre_bias
        err = x_in.float() - recon.float()
        total_var = (x_in.float() - x_in.float().mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        auxk = None
        if dead_latents is not None and dead_latents.numel() > 0:
            auxk = self.auxk_loss(x_in, dead_latents, err)
        x_hat = recon * (std + LN_EPS) + mu if self.cfg.normalize == "layer_norm" else recon
        return ForwardOutput(x_hat, EncoderOutput(indices, values, mu, std), fvu, auxk)

    def auxk_loss(self, x_in: Tensor, dead: Tensor, err: Tensor) -> Tensor:
        """Gao et al. App. B.1: the top-k_aux *dead* latents (k_aux = d_in / 2) reconstruct the main
        residual err. Normalised by the residual's own variance, as OpenAI's train.py does, so the
        signal does not fade as the main reconstruction improves; scaled down while fewer than k_aux
        latents are dead (EleutherAI sparsify). Only the dead latents' pre-activations are computed."""
        half = max(1, self.cfg.d_in // 2)
        k_aux = min(half, dead.numel())
        pre = F.linear(x_in - self.pre_bias, self.W_enc[dead], self.latent_bias[dead])  # (N, n_dead)
        values, pos = pre.topk(k_aux, dim=-1)
        e_hat = self.decode_latents(dead[pos], values.relu())
        err = err.detach()
        residual_var = (err - err.mean(0)).pow(2).sum()
        return min(1.0, dead.numel() / half) * (e_hat.float() - err).pow(2).sum() / residual_var

    # -- weight upkeep ----------------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True) + torch.finfo(self.W_dec.dtype).eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of each decoder row's gradient: Adam would otherwise fight the
        unit-norm constraint (Gao et al. 2024, Sec. 2.4 / App. A)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)  # (n_latents, 1)
        self.W_dec.grad -= parallel * self.W_dec

    @property
    def device(self) -> torch.device:
        return self.W_dec.device


class _TopKEncode(torch.autograd.Function):
    """values, indices = topk(x @ W.T + b, k); values = relu(values), for x (N, d_in).

    The backward uses only the k winners per token, as EleutherAI sparsify's FusedEncoder: the dense
    backward of the encoder (two (N, n_latents, d_in) matmuls, 2/3 of a dense step) becomes a gather
    and a scatter-add of N * k rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int):
        values, indices = F.linear(x, weight, bias).topk(k, dim=-1)
        values = values.relu()
        ctx.save_for_backward(x, weight, indices, values)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        g = (grad_values * (values > 0)).to(weight.dtype)  # (N, k); ReLU passes no gradient below 0
        grad_x = F.embedding_bag(indices, weight, per_sample_weights=g, mode="sum").to(x.dtype)
        sparse = not (x.is_cuda or torch.compiler.is_compiling())  # torch.compile cannot trace sparse tensors
        grad_w = _scatter_rows(indices, g, x.to(weight.dtype), weight.shape[0], sparse)
        grad_b = torch.zeros_like(weight[:, 0]).index_add_(0, indices.flatten(), g.flatten())
        return grad_x, grad_w, grad_b, None


def _scatter_rows(indices: Tensor, g: Tensor, x: Tensor, n_rows: int, sparse: bool) -> Tensor:
    """out[l] = sum of g[n, j] * x[n] over all (n, j) with indices[n, j] == l, shape (n_rows, d).

    indices, g (N, k); x (N, d). On the CPU a sparse (n_rows, N) @ x (N, d) product is an order of
    magnitude faster than index_add_; elsewhere k index_add_ calls of (N, d) rows avoid an (N * k, d) buffer.
    """
    if not sparse:
        out = x.new_zeros(n_rows, x.shape[1])
        for j in range(indices.shape[1]):
            out.index_add_(0, indices[:, j], g[:, j, None] * x)
        return out
    n, k = indices.shape
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(torch.stack([indices.flatten(), rows]), g.flatten(), (n_rows, n),
                                     check_invariants=False)
    return torch.sparse.mm(sparse, x)
