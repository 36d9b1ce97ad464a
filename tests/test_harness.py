"""The lm-eval adapter: an NTP student scores what lm-eval's own `hf` model scores on its GPT2LMHeadModel export,
its rolling log-likelihood is `cocomix eval`'s loss on the same tokens, CoCoMix and pause students score
continuations with their own forward (padding and batching change nothing, appending text changes no earlier
score), generation matches GPT.generate, and bad input is refused in one line."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TEXT
from test_data import make_label_store, make_token_store
from torch.testing import assert_close

from storage_schemas import TokenStoreWriter, UserError
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.train import train

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports `datasets`, which reads it once
pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402

from trainer.harness import CocomixLM  # noqa: E402

W = 16
CONTEXTS = [TEXT[0], TEXT[1][:40], TEXT[2] + " " + TEXT[3], "Emma", TEXT[3][:60] + " "]
CONTINUATIONS = [" It is a truth", " interpreter", ", handsome.", " Woodhouse", "items"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("harness")
    ts = make_token_store(root / "tokens", tokenizer_dir)
    return root, ts, make_label_store(root / "labels", ts, teacher_k=4)


@pytest.fixture(scope="module")
def students(stores):
    """One tiny student per mode, trained a few steps (trained weights, so scores are not uniform)."""
    root, ts, ls = stores
    out = {}
    for mode in ("ntp", "cocomix", "pause", "kd"):
        cfg = TrainConfig(tokens=str(ts.path), labels=str(ls.path), out=str(root / mode), mode=mode, block_size=W,
                          n_layer=2, n_head=2, n_embd=32, insert_layer=1, k_concept=8, batch_size=4, grad_accum=1,
                          max_tokens=12 * 4 * W, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=12,
                          eval_windows=2, log_interval=6, ckpt_interval=12, device="cpu")
        out[mode] = train(cfg)
    return out


def loglikelihood_requests(contexts=CONTEXTS, continuations=CONTINUATIONS):
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(zip(contexts, continuations,
                                                                                      strict=True))]


def fit(lm: CocomixLM, context: str, continuation: str) -> str:
    """The end of `context` that leaves context + continuation inside the window (nothing truncated)."""
    while len(lm.tok_encode(context + continuation)) > W:
        context = context[1:]
    return context


def own_forward_score(lm: CocomixLM, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it) from one unbatched forward of the student."""
    ctx, cont = lm._encode_pair(context, continuation) if context else ([lm.prefix_token_id],
                                                                        lm.tok_encode(continuation))
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = lm.model(ids).logits[0].double().log_softmax(-1)  # (T, V)
    n = len(cont)
    return logp[len(ctx) - 1 : len(ctx) - 1 + n].gather(-1, torch.tensor(cont)[:, None]).sum().item()


def test_ntp_student_matches_lm_eval_hf_model_on_its_export(students, stores, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from trainer.checkpoint import load_model
    from trainer.model import export_hf

    _, ts, _ = stores
    model, _ = load_model(students["ntp"])
    export_hf(model, tmp_path / "hf", ts.tokenizer_dir, eos_id=ts.eos_id)
    ours = CocomixLM(checkpoint=str(students["ntp"]), batch_size=3)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=3)
    assert ours.max_length == theirs.max_length == W  # so both truncate the long contexts the same way
    requests = loglikelihood_requests()
    assert any(len(ours.tok_encode(c + x)) > W + 1 for c, x in zip(CONTEXTS, CONTINUATIONS, strict=True))
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert_close(torch.tensor([x for x, _ in a]), torch.tensor([x for x, _ in b]), rtol=1e-5, atol=1e-5)
    assert [g for _, g in a] == [g for _, g in b]
    text = [Instance("loglikelihood_rolling", {}, (" ".join(TEXT[:5]),), 0), Instance("loglikelihood_rolling", {},
                                                                                     (TEXT[2],), 1)]
    assert_close(torch.tensor(ours.loglikelihood_rolling(text)), torch.tensor(theirs.loglikelihood_rolling(text)),
                 rtol=1e-5, atol=1e-4)
    print(f"\nhf parity, max abs diff: loglikelihood "
          f"{max(abs(x - y) for (x, _), (y, _) in zip(a, b, strict=True)):.2e}")


def store_of_text(path, tokenizer_dir, ids: list[int], eos: int):
    """A token store whose val split is [eos] + ids + [eos]: the lone eos (an empty document) is the harness's
    prefix token, so the store's windows of W are exactly the harness's rolling windows over ids."""
    w = TokenStoreWriter(path, dtype="uint16", eos_id=eos, vocab_size=300, tokenizer_dir=tokenizer_dir)
    w.add_document("train", np.asarray(ids[: 2 * W]))
    w.add_document("val", np.asarray([], np.int64))
    w.add_document("val", np.asarray(ids))
    w.finish({"sources": ["test"]})


@pytest.mark.parametrize("mode", ["ntp", "cocomix"])
def test_rolling_loglikelihood_is_cocomix_eval_loss_on_the_same_tokens(students, tokenizer_dir, tmp_path, mode):
    lm = CocomixLM(checkpoint=str(students[mode]), batch_size=4)
    ids = lm.tok_encode(" ".join(TEXT[:8]))
    n = len(ids) // W
    while lm.tok_encode(lm.tok_decode(ids[: n * W])) != ids[: n * W]:  # a cut that re-encodes to itself
        n -= 1
    text = lm.tok_decode(ids[: n * W])
    store_of_text(tmp_path / "tokens", tokenizer_dir, ids[: n * W], lm.eot_token_id)
    r = evaluate(students[mode], tmp_path / "tokens", batch_size=4)
    assert r["windows"] == n and r["predicted_tokens"] == n * W
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert_close(-rolling / (n * W), r["loss"], rtol=1e-6, atol=1e-6)
    print(f"\n{mode} rolling vs eval: {abs(-rolling / (n * W) - r['loss']):.2e} nats/token over {n * W} tokens")


@pytest.mark.parametrize("mode", ["cocomix", "pause", "kd"])
def test_every_mode_scores_continuations_with_its_own_forward(students, mode):
    lm = CocomixLM(checkpoint=str(students[mode]), batch_size=2)  # batches mix lengths: padding is exercised
    short = [fit(lm, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS, strict=True)]
    requests = loglikelihood_requests(short)
    got = [lp for lp, _ in lm.loglikelihood(requests)]
    want = [own_forward_score(lm, c, x) for c, x in zip(short, CONTINUATIONS, strict=True)]
    assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([lm.tok_encode(TEXT[2])[:W]])
    with torch.no_grad():
        whole, prefix = lm.model(ids).logits, lm.model(ids[:, : W // 2]).logits
    assert_close(whole[:, : W // 2], prefix, rtol=1e-5, atol=1e-5)  # appending changes no earlier score
    print(f"\n{mode} own forward, max abs diff: {max(abs(a - b) for a, b in zip(got, want, strict=True)):.2e}")


def test_greedy_match_is_whether_argmax_reproduces_the_continuation(students):
    lm = CocomixLM(checkpoint=str(students["cocomix"]))
    ctx = lm.tok_encode(TEXT[0][:30])
    with torch.no_grad():
        best = lm.model.generate(torch.tensor([ctx]), 3, temperature=0)[0, len(ctx):].tolist()
    worse = best[:2] + [(best[2] + 1) % 300]
    (_, g1), (_, g2) = lm._loglikelihood_tokens([(None, ctx, best), (None, ctx, worse)])
    assert g1 and not g2


def test_generate_until_is_gpt_generate_cut_at_the_stop_string(students):
    lm = CocomixLM(checkpoint=str(students["pause"]), batch_size=2)
    contexts = [TEXT[0][:25], TEXT[1][:50], TEXT[3][:10]]
    reqs = [Instance("generate_until", {}, (c, {"until": ["zz-never"], "max_gen_toks": 20}), i)
            for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs)
    for c, text in zip(contexts, got, strict=True):
        ids = lm.tok_encode(c)
        with torch.no_grad():
            new = lm.model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
        if lm.eot_token_id in new:
            new = new[: new.index(lm.eot_token_id) + 1]
        assert text == lm.tok_decode(new)
    stop = got[0][len(got[0]) // 2 :][:2]  # a string the first generation contains: it is cut there
    cut = lm.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 20}), 0)])
    assert stop and cut[0] == got[0].split(stop)[0]


def test_bad_model_arguments_are_refused_in_one_line(students, stores, tmp_path):
    with pytest.raises(UserError, match="is neither a checkpoint nor a run folder"):
        CocomixLM(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no tokenizer at"):
        CocomixLM(checkpoint=str(students["ntp"]), tokenizer=str(tmp_path))
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    tok = json.loads((stores[1].tokenizer_dir / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: (v + 1) % len(tok["model"]["vocab"]) for k, v in tok["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="was trained with"):
        CocomixLM(checkpoint=str(students["ntp"]), tokenizer=str(other))
    with pytest.raises(UserError, match="unknown --model_args for cocomix: pretrained"):
        CocomixLM(checkpoint=str(students["ntp"]), pretrained="gpt2")
    assert math.isfinite(CocomixLM(checkpoint=str(students["kd"])).loglikelihood(loglikelihood_requests())[0][0])
