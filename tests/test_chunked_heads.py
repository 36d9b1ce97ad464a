"""Chunked wide heads (trainer/chunked.py, issue #14): equal to the unchunked computation, bit-identical
to the code before chunking when one chunk holds the batch, and no (tokens, width) tensor kept for backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer import chunked
from trainer.config import demo
from trainer.model import GPT, GPTConfig, Steering, interleave, layer_norm_stats

V, C, K, KT = 64, 256, 4, 5  # vocab, concepts, concept labels, teacher top-K
B, T = 2, 16
CFG = dict(vocab_size=V, block_size=T, n_layer=3, n_head=2, n_embd=32, n_concepts=C, insert_layer=1, k_concept=8)
VARIANTS = {  # name -> (mode, GPTConfig changes)
    "cocomix": ("cocomix", {}),
    "cocomix-no-mix": ("cocomix", dict(concept_mix=False)),
    "cocomix-lambda-0": ("cocomix", dict(concept_lambda=0.0)),
    "cocomix-narrow-concepts": ("cocomix", dict(n_concepts=32)),  # C < V: the LM head chunks alone
    "kd": ("kd", {}),
    "kd-temperature-2": ("kd", dict(kd_temperature=2.0, kd_alpha=0.3)),
    "ntp": ("ntp", {}),
    "pause": ("pause", {}),
}


def _model(name, seed=0):
    mode, changes = VARIANTS[name]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG, **changes}, mode=mode))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases and norms, so every parameter's gradient is checked
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(model, seed=0):
    """idx, targets with ignored (-1) positions, and the labels of the model's mode with gaps in them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -3:] = -1  # the end of a document
    targets[1, 4] = -1
    labels = {}
    if model.cfg.mode == "cocomix":
        n = model.cfg.n_concepts
        ids = torch.randint(0, n, (B, T, K), generator=g)
        mask = torch.rand(B, T, K, generator=g) > 0.3
        mask[1, 7] = False  # a position without any label
        labels = dict(concept_ids=torch.where(mask, ids, -1), concept_mask=mask)
    if model.cfg.mode == "kd":
        ids = torch.randint(0, V - KT, (B, T, 1), generator=g) + torch.arange(KT)  # distinct ids
        lp = torch.randn(B, T, KT + 1, generator=g).log_softmax(-1)[..., :-1]  # mass left for the tail
        ids[0, 2] = -1  # no teacher data at these positions
        ids[1, 9:11] = -1
        labels = dict(teacher_ids=ids, teacher_logprobs=lp)
    return idx, targets, labels


def _step(model, fn):
    """Loss parts and parameter gradients of one forward (fn(model) -> ModelOutput) and backward."""
    model.zero_grad(set_to_none=True)
    out = fn(model)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _widths(model):
    return [model.cfg.vocab_size] + ([model.cfg.n_concepts] if model.cfg.mode == "cocomix" else [])


# --- the one-chunk path is the code before chunking, bit for bit -------------------------------------

def _old_ntp_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def _old_concept_loss(z, ids, mask=None):
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    elif mask.dim() == ids.dim() - 1:
        mask = mask[..., None].expand_as(ids)
    safe_ids = torch.where(mask, ids, torch.zeros_like(ids))
    lse = torch.logsumexp(z.float(), dim=-1, keepdim=True)
    picked = z.gather(-1, safe_ids).float()
    ce = torch.where(mask, lse - picked, torch.zeros_like(picked))
    return ce.sum() / mask.sum().clamp(min=1)


def _old_kd_loss(logits, teacher_ids, teacher_logprobs, targets=None, temperature=1.0):
    B, T, V = logits.shape
    ok = (teacher_ids >= 0).all(-1)
    if targets is not None:
        ok = ok & (targets != -1)
    ids = teacher_ids.clamp(min=0).flatten(0, 1)
    t_lp = torch.where(ok[..., None], teacher_logprobs.float(), 0.0).flatten(0, 1)
    s = logits.float().flatten(0, 1) / temperature
    s_lp = torch.log_softmax(s, dim=-1)
    neg = torch.finfo(s_lp.dtype).min
    s_rest = torch.logsumexp(s_lp.scatter(-1, ids, neg), dim=-1, keepdim=True)
    empty = s_rest < neg / 2
    s_buckets = torch.cat([s_lp.gather(-1, ids), s_rest], dim=-1)
    t_rest = (1.0 - t_lp.exp().sum(-1, keepdim=True)).clamp(min=0.0).masked_fill(empty, 0.0)
    t_buckets = torch.cat([t_lp, t_rest.log()], dim=-1) / temperature
    t_logq = torch.log_softmax(t_buckets, dim=-1)
    t_p = t_logq.exp()
    kl_terms = torch.where(t_p > 0, t_p * (t_logq - s_buckets), torch.zeros_like(t_p))
    kl = kl_terms.sum(-1).view(B, T)
    kl = torch.where(ok, kl, torch.zeros_like(kl))
    return temperature**2 * kl.sum() / ok.sum().clamp(min=1)


def _old_mixer(mx, h, steer):
    x, mu, std = layer_norm_stats(h)
    z = mx.head(x - mx.pre_bias)
    z_used = steer.apply(z) if steer is not None else z
    if not mx.mix:
        return h, z, z_used
    vals, idx = z_used.topk(mx.k, dim=-1)
    Bh, Th, k = idx.shape
    weights = vals.reshape(-1, k).to(mx.comp_weight.dtype)
    c = F.embedding_bag(idx.reshape(-1, k), mx.comp_weight, per_sample_weights=weights, mode="sum")
    c = ((c.view(Bh, Th, -1) + mx.comp_bias) + mx.pre_bias) * std + mu
    return interleave(h, c.to(h.dtype)), z, z_used


def _old_forward(model, idx, targets, concept_ids=None, concept_mask=None, teacher_ids=None,
                 teacher_logprobs=None, steer=None):
    """GPT.forward and GPT._losses as they were before chunking (commit 8873543), op for op."""
    cfg, tr = model.cfg, model.transformer
    Bx, Tx = idx.shape
    pos = tr.wpe(torch.arange(Tx, device=idx.device))
    h = tr.drop(tr.wte(idx) + pos)
    if model.pause is not None:
        h = interleave(h, tr.drop((model.pause + pos).expand(Bx, Tx, -1)))
    z = z_used = None
    for i, block in enumerate(tr.h):
        if model.concept is not None and i == cfg.insert_layer:
            h, z, z_used = _old_mixer(model.concept, h, steer)
        h = block(h)
    if model.pause is not None or (model.concept is not None and cfg.concept_mix):
        h = h[:, 1::2]
    logits = model.lm_head(tr.ln_f(h))
    ntp = _old_ntp_loss(logits, targets)
    if cfg.mode == "cocomix" and concept_ids is not None:
        aux = _old_concept_loss(z, concept_ids, concept_mask)
        return logits, ntp + cfg.concept_lambda * aux, ntp, aux, z_used
    if cfg.mode == "kd" and teacher_ids is not None:
        aux = _old_kd_loss(logits, teacher_ids, teacher_logprobs, targets, cfg.kd_temperature)
        return logits, (1 - cfg.kd_alpha) * ntp + cfg.kd_alpha * aux, ntp, aux, None
    return logits, ntp, ntp, None, z_used


class _Out:
    def __init__(self, parts):
        self.logits, self.loss, self.ntp_loss, self.aux_loss, self.concept_logits = parts


def test_demo_and_study_shapes_take_the_one_chunk_path():
    """The demo and the study (16 x 256 tokens, vocab 8192, 3072 concepts) run the unchunked code; the
    gpt2-69m micro-batch (16 x 1024 tokens, V 50257, C 32768) is chunked."""
    tc = demo()
    tokens = tc.batch_size * tc.block_size
    assert tokens == 4096
    assert chunked.one_chunk(tokens, 8192) and chunked.one_chunk(tokens, 3072)
    assert not chunked.one_chunk(16 * 1024, 50257) and not chunked.one_chunk(16 * 1024, 32768)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_chunk_is_bit_identical_to_the_code_before_chunking(name):
    model = _model(name)
    idx, targets, labels = _batch(model)
    steer = Steering.from_dict({3: 0.0, 5: 2.0}, C) if model.cfg.mode == "cocomix" else None
    # the smallest budget that still holds the batch in one chunk, and the default one
    for budget in (B * T * max(_widths(model)), chunked.CHUNK_ELEMENTS):
        new, new_grads = _step(model, lambda m, b=budget: m(idx, targets, **labels, steer=steer, chunk_elements=b))
        old, old_grads = _step(model, lambda m: _Out(_old_forward(m, idx, targets, **labels, steer=steer)))
        for a, b in zip(new, (old.logits, old.loss, old.ntp_loss, old.aux_loss, old.concept_logits), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        assert new_grads.keys() == old_grads.keys()
        assert all(torch.equal(new_grads[n], old_grads[n]) for n in new_grads), name


# --- several chunks: the same results as one ---------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("tokens_per_chunk", [1, 7, 20])
def test_chunked_equals_unchunked(name, tokens_per_chunk):
    """Uneven chunks (32 tokens in 7s and 20s); the budget is in elements, so at 7 x C the LM head's
    chunks are V / C times longer, and at 20 x C it may fit one chunk while the concept head does not."""
    model = _model(name)
    idx, targets, labels = _batch(model)
    budget = tokens_per_chunk * max(_widths(model))
    assert not all(chunked.one_chunk(B * T, w, budget) for w in _widths(model))
    ref, ref_grads = _step(model, lambda m: m(idx, targets, **labels))
    out, grads = _step(model, lambda m: m(idx, targets, **labels, chunk_elements=budget))
    for part in ("loss", "ntp_loss", "aux_loss"):
        assert_close(getattr(out, part), getattr(ref, part))
    assert (out.aux_loss is None) == (model.cfg.mode not in ("cocomix", "kd"))
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close(grads[n], ref_grads[n], msg=lambda m, n=n: f"{name} {n}: {m}")


def test_chunked_steering_equals_unchunked():
    model = _model("cocomix")
    idx, targets, labels = _batch(model)
    steer = Steering.from_dict({3: 0.0, 5: 4.0}, C, adds={9: 1.0})
    ref, ref_grads = _step(model, lambda m: m(idx, targets, **labels, steer=steer))
    out, grads = _step(model, lambda m: m(idx, targets, **labels, steer=steer, chunk_elements=5 * C))
    assert_close(out.loss, ref.loss)
    for n in grads:
        assert_close(grads[n], ref_grads[n])


def test_chunked_output_has_no_wide_logits_and_inference_is_unchunked():
    model = _model("cocomix")
    idx, targets, labels = _batch(model)
    out = model(idx, targets, **labels, chunk_elements=4 * C)
    assert out.logits is None and out.concept_logits is None
    free = model(idx, chunk_elements=4 * C)  # no targets: generation, evaluation, steering read the logits
    assert free.logits.shape == (B, T, V) and free.concept_logits.shape == (B, T, C)


def test_chunked_bf16_autocast_matches_unchunked():
    model = _model("kd")
    idx, targets, labels = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(idx, targets, **labels)
        out = model(idx, targets, **labels, chunk_elements=5 * V)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, atol=0.02, rtol=0)


@pytest.mark.parametrize("name", ["cocomix", "kd"])
def test_chunked_forward_traces_as_one_graph(name):
    """The paper presets compile the model, and their micro-batches take the chunked path."""
    model = _model(name)
    idx, targets, labels = _batch(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(idx, targets, **labels, chunk_elements=6 * C)
    assert_close(out.loss, model(idx, targets, **labels).loss)
    out.loss.backward()


# --- what backward keeps ------------------------------------------------------------------------------

def _saved_wide(model, fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves for backward whose last dimension is a head's width (V or C).
    Inside a checkpoint, the checkpoint's own hooks take the saves: only what it keeps is seen here."""
    wide, seen = set(_widths(model)), []

    def pack(t):
        if t.dim() and t.shape[-1] in wide:
            seen.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(model).loss.backward()
    return seen


@pytest.mark.parametrize("name", ["cocomix", "kd", "ntp"])
def test_chunked_backward_keeps_no_wide_tensor(name):
    model = _model(name)
    idx, targets, labels = _batch(model)
    assert _saved_wide(model, lambda m: m(idx, targets, **labels))  # unchunked: the logits are kept
    budget = 4 * C  # both heads chunked: 4 concept tokens, 16 LM tokens per chunk
    assert not any(chunked.one_chunk(B * T, w, budget) for w in _widths(model))
    assert _saved_wide(model, lambda m: m(idx, targets, **labels, chunk_elements=budget)) == []
