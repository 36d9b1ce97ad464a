"""TopKSAE against a dense reference written out here (OpenAI's Autoencoder with a TopK activation)."""

import pytest
import torch

from sae.model import LN_EPS, SAEConfig, TopKSAE, _scatter_rows
from storage_schemas import UserError

torch.set_num_threads(1)


def make_sae(**kw) -> TopKSAE:
    torch.manual_seed(0)
    cfg = SAEConfig(**{"d_in": 16, "n_latents": 64, "k": 4, **kw})
    sae = TopKSAE(cfg)
    with torch.no_grad():  # non-trivial biases so that a wrong sign or a missing term shows
        sae.pre_bias.normal_()
        sae.latent_bias.normal_(std=0.1)
    return sae


def dense_reference(sae: TopKSAE, x: torch.Tensor):
    """OpenAI sparse_autoencoder: LN -> encoder(x - pre_bias) + latent_bias -> TopK(ReLU) -> dense decode."""
    mu, std = torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])
    if sae.cfg.normalize == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + LN_EPS)
    pre = (x - sae.pre_bias) @ sae.W_enc.T + sae.latent_bias
    top = pre.topk(sae.cfg.k, dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    recon = latents @ sae.W_dec + sae.pre_bias
    if sae.cfg.normalize == "layer_norm":
        recon = recon * (std + LN_EPS) + mu
    return latents, recon


def to_dense(enc, n_latents: int) -> torch.Tensor:
    flat_i, flat_v = enc.indices.reshape(-1, enc.indices.shape[-1]), enc.values.reshape(-1, enc.values.shape[-1])
    return torch.zeros(len(flat_i), n_latents).scatter_(-1, flat_i, flat_v)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_encode_decode_match_dense_reference(normalize):
    sae = make_sae(normalize=normalize)
    x = torch.randn(50, 16) * 3 + 1
    latents, recon = dense_reference(sae, x)
    with torch.no_grad():
        enc = sae.encode(x)
        assert enc.indices.shape == (50, 4) and enc.values.shape == (50, 4)
        assert torch.all(enc.values[:, :-1] >= enc.values[:, 1:])  # best first
        torch.testing.assert_close(to_dense(enc, 64), latents)
        torch.testing.assert_close(sae.decode(enc), recon)
        out = sae(x)
    torch.testing.assert_close(out.x_hat, recon)
    assert out.auxk_loss is None


def test_encode_keeps_leading_dims_and_k_override():
    sae = make_sae(normalize="layer_norm")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        enc = sae.encode(x, k=7)
        flat = sae.encode(x.reshape(10, 16), k=7)
    assert enc.indices.shape == (2, 5, 7) and enc.mu.shape == (2, 5, 1)
    assert torch.equal(enc.indices.reshape(10, 7), flat.indices)
    torch.testing.assert_close(sae.decode(enc).reshape(10, 16), sae.decode(flat))


def test_layer_norm_uses_unbiased_std():
    sae = make_sae(normalize="layer_norm")
    x = torch.randn(8, 16)
    with torch.no_grad():
        enc = sae.encode(x)
    torch.testing.assert_close(enc.std.squeeze(-1), x.std(-1))  # unbiased, as OpenAI and the paper
    assert not torch.allclose(enc.std.squeeze(-1), x.std(-1, unbiased=False))


def test_relu_and_jumprelu_keep_the_largest_active_latents():
    x = torch.randn(30, 16)
    relu = make_sae(activation="relu", k=64)
    jump = make_sae(activation="jumprelu", k=64)
    with torch.no_grad():
        jump.threshold.uniform_(0.0, 1.0)
        pre = (x - relu.pre_bias) @ relu.W_enc.T + relu.latent_bias
        torch.testing.assert_close(to_dense(relu.encode(x), 64), pre.relu())
        gated = pre.relu() * (pre > jump.threshold)
        torch.testing.assert_close(to_dense(jump.encode(x), 64), gated)
        top3 = relu.encode(x, k=3)
    torch.testing.assert_close(top3.values, pre.relu().topk(3).values)


def test_fvu_and_auxk():
    sae = make_sae(k=2)
    x = torch.randn(40, 16)
    out = sae(x, dead_latents=torch.zeros(0, dtype=torch.long))
    expect = (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, expect)
    assert out.auxk_loss is None  # nothing dead: no auxiliary loss
    dead = torch.arange(3)  # fewer dead latents than k_aux = d_in / 2 = 8: the loss is scaled by 3 / 8
    out = sae(x, dead_latents=dead)
    with torch.no_grad():  # reference: dense pre-activations of the dead latents, ReLU, decode, vs the residual
        pre = (x - sae.pre_bias) @ sae.W_enc[dead].T + sae.latent_bias[dead]
        e_hat = pre.relu() @ sae.W_dec[dead]
        e = x - out.x_hat  # OpenAI's normalized_mse(e_hat, e): relative to the residual's own variance
        ref = 3 / 8 * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.auxk_loss.detach(), ref)
    out.auxk_loss.backward()
    assert float(sae.W_dec.grad[3:].abs().sum()) == 0.0  # only dead latents learn from it
    assert float(sae.W_dec.grad[:3].abs().sum()) > 0


def test_sparse_encoder_backward_matches_dense_autograd():
    """The TopK encoder's hand-written backward equals autograd through a dense linear + topk + relu."""
    sae = make_sae(normalize="layer_norm", k=6)
    x = torch.randn(30, 16, requires_grad=True)
    weights = torch.randn(30, 6)
    idx, val = sae.codes(sae.normalize_input(x)[0], 6)
    (val * weights).sum().backward()
    got = [t.grad.clone() for t in (x, sae.W_enc, sae.latent_bias, sae.pre_bias)]
    for t in (x, sae.W_enc, sae.latent_bias, sae.pre_bias):
        t.grad = None
    ref_idx, ref_val = sae.select(sae.pre_acts(sae.normalize_input(x)[0]), 6)
    (ref_val * weights).sum().backward()
    assert torch.equal(idx, ref_idx)
    for g, t in zip(got, (x, sae.W_enc, sae.latent_bias, sae.pre_bias), strict=True):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("sparse", [True, False])
def test_scatter_rows_both_paths(sparse):
    """The encoder backward's weight gradient: sparse matmul on CPU, index_add_ on GPU / under compile."""
    idx, g, x = torch.randint(0, 64, (30, 5)), torch.randn(30, 5), torch.randn(30, 16)
    expect = torch.zeros(64, 16)
    for n in range(30):
        for j in range(5):
            expect[idx[n, j]] += g[n, j] * x[n]
    torch.testing.assert_close(_scatter_rows(idx, g, x, 64, sparse), expect)


def test_decoder_upkeep():
    sae = make_sae()
    x = torch.randn(40, 16)
    sae(x).fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    radial = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert radial.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_config_refusals():
    with pytest.raises(UserError, match="k=65 is larger than the number of latents"):
        SAEConfig(d_in=16, n_latents=64, k=65)
    with pytest.raises(UserError, match="normalize"):
        SAEConfig(d_in=16, n_latents=64, k=4, normalize="rms")
