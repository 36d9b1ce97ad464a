"""Each external format built on disk from known tensors; our encodings must equal that library's
formula, written out here from its source (openai/sparse_autoencoder model.py, SAELens saes/*.py,
EleutherAI sparsify sparse_coder.py + fused_encoder.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae.formats import detect_format, load_sae, read_meta, save_sae
from sae.model import SAEConfig, TopKSAE
from storage_schemas import UserError

torch.set_num_threads(1)
D, L, K = 16, 64, 4


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense(enc) -> torch.Tensor:
    return torch.zeros(len(enc.indices), L).scatter_(-1, enc.indices, enc.values)


X = rand(40, D, seed=99) * 2 + 0.5


# -- openai -------------------------------------------------------------------------------------------


def openai_reference(sd, x):
    """Autoencoder.from_state_dict(sd) with activation TopK: normalize=True, LN, TopK(k, ReLU), decode * std + mu."""
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    x = x / (std + 1e-5)
    pre = F.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    topk = torch.topk(pre, k=sd["activation_state_dict"]["k"], dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, topk.indices, F.relu(topk.values))
    recons = F.linear(latents, sd["decoder.weight"]) + sd["pre_bias"]
    return latents, recons * std + mu


def test_openai_state_dict(tmp_path):
    sd = {"pre_bias": rand(D, seed=1), "encoder.weight": rand(L, D, seed=2), "latent_bias": rand(L, seed=3) * 0.1,
          "decoder.weight": rand(D, L, seed=4), "stats_last_nonzero": torch.zeros(L, dtype=torch.long),
          "activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    path = tmp_path / "resid_post_mlp_5.pt"  # a local copy of v5_32k(location="resid_post_mlp", layer_index=5)
    torch.save(sd, path)
    sae = load_sae(path)
    assert detect_format(path) == "openai"
    assert (sae.cfg.normalize, sae.cfg.k, sae.cfg.hook_layer, sae.cfg.hook_location) == ("layer_norm", K, 5,
                                                                                          "resid_post_mlp")
    latents, recons = openai_reference(sd, X)
    with torch.no_grad():
        enc = sae.encode(X)
        torch.testing.assert_close(dense(enc), latents)
        # OpenAI de-normalises with std, ours with std + 1e-5 (the exact inverse): 1e-5 relative
        torch.testing.assert_close(sae.decode(enc), recons, atol=1e-4, rtol=1e-4)


# -- SAELens ------------------------------------------------------------------------------------------


def saelens_reference(cfg, w, x):
    """SAE.encode / decode of SAELens (v6 topk_sae.py / standard_sae.py / jumprelu_sae.py, sae.py)."""
    if cfg.get("normalize_activations") == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch == "topk" or fn == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        rescale = cfg.get("rescale_acts_by_decoder_norm", False)
        if rescale:
            hidden_pre = hidden_pre * w["W_dec"].norm(dim=-1)
        vals, idx = torch.topk(hidden_pre, k=k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter_(-1, idx, vals.relu())
        out = (acts * (1 / w["W_dec"].norm(dim=-1)) if rescale else acts) @ w["W_dec"] + w["b_dec"]
    elif arch == "jumprelu":
        acts = hidden_pre.relu() * (hidden_pre > w["threshold"].relu())
        out = acts @ w["W_dec"] + w["b_dec"]
    else:
        acts = hidden_pre.relu()
        out = acts @ w["W_dec"] + w["b_dec"]
    if cfg.get("normalize_activations") == "layer_norm":
        out = out * std + mu
    return acts, out


SAELENS_CASES = {
    "v6_topk_layer_norm_rescaled": {"architecture": "topk", "k": K, "normalize_activations": "layer_norm",
                                    "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True,
                                    "metadata": {"sae_lens_version": "6.5.1", "hook_name": "blocks.1.hook_resid_post",
                                                 "model_name": "tiny-gpt2"}},
    "pre6_standard_topk": {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
                           "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
                           "normalize_activations": "none", "sae_lens_training_version": "3.13.0"},
    "v6_standard_no_b_dec_in": {"architecture": "standard", "apply_b_dec_to_input": False,
                                "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.0.hook_mlp_out"}},
    "v6_jumprelu": {"architecture": "jumprelu", "apply_b_dec_to_input": False, "normalize_activations": None,
                    "metadata": {"sae_lens_version": "6.3.0", "hook_name": "blocks.3.hook_resid_mid"}},
}
SAELENS_HOOKS = {"v6_topk_layer_norm_rescaled": (1, "resid_post_mlp"), "pre6_standard_topk": (1, "resid_post_mlp"),
                 "v6_standard_no_b_dec_in": (0, "resid_delta_mlp"), "v6_jumprelu": (3, "resid_post_attn")}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_folder(tmp_path, case):
    cfg = {"d_in": D, "d_sae": L, "dtype": "float32", **SAELENS_CASES[case]}
    w = {"W_enc": rand(D, L, seed=5), "b_enc": rand(L, seed=6) * 0.1, "W_dec": rand(L, D, seed=7) * 0.3,
         "b_dec": rand(D, seed=8)}
    if cfg["architecture"] == "jumprelu":
        w["threshold"] = rand(L, seed=9).abs()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, tmp_path / "sae_weights.safetensors")
    dense_arch = cfg["architecture"] != "topk" and cfg.get("activation_fn_str") != "topk"
    sae = load_sae(tmp_path, k=L if dense_arch else None)  # dense architectures: keep every active latent
    assert detect_format(tmp_path) == "saelens"
    assert (sae.cfg.hook_layer, sae.cfg.hook_location) == SAELENS_HOOKS[case]
    acts, out = saelens_reference(cfg, w, X)
    with torch.no_grad():
        enc = sae.encode(X)
        torch.testing.assert_close(dense(enc), acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(enc), out, atol=1e-4, rtol=1e-4)


def test_saelens_refusals(tmp_path):
    w = {"W_enc": rand(D, L, seed=5), "b_enc": rand(L, seed=6), "W_dec": rand(L, D, seed=7), "b_dec": rand(D, seed=8)}
    save_file(w, tmp_path / "sae_weights.safetensors")
    for cfg, why in (({"architecture": "gated"}, "architecture 'gated'"),
                     ({"architecture": "standard", "normalize_activations": "expected_average_only_in"},
                      "scaling factor")):
        (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": L, **cfg}))
        with pytest.raises(UserError, match=why):
            load_sae(tmp_path)


# -- sparsify -----------------------------------------------------------------------------------------


def test_sparsify_folder(tmp_path):
    folder = tmp_path / "layers.2"
    folder.mkdir()
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": L, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    w = {"encoder.weight": rand(L, D, seed=10), "encoder.bias": rand(L, seed=11) * 0.1, "W_dec": rand(L, D, seed=12),
         "b_dec": rand(D, seed=13)}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, folder / "sae.safetensors")
    sae = load_sae(folder)
    assert detect_format(folder) == "sparsify"
    assert (sae.cfg.hook_layer, sae.cfg.hook_location, sae.cfg.k) == (2, "resid_post_mlp", K)
    # SparseCoder.encode: fused_encoder(x - b_dec, W, b, k, "topk"); decode: gather-sum of W_dec rows + b_dec
    pre_acts = F.relu(F.linear(X - w["b_dec"], w["encoder.weight"], w["encoder.bias"]))
    top_acts, top_indices = torch.topk(pre_acts, K, dim=-1, sorted=False)
    sae_out = (top_acts[..., None] * w["W_dec"][top_indices]).sum(-2) + w["b_dec"]
    with torch.no_grad():
        enc = sae.encode(X)
        ref = torch.zeros(len(X), L).scatter_(-1, top_indices, top_acts)
        torch.testing.assert_close(dense(enc), ref)
        torch.testing.assert_close(sae.decode(enc), sae_out)


# -- our own format, and refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_cocomix_round_trip(tmp_path, activation):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=L, k=K, normalize="layer_norm", activation=activation,
                            hook_layer=1, hook_location="resid_post_attn", teacher="tiny"))
    with torch.no_grad():
        sae.latent_bias.normal_()
        if activation == "jumprelu":
            sae.threshold.uniform_(0, 0.5)
    save_sae(sae, tmp_path / "sae", meta={"metrics": {"fvu": 0.1}})
    save_sae(sae, tmp_path / "sae", meta={"metrics": {"fvu": 0.05}})  # overwrite in place, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    back = load_sae(tmp_path / "sae" / "cfg.json")
    assert back.cfg == sae.cfg and detect_format(tmp_path / "sae") == "cocomix"
    assert read_meta(tmp_path / "sae") == {"metrics": {"fvu": 0.05}}
    with torch.no_grad():
        a, b = sae.encode(X), back.encode(X)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_unknown_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(UserError, match="supported: cocomix.*openai.*SAELens.*sparsify"):
        load_sae(tmp_path)  # a folder with no cfg.json
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D, "k": K}))
    (tmp_path / "sae.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt safetensors"):
        load_sae(tmp_path)
    bad_pt = tmp_path / "x.pt"
    bad_pt.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable torch state dict"):
        load_sae(bad_pt)
    with pytest.raises(UserError, match="unknown file type .txt"):
        (tmp_path / "notes.txt").write_text("hi")
        load_sae(tmp_path / "notes.txt")


def test_shape_mismatch_and_bad_k_are_refused(tmp_path):
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=L, k=K))
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["config"]["d_in"] = D + 1
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tensor 'pre_bias' has shape"):
        load_sae(tmp_path / "sae")
    cfg["config"].update(d_in=D, k=L + 1)
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="larger than the number of latents"):
        load_sae(tmp_path / "sae")
