"""The attribution kernel against a dense reference written here, the way the paper's code computes it:
full loss.backward() with parameter gradients, dense latents, grad @ W_dec^T, topk; and each label
selection against that reference's key, masked to the active latents."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipeline.attribution import SELECTIONS, Probe, active_attribution, attribute, attribute_many
from sae import SAEConfig, TopKSAE, save_sae

LAYER = 1


def tiny_gpt2(seed: int = 0, n_layer: int = 3, n_embd: int = 32, vocab_size: int = 300, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    return model


def save_teacher(model, folder, tokenizer_dir=None):
    """A teacher folder as a user has one: weights, config and (optionally) its tokenizer's files."""
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copyfile(f, folder / f.name)
    return folder


def tiny_sae(d_in: int = 32, n_latents: int = 96, k: int = 8, normalize: str = "none", seed: int = 1) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d_in, n_latents=n_latents, k=k, normalize=normalize))
    with torch.no_grad():  # random, not the encoder = decoder^T start, so encode and decode disagree
        sae.W_enc.normal_()
        sae.pre_bias.normal_(0, 0.1)
        sae.latent_bias.normal_(0, 0.1)
    return sae.eval()


def save_tiny_sae(sae, folder):
    save_sae(sae, folder)
    return folder


def windows(batch: int = 3, window: int = 24, seed: int = 2, vocab: int = 300):
    return torch.randint(0, vocab, (batch, window), generator=torch.Generator().manual_seed(seed))


def reference_encode(sae: TopKSAE, h):
    """OpenAI's TopK encoder written out: optional LN (unbiased std, eps 1e-5), then topk and ReLU."""
    if sae.cfg.normalize == "layer_norm":
        mu = h.mean(-1, keepdim=True)
        h = (h - mu) / ((h - mu).std(-1, keepdim=True) + 1e-5)
    pre = (h - sae.pre_bias) @ sae.W_enc.T + sae.latent_bias  # (N, n_latents)
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    return idx, vals.relu()


def dense_reference(teacher, sae, win, k):
    """Paper-style: grads on every parameter, the whole backward, dense latents and a dense product."""
    model = copy.deepcopy(teacher).requires_grad_(True)
    store = {}

    def hook(module, args, out):
        out[0].retain_grad() if isinstance(out, tuple) else out.retain_grad()
        store["h"] = out[0] if isinstance(out, tuple) else out

    handle = model.transformer.h[LAYER].register_forward_hook(hook)
    logits = model(input_ids=win).logits
    handle.remove()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), win[:, 1:].flatten(), reduction="sum")
    loss.backward()
    assert model.transformer.wte.weight.grad is not None  # really the full backward
    h, grad_h = store["h"].detach().flatten(0, 1), store["h"].grad.flatten(0, 1)  # (N, d)
    with torch.no_grad():
        idx, vals = reference_encode(sae, h)
        latents = torch.zeros(h.shape[0], sae.cfg.n_latents).scatter(-1, idx, vals)  # (N, n_latents) dense
        dense_attr = latents * (grad_h @ sae.W_dec.T)
        scores, ids = dense_attr.topk(k, dim=-1)
    return ids, scores, dense_attr, idx, vals, logits.detach()


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_kernel_matches_dense_reference(normalize):
    teacher, sae, win, k = tiny_gpt2(), tiny_sae(normalize=normalize), windows(), 4
    out = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=k)
    assert_matches_reference(out, dense_reference(teacher, sae, win, k), k)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_kernel_on_the_loaded_teacher_matches_the_reference_on_transformers(tmp_path):
    """`cocomix extract` runs the teacher as load_teacher returns it (torch's fused tanh GELU in place of
    transformers' gelu_new); the reference runs transformers' own modules, as the paper's code does."""
    from transformers.activations import NewGELUActivation

    from sae.hooks import load_teacher

    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path / "teacher")
    loaded = load_teacher(str(tmp_path / "teacher"))
    assert any(isinstance(m, NewGELUActivation) for m in hf.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in loaded.modules())
    win, sae, k = windows(), tiny_sae(normalize="layer_norm"), 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=win).logits, hf(input_ids=win).logits)
    out = attribute(loaded, sae, LAYER, "resid_post_mlp", win, k=k)
    assert_matches_reference(out, dense_reference(hf, sae, win, k), k)


def assert_matches_reference(out, reference, k):
    ref_ids, ref_scores, dense_attr, _, ref_vals, _ = reference
    ids, scores = out.ids.flatten(0, 1), out.scores.flatten(0, 1)
    assert ids.shape == (3 * 24, k) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    scale = dense_attr.abs().max()
    # every returned score is the reference's attribution of that latent, at every position
    torch.testing.assert_close(scores, dense_attr.gather(-1, ids), rtol=1e-4, atol=1e-5 * scale)
    # where the reference's top-k are all positive and clearly ordered, the labels are identical
    gaps = (ref_scores[:, :-1] - ref_scores[:, 1:]).min(-1).values
    comparable = (ref_scores > 0).all(-1) & (gaps > 1e-4 * scale)
    assert comparable.float().mean() > 0.5
    assert torch.equal(ids[comparable], ref_ids[comparable])
    torch.testing.assert_close(scores[comparable], ref_scores[comparable], rtol=1e-4, atol=1e-5 * scale)
    # valid: all but the last position of each window (every position has >= k active latents here)
    assert (ref_vals > 0).sum(-1).min() >= k
    assert torch.equal(out.valid, torch.arange(24).expand(3, 24) < 23)


def test_fewer_than_k_active_is_invalid_and_scores_not_clipped():
    teacher, sae, win, k = tiny_gpt2(), tiny_sae(), windows(), 4
    _, _, _, _, ref_vals, _ = dense_reference(teacher, sae, win, k)
    # shift every latent down so that about half the positions keep fewer than k positive activations
    pre_kth = ref_vals[:, k - 1]
    with torch.no_grad():
        sae.latent_bias -= pre_kth.median()
    _, _, dense_attr, _, vals, _ = dense_reference(teacher, sae, win, k)
    active = (vals > 0).sum(-1)
    out = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=k)
    expect = (active >= k).reshape(3, 24) & (torch.arange(24) < 23)
    assert torch.equal(out.valid, expect) and expect.any() and (~expect[:, :-1]).any()
    assert (out.scores < 0).any()  # signed scores are kept, not clipped at 0
    torch.testing.assert_close(out.scores.flatten(0, 1), dense_attr.gather(-1, out.ids.flatten(0, 1)),
                               rtol=1e-4, atol=1e-5 * dense_attr.abs().max())


def test_optional_outputs_and_labels_unchanged():
    teacher, sae, win = tiny_gpt2(), tiny_sae(normalize="layer_norm"), windows()
    plain = attribute(teacher, sae, LAYER, "resid_post_mlp", win)
    full = attribute(teacher, sae, LAYER, "resid_post_mlp", win, sae_k=12, teacher_k=5)
    assert plain.sae_ids is None and plain.teacher_ids is None
    assert torch.equal(plain.ids, full.ids) and torch.equal(plain.scores, full.scores)
    *_, idx, vals, logits = dense_reference(teacher, sae, win, 4)
    torch.testing.assert_close(full.teacher_logprobs, logits.log_softmax(-1).topk(5, -1).values)
    assert torch.equal(full.teacher_ids, logits.topk(5, -1).indices)
    assert full.sae_ids.shape == (3, 24, 12)
    assert torch.equal(full.sae_ids[..., :8].flatten(0, 1), idx)  # the SAE's own k lead its larger code
    torch.testing.assert_close(full.sae_vals[..., :8].flatten(0, 1), vals)


def test_gather_is_sliced_without_changing_results(monkeypatch):
    g, w = torch.randn(50, 16), torch.randn(40, 16)
    idx, vals = torch.randint(0, 40, (50, 6)), torch.rand(50, 6)
    whole = active_attribution(w, idx, vals, g)
    torch.testing.assert_close(whole, vals * (g @ w.T).gather(-1, idx))
    monkeypatch.setattr("pipeline.attribution.GATHER_ELEMENTS", 6 * 16 * 7)  # slices of 7 rows
    torch.testing.assert_close(active_attribution(w, idx, vals, g), whole)


def test_k_larger_than_sae_k_refused():
    with pytest.raises(ValueError, match="cannot exceed"):
        attribute(tiny_gpt2(), tiny_sae(k=3), LAYER, "resid_post_mlp", windows(), k=4)


# -- selections ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case():
    teacher, sae, win = tiny_gpt2(), tiny_sae(normalize="layer_norm"), windows()
    return teacher, sae, win, dense_reference(teacher, sae, win, 4)


def selection_key(reference, selection):
    """The selection's key over every latent (N, n_latents), and the mask of the SAE's active set."""
    _, _, dense_attr, idx, vals, _ = reference
    active = torch.zeros_like(dense_attr, dtype=torch.bool).scatter(-1, idx, True)
    latents = torch.zeros_like(dense_attr).scatter(-1, idx, vals)  # (N, n_latents) dense activations
    key = {"signed": dense_attr, "negated": -dense_attr, "absolute": dense_attr.abs(), "activation": latents}
    return key[selection], active


@pytest.mark.parametrize("selection", SELECTIONS)
def test_each_selection_matches_dense_reference(case, selection):
    teacher, sae, win, reference = case
    k = 4
    key, active = selection_key(reference, selection)
    top, ref_ids = key.masked_fill(~active, -torch.inf).topk(k + 1, dim=-1)  # k_sae = 8 > k: all finite
    out = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=k, selection=selection)
    ids, scores = out.ids.flatten(0, 1), out.scores.flatten(0, 1)
    scale = key.abs().max()
    # everywhere: the labels are active latents and each score is the reference key of its latent
    assert active.gather(-1, ids).all()
    torch.testing.assert_close(scores, key.gather(-1, ids), rtol=1e-4, atol=1e-5 * scale)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    # where the reference's top k+1 are clearly ordered (not at a window's last position, where g = 0
    # makes every attribution 0), the same latents in the same order
    comparable = (top[:, :-1] - top[:, 1:]).min(-1).values > 1e-4 * scale
    assert comparable.float().mean() > 0.5
    assert torch.equal(ids[comparable], ref_ids[comparable, :k])
    torch.testing.assert_close(scores[comparable], top[comparable, :k], rtol=1e-4, atol=1e-5 * scale)
    # the trainer's "score > 0" then means the slot has the selection's property
    s = reference[2].gather(-1, ids)  # the latents' signed attributions
    prop = {"signed": s > 0, "negated": s < 0, "absolute": s != 0, "activation": key.gather(-1, ids) > 0}
    assert torch.equal(scores > 0, prop[selection])
    assert torch.equal(out.valid, torch.arange(24).expand(3, 24) < 23)  # valid does not depend on it


def test_signed_is_the_default_and_negated_reverses_it_when_k_is_the_sae_k():
    """With k = k_sae both rank all the active latents, by s and by -s: the same latents, reversed.
    (With k < k_sae they differ: negated picks from the other end.)"""
    teacher, sae, win = tiny_gpt2(), tiny_sae(k=4, normalize="layer_norm"), windows()
    default = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=4, sae_k=6, teacher_k=3)
    signed = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=4, sae_k=6, teacher_k=3, selection="signed")
    assert all(torch.equal(a, b) for a, b in zip(default, signed, strict=True))
    negated = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=4, selection="negated")
    assert signed.valid[:, :-1].all()  # all four active everywhere, so no zero attributions tie
    body = (slice(None), slice(None, -1))  # g = 0 at a window's last position: every s ties at 0 there
    assert torch.equal(negated.ids[body], signed.ids[body].flip(-1))
    torch.testing.assert_close(negated.scores[body], -signed.scores[body].flip(-1))
    assert (signed.scores[body] > 0).any() and (negated.scores[body] > 0).any()


def test_activation_selection_is_the_sae_top_k(case):
    teacher, sae, win, reference = case
    out = attribute(teacher, sae, LAYER, "resid_post_mlp", win, k=4, sae_k=8, selection="activation")
    assert torch.equal(out.ids, out.sae_ids[..., :4]) and torch.equal(out.scores, out.sae_vals[..., :4])
    _, _, _, ref_idx, ref_vals, _ = reference  # the encoder written out above, on the reference's h
    assert torch.equal(out.ids.flatten(0, 1), ref_idx[:, :4])
    torch.testing.assert_close(out.scores.flatten(0, 1), ref_vals[:, :4])


def test_unknown_selection_refused():
    with pytest.raises(ValueError, match="choose one of signed, negated, absolute, activation"):
        attribute(tiny_gpt2(), tiny_sae(), LAYER, "resid_post_mlp", windows(), selection="largest")


# -- several label sets from one teacher pass --------------------------------------------------------


def test_one_pass_for_several_probes_equals_each_alone(monkeypatch):
    """Two layers with two SAEs, a second selection and a second k on one of them, hooks at other
    locations (layer 0's resid_post_attn, below all the others): from one forward and one
    torch.autograd.grad, each probe's labels equal `attribute` run for it alone, bit for bit."""
    teacher, win = tiny_gpt2(), windows()
    a, b = tiny_sae(normalize="layer_norm"), tiny_sae(seed=5)
    probes = [Probe(a, 1, "resid_post_mlp", sae_k=8, teacher_k=5), Probe(b, 2, "resid_post_mlp"),
              Probe(a, 1, "resid_post_mlp", selection="negated"), Probe(a, 1, "resid_post_mlp", k=2),
              Probe(b, 0, "resid_post_attn", selection="absolute"), Probe(a, 2, "resid_delta_mlp", teacher_k=3)]
    calls = {"forward": 0, "grad": 0}
    handle = teacher.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    grad = torch.autograd.grad

    def counted(outputs, inputs, *args, **kwargs):
        calls["grad"] += 1
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    many = attribute_many(teacher, probes, win)
    handle.remove()
    monkeypatch.undo()
    assert calls == {"forward": 1, "grad": 1}
    for p, got in zip(probes, many, strict=True):
        alone = attribute(teacher, p.sae, p.layer, p.location, win, k=p.k, sae_k=p.sae_k, teacher_k=p.teacher_k,
                          selection=p.selection)
        for name in alone._fields:
            want, have = getattr(alone, name), getattr(got, name)
            assert (want is None and have is None) or torch.equal(want, have), (p.layer, p.location, name)
    # the probes really differ, and the lowest hook got its gradient through the hooks above it
    assert not torch.equal(many[0].ids, many[1].ids) and not torch.equal(many[0].ids, many[2].ids)
    assert many[3].ids.shape[-1] == 2 and (many[4].scores[:, :-1] > 0).all()


def test_several_probes_refuse_like_one():
    with pytest.raises(ValueError, match="k=4 labels cannot exceed the SAE's 3 active latents"):
        attribute_many(tiny_gpt2(), [Probe(tiny_sae(), 1, "resid_post_mlp"), Probe(tiny_sae(k=3), 2, "resid_post_mlp")],
                       windows())
