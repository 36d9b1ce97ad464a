"""CoCoMix and pause modes: references written out here, masking, causality, steering."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.losses import concept_loss
from trainer.model import GPT, GPTConfig, Steering

V, C, K = 64, 256, 4
CFG = dict(vocab_size=V, block_size=16, n_layer=3, n_head=2, n_embd=32, n_concepts=C, insert_layer=1, k_concept=8)


def _batch(B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    ids = torch.randint(0, C, (B, T, K), generator=g)
    mask = torch.rand(B, T, K, generator=g) > 0.3
    return idx, ids, mask


def _model(mode="cocomix", seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG, **kw}, mode=mode)).eval()
    with torch.no_grad():  # non-zero biases so the reference checks where they enter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _reference_concept_loss(z, ids, mask):
    """The obvious way: one cross-entropy per label slot, dense masks, weighted by the valid count."""
    total, count = 0.0, 0
    for i in range(ids.shape[-1]):
        ce = F.cross_entropy(z.flatten(0, 1), ids[..., i].flatten(), reduction="none")
        m = mask[..., i].flatten().float()
        total, count = total + (ce * m).sum(), count + m.sum()
    return total / count


def test_concept_loss_matches_per_label_reference():
    _, ids, mask = _batch()
    z = torch.randn(2, 16, C)
    assert_close(concept_loss(z, ids, mask), _reference_concept_loss(z, ids, mask))
    full = torch.ones_like(mask)
    per_label_mean = torch.stack([F.cross_entropy(z.flatten(0, 1), ids[..., i].flatten()) for i in range(K)]).mean()
    assert_close(concept_loss(z, ids), per_label_mean)  # all valid: the paper's mean over labels
    assert_close(concept_loss(z, ids, full), per_label_mean)


def test_masked_slots_change_neither_loss_nor_gradient():
    _, ids, mask = _batch()
    mask[0, 3] = False  # a whole position without labels, like the last position of a window
    z = torch.randn(2, 16, C, requires_grad=True)
    garbage = torch.where(mask, ids, torch.full_like(ids, 10**6))  # a sentinel far out of range
    loss_a = concept_loss(z, ids, mask)
    (grad_a,) = torch.autograd.grad(loss_a, z)
    loss_b = concept_loss(z, garbage, mask)
    (grad_b,) = torch.autograd.grad(loss_b, z)
    assert_close(loss_a, loss_b)
    assert_close(grad_a, grad_b)
    dead = ~mask.any(-1)  # positions with no valid slot get no concept gradient at all
    assert grad_a[dead].abs().max() == 0 and grad_a[~dead].abs().min(-1).values.gt(0).all()


def test_masked_slots_do_not_reach_the_model():
    model = _model()
    idx, ids, mask = _batch()
    other = torch.where(mask, ids, (ids + 17) % C)
    outs, grads = [], []
    for labels in (ids, other):
        model.zero_grad()
        out = model(idx, idx, concept_ids=labels, concept_mask=mask)
        out.loss.backward()
        outs.append(out.loss.detach())
        grads.append(model.concept.head.weight.grad.clone())
    assert_close(outs[0], outs[1])
    assert_close(grads[0], grads[1])
    changed = model(idx, idx, concept_ids=(ids + 17) % C, concept_mask=mask).loss  # valid slots do matter
    assert not torch.allclose(changed, outs[0])


def test_sparse_compression_equals_dense_product():
    mixer = _model().concept
    z = torch.randn(2, 16, C, requires_grad=True)
    vals, idx = z.topk(mixer.k, dim=-1)
    sparse = mixer.compress(vals, idx)
    z_sparse = torch.zeros_like(z).scatter(-1, idx, vals)  # TopK keeps values, zeroes the rest
    dense = z_sparse @ mixer.comp_weight + mixer.comp_bias
    assert_close(sparse, dense)
    g = torch.randn_like(dense)
    assert_close(torch.autograd.grad(sparse, (z, mixer.comp_weight), g, retain_graph=True),
                 torch.autograd.grad(dense, (z, mixer.comp_weight), g))


def _reference_cocomix(model, idx, ids, mask):
    """DESIGN.md's Student pseudo-code, written out with dense ops and a Python interleave."""
    cfg, tr, mx = model.cfg, model.transformer, model.concept
    T = idx.shape[1]
    h = tr.wte(idx) + tr.wpe(torch.arange(T))
    for block in tr.h[: cfg.insert_layer]:
        h = block(h)
    mu, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True, unbiased=True)
    z = ((h - mu) / (std + 1e-5) - mx.pre_bias) @ mx.head.weight.T + mx.head.bias
    top = z.topk(cfg.k_concept, -1)
    z_sparse = torch.zeros_like(z).scatter(-1, top.indices, top.values)
    c = (z_sparse @ mx.comp_weight + mx.comp_bias + mx.pre_bias) * std + mu
    h = torch.stack([x for t in range(T) for x in (h[:, t], c[:, t])], dim=1)
    for block in tr.h[cfg.insert_layer:]:
        h = block(h)
    logits = model.lm_head(tr.ln_f(h))[:, 1::2]
    ntp = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    return logits, ntp + cfg.concept_lambda * _reference_concept_loss(z, ids, mask), z


@pytest.mark.parametrize("insert_layer", [0, 2])
def test_cocomix_forward_matches_design_reference(insert_layer):
    model = _model(insert_layer=insert_layer)
    idx, ids, mask = _batch()
    out = model(idx, idx, concept_ids=ids, concept_mask=mask)
    logits, loss, z = _reference_cocomix(model, idx, ids, mask)
    assert_close(out.logits, logits)
    assert_close(out.loss, loss)
    assert_close(out.concept_logits, z)
    assert_close(out.loss, out.ntp_loss + 0.1 * out.aux_loss)


def test_pause_forward_matches_reference():
    model = _model("pause")
    idx, _, _ = _batch()
    tr, T = model.transformer, idx.shape[1]
    pos = tr.wpe(torch.arange(T))
    tok, pause = tr.wte(idx) + pos, model.pause + pos  # the pause slot carries its token's position
    h = torch.stack([x for t in range(T) for x in (tok[:, t], pause[t].expand(2, -1))], dim=1)
    for block in tr.h:
        h = block(h)
    assert_close(model(idx).logits, model.lm_head(tr.ln_f(h))[:, 1::2])


@pytest.mark.parametrize("mode", ["cocomix", "pause", "ntp"])
def test_interleaved_model_is_causal(mode):
    model = _model(mode)
    idx, _, _ = _batch(B=1)
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[0, t + 1] = (idx[0, t + 1] + 1) % V
        a, b = model(idx), model(changed)
        assert_close(a.logits[:, : t + 1], b.logits[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(a.logits[:, t + 1], b.logits[:, t + 1])  # the change is seen at t+1
        if mode == "cocomix":
            assert_close(a.concept_logits[:, : t + 1], b.concept_logits[:, : t + 1], rtol=0, atol=0)


def test_steer_scale_zero_removes_concept_from_topk():
    model = _model()
    idx, _, _ = _batch(B=1)
    z = model(idx).concept_logits
    target = z[0, -1].argmax().item()  # the most confident concept at the last position
    steer = Steering.from_dict({target: 0.0}, C)
    steered = model(idx, steer=steer).concept_logits
    assert target in z[0, -1].topk(8).indices
    assert not (steered.topk(8, -1).indices == target).any()
    assert torch.isneginf(steered[..., target]).all()  # removed everywhere, not merely lowered
    other = [i for i in range(C) if i != target]
    assert_close(steered[..., other], z[..., other])


def test_steer_large_scale_moves_next_token_distribution_monotonically():
    model = _model()
    idx, _, _ = _batch(B=1)
    base = model(idx)
    target = base.concept_logits[0, -1].argmax().item()
    p = base.logits[0, -1].log_softmax(-1)
    kls = []
    for scale in (1.0, 2.0, 5.0, 20.0):
        q = model(idx, steer=Steering.from_dict({target: scale}, C)).logits[0, -1].log_softmax(-1)
        kls.append(F.kl_div(q, p, log_target=True, reduction="sum").item())
    assert kls[0] == 0.0  # scale 1 is the identity
    assert 0 < kls[1] < kls[2] < kls[3]


def test_steering_refuses_unknown_concepts():
    from storage_schemas import UserError

    with pytest.raises(UserError, match=r"steered concept ids \[256\] are out of range: the model has 256"):
        Steering.from_dict({256: 2.0}, C)


def test_labels_absent_gives_ntp_loss_and_aux_none():
    model = _model()
    idx, _, _ = _batch()
    out = model(idx, idx)
    assert out.aux_loss is None and out.concept_logits.shape == (2, 16, C)
    assert_close(out.loss, F.cross_entropy(out.logits.flatten(0, 1), idx.flatten()))


def test_position_mask_equals_slot_mask_broadcast():
    _, ids, mask = _batch()
    z = torch.randn(2, 16, C)
    position = mask.any(-1)
    assert_close(concept_loss(z, ids, position), concept_loss(z, ids, position[..., None].expand_as(ids)))


def test_bf16_autocast_matches_fp32():
    """The CUDA path runs under bf16 autocast; the same dtypes must line up (embedding_bag, loss)."""
    model = _model()
    idx, ids, mask = _batch()
    ref = model(idx, idx, concept_ids=ids, concept_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, idx, concept_ids=ids, concept_mask=mask)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, atol=0.05, rtol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["cocomix", "pause"])
def test_forward_traces_as_one_graph(mode):
    """torch.compile(fullgraph=True) refuses graph breaks: no host syncs (.item()) in the forward."""
    model = _model(mode)
    idx, ids, mask = _batch()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    kw = dict(concept_ids=ids, concept_mask=mask) if mode == "cocomix" else {}
    assert_close(compiled(idx, idx, **kw).loss, model(idx, idx, **kw).loss)


def test_prediction_without_mixing_is_the_ntp_network_plus_a_concept_loss():
    """concept_mix=False (the paper's 'prediction only' ablation): the forward is exactly the NTP network's,
    and the concept loss reads the layer-normalised state before insert_layer and trains only the layers
    below it."""
    idx, ids, mask = _batch()
    targets = torch.roll(idx, -1, 1)
    model = _model(concept_mix=False)
    assert not hasattr(model.concept, "comp_weight")  # nothing to compress: no parameters for it
    ntp = GPT(GPTConfig(**{**CFG, "n_concepts": 0}, mode="ntp")).eval()
    ntp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("concept.")})
    out = model(idx, targets, concept_ids=ids, concept_mask=mask)
    assert_close(out.logits, ntp(idx).logits)
    seen = {}
    model.transformer.h[CFG["insert_layer"]].register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    model(idx)
    h = seen["h"]
    mu, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)
    z = model.concept.head((h - mu) / (std + 1e-5) - model.concept.pre_bias)
    assert_close(out.aux_loss, _reference_concept_loss(z, ids, mask))
    assert_close(out.loss, out.ntp_loss + 0.1 * out.aux_loss)
    model.zero_grad()
    out.aux_loss.backward()
    below = model.transformer.h[0].mlp.c_fc.weight.grad
    above = model.transformer.h[CFG["insert_layer"]].mlp.c_fc.weight.grad
    assert below is not None and below.abs().sum() > 0 and (above is None or above.abs().sum() == 0)


def test_mixing_without_prediction_trains_the_head_through_the_mix_only():
    """concept_lambda=0 (the paper's 'mixing only' ablation): the loss is the NTP loss, and the concept head
    still learns, through the TopK values it contributes to the interleaved vector."""
    idx, ids, mask = _batch()
    targets = torch.roll(idx, -1, 1)
    model = _model(concept_lambda=0.0)
    out = model(idx, targets, concept_ids=ids, concept_mask=mask)
    assert out.loss.item() == out.ntp_loss.item() and out.aux_loss.item() > 0
    out.loss.backward()
    assert model.concept.head.weight.grad.abs().sum() > 0
    assert model.concept.comp_weight.grad.abs().sum() > 0
