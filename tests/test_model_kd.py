"""KD loss over the teacher's stored top-K: exact when K == V, the tail bucket, ignored positions."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.losses import kd_loss
from trainer.model import GPT, GPTConfig

B, T, V = 2, 8, 50


def _logits(seed):
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * 2


def _full_kl(student, teacher, temperature):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), mean over positions: the textbook KD term."""
    t = (teacher / temperature).log_softmax(-1)
    s = (student / temperature).log_softmax(-1)
    return temperature**2 * (t.exp() * (t - s)).sum(-1).mean()


def _stored_topk(teacher, k):
    """What extraction stores: the top-K ids and their log-probabilities at temperature 1."""
    lp = teacher.log_softmax(-1)
    top = lp.topk(k, -1)
    return top.indices, top.values


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_k_equals_vocab_matches_full_teacher_logits(temperature):
    student, teacher = _logits(0), _logits(1)
    ids, lp = _stored_topk(teacher, V)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(2))  # order must not matter
    ids, lp = ids[..., perm], lp[..., perm]
    assert_close(kd_loss(student, ids, lp, temperature=temperature), _full_kl(student, teacher, temperature))


def test_k_equals_vocab_gradient_is_finite_and_exact():
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    ids, lp = _stored_topk(teacher, V)
    (g,) = torch.autograd.grad(kd_loss(student, ids, lp, temperature=2.0), student)
    (g_ref,) = torch.autograd.grad(_full_kl(student, teacher, 2.0), student)
    assert torch.isfinite(g).all()
    assert_close(g, g_ref)


def _bucket_reference(student, teacher, k):
    """K + 1 buckets in float64 with a Python loop over positions: the top-K ids and the rest."""
    total = 0.0
    for b in range(B):
        for t in range(T):
            p, q = teacher[b, t].double().softmax(-1), student[b, t].double().softmax(-1)
            top = p.topk(k).indices
            rest = torch.ones(V, dtype=torch.bool)
            rest[top] = False
            pb = torch.cat([p[top], p[rest].sum()[None]])
            qb = torch.cat([q[top], q[rest].sum()[None]])
            total += (pb * (pb / qb).log()).sum()
    return total / (B * T)


def test_small_k_matches_bucket_reference_and_is_bounded_by_full_kl():
    student, teacher = _logits(3), _logits(4)
    for k in (1, 5, 20):
        ids, lp = _stored_topk(teacher, k)
        loss = kd_loss(student, ids, lp)
        assert_close(loss.double(), _bucket_reference(student, teacher, k))
        # coarsening into buckets can only lose divergence (data-processing inequality)
        assert 0 <= loss <= _full_kl(student, teacher, 1.0)


def test_zero_when_student_matches_on_topk_and_tail_total():
    student, teacher = _logits(5), _logits(6)
    k = 5
    ids, lp = _stored_topk(teacher, k)
    s_lp = student.log_softmax(-1)
    assert kd_loss(student, ids, lp) > 0.1
    # the teacher's view of this student: its own top-K log-probs; the tail's shape is invisible
    assert_close(kd_loss(student, ids, s_lp.gather(-1, ids)), torch.tensor(0.0), atol=1e-6, rtol=0)
    # moving mass only inside the tail (outside the stored ids) leaves the loss unchanged
    tail = torch.ones(B, T, V, dtype=torch.bool).scatter(-1, ids, False)
    shuffled = student.clone()
    shuffled[tail] = student[tail].view(-1, V - k).flip(-1).flatten()
    assert_close(kd_loss(shuffled, ids, lp), kd_loss(student, ids, lp))


def test_tail_bucket_counts_teacher_mass_outside_topk():
    student = _logits(7)
    ids = torch.arange(3).expand(B, T, 3)
    lp_light = torch.full((B, T, 3), -3.0)  # top-3 hold 15% of the mass: 85% in the rest bucket
    lp_heavy = torch.full((B, T, 3), -1.0986)  # top-3 hold all the mass
    assert not torch.allclose(kd_loss(student, ids, lp_light), kd_loss(student, ids, lp_heavy))
    s = student.log_softmax(-1)
    rest_q = 1 - s[..., :3].exp().sum(-1)
    p = torch.full((3,), torch.tensor(-3.0).exp().item())
    expected = (p * (p.log() - s[..., :3])).sum(-1) + (1 - 3 * p[0]) * ((1 - 3 * p[0]).log() - rest_q.log())
    assert_close(kd_loss(student, ids, lp_light), expected.mean())


def test_ignored_positions_carry_no_loss_or_gradient():
    student, teacher = _logits(8).requires_grad_(), _logits(9)
    ids, lp = _stored_topk(teacher, 4)
    targets = torch.zeros(B, T, dtype=torch.long)
    targets[0, 2] = -1
    ids = ids.clone()
    ids[1, 5] = -1  # no teacher data here
    lp = lp.clone()
    lp[1, 5] = float("nan")
    loss = kd_loss(student, ids, lp, targets)
    (g,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and g[0, 2].abs().max() == 0 and g[1, 5].abs().max() == 0
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 2] = keep[1, 5] = False
    ref = kd_loss(student[keep][None], ids[keep][None], lp[keep][None])
    assert_close(loss, ref)


def test_kd_mode_combines_ntp_and_kd():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32, mode="kd",
                          kd_alpha=0.3, kd_temperature=2.0))
    idx = torch.randint(0, V, (B, T))
    ids, lp = _stored_topk(_logits(10), 6)
    out = model(idx, idx, teacher_ids=ids, teacher_logprobs=lp.half())
    assert_close(out.ntp_loss, F.cross_entropy(out.logits.flatten(0, 1), idx.flatten()))
    assert_close(out.aux_loss, kd_loss(out.logits, ids, lp.half(), idx, 2.0))
    assert_close(out.loss, 0.7 * out.ntp_loss + 0.3 * out.aux_loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
