"""SAE throughput at the paper's proportions, scaled down: GPT-2 small's 768-wide residual and
32k-latent TopK(32) SAE on block 5 of 12 become d 192, 8192 latents (about 43x d), k 32, a 12-block
teacher hooked after block 5.

Rows:
  - SAE training tokens/s: one optimiser step on activations already in memory, and the same with
    the teacher's forward up to the hook (what `cocomix sae train` does per step).
  - encode tokens/s: our sparse encode (pre-activations, top-k, indices and values) against the
    dense-then-topk reference (OpenAI's TopK module: scatter into a dense (N, latents) tensor), and
    encode + decode (sparse gather of k decoder rows vs a dense (N, latents) @ W_dec), each as a
    ratio measured side by side, interleaved, best of repeats. The FLOP-count prediction sits
    beside the measured ratio: the encoder matmul (2 N L d) is common to both, so encode alone
    predicts ~1x and encode + decode predicts 2 / (1 + k / L).
"""

from __future__ import annotations

import time

D, LATENTS, K, TOKENS = 192, 8192, 32, 2048


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` runs: on a shared machine the minimum is the least disturbed one."""
    return min(_seconds(fn) for _ in range(repeats))


def _side_by_side(a, b, repeats: int) -> tuple[float, float]:
    """Best seconds of a and b, alternated so that machine noise hits both alike."""
    pairs = [(_seconds(a), _seconds(b)) for _ in range(repeats)]
    return min(p[0] for p in pairs), min(p[1] for p in pairs)


def _dense_reference(sae, x):
    """OpenAI sparse_autoencoder: dense TopK latents (N, L), then a dense decoder matmul."""
    import torch

    pre = sae.pre_acts(x)
    top = pre.topk(K, dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    return latents, latents @ sae.W_dec + sae.pre_bias


def _train_step(sae, opt, x):
    out = sae(x)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()


def _teacher():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=D, n_head=6, vocab_size=8192, n_positions=256, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def main() -> list[tuple[str, str, str, str]]:
    import torch

    from sae.hooks import activations
    from sae.model import SAEConfig, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=LATENTS, k=K, normalize="layer_norm"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(TOKENS, D)
    shape = f"d {D}, {LATENTS} latents, k {K}, {TOKENS} tokens/step"

    _train_step(sae, opt, x)  # warm-up
    step = _best_seconds(lambda: _train_step(sae, opt, x), 5)
    teacher, ids = _teacher(), torch.randint(0, 8192, (TOKENS // 256, 256))
    with_teacher = _best_seconds(lambda: _train_step(sae, opt, activations(teacher, ids, 5, "resid_post_mlp")
                                                       .reshape(-1, D)), 3)

    with torch.no_grad():
        x_in = sae.normalize_input(x)[0]  # both sides start from the normalised input
        enc_s, enc_d = _side_by_side(lambda: sae.codes(x_in, K), lambda: _dense_reference(sae, x_in)[0], 7)
        sparse_rt = lambda: sae.decode_latents(*sae.codes(x_in, K)) + sae.pre_bias  # noqa: E731
        both_s, both_d = _side_by_side(sparse_rt, lambda: _dense_reference(sae, x_in), 7)
    flops_pred = 2 / (1 + K / LATENTS)
    return [
        ("sae train step", f"{TOKENS / step:,.0f}", "tokens/s", f"{shape}; activations in memory"),
        ("sae train step incl. teacher", f"{TOKENS / with_teacher:,.0f}", "tokens/s",
         "12-block d 192 teacher, forward stops after block 5"),
        ("encode sparse", f"{TOKENS / enc_s:,.0f}", "tokens/s", "pre-activations + top-k indices/values"),
        ("encode dense-then-topk", f"{TOKENS / enc_d:,.0f}", "tokens/s", "OpenAI TopK: scatter to (N, latents)"),
        ("encode ratio sparse / dense", f"{enc_d / enc_s:.2f}", "x", "FLOP prediction ~1.00x; dense also writes N x latents"),
        ("encode+decode ratio sparse / dense", f"{both_d / both_s:.2f}", "x",
         f"FLOP prediction {flops_pred:.2f}x (decode 2Nkd vs 2NLd)"),
    ]


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
