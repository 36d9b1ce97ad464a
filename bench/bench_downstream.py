"""Downstream scoring throughput: the lm-eval adapter against `cocomix eval`, side by side on the same tokens.

The demo student's sizes (4 layers, d 128, window 256, the demo tokenizer's 8k vocabulary; CoCoMix with 3072
concepts before block 1, and NTP), random weights (speed does not depend on them). The text is the longest
validation document of the shipped offline tasks (data/tasks/cocomix_ppl.jsonl), cut to whole windows.

- `eval`: trainer.evaluate.eval_loss over a token store holding exactly those tokens (what `cocomix eval` runs);
- `adapter`: trainer.harness.CocomixLM.loglikelihood_rolling on the text (tokenization included), which lm-eval
  calls for the WikiText-style task; the test suite shows both give the same loss on these windows.

Target: adapter >= 0.5x eval in scored tokens per second.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "demo" / "teacher"
TEXTS = REPO / "data" / "tasks" / "cocomix_ppl.jsonl"
N_WINDOWS, BATCH, REPEATS, TARGET = 48, 16, 3, 0.5


def bench_text(tok, window: int) -> tuple[str, list[int]]:
    """The longest validation document, cut to N_WINDOWS whole windows at a point that re-encodes to itself."""
    text = max((json.loads(line)["text"] for line in TEXTS.read_text().splitlines()), key=len)
    ids = tok.encode(text, add_special_tokens=False)
    n = min(N_WINDOWS, len(ids) // window) * window
    while tok.encode(tok.decode(ids[:n]), add_special_tokens=False) != ids[:n]:
        n -= window
    return tok.decode(ids[:n]), ids[:n]


def make_store(root: Path, ids: list[int], eos: int, vocab: int):
    """Val split = [eos] + ids + [eos]: the eos is the harness's prefix, so both score the same windows."""
    from storage_schemas import TokenStore, TokenStoreWriter

    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, tok_dir / name)
    w = TokenStoreWriter(root / "tokens", dtype="uint16", eos_id=eos, vocab_size=vocab, tokenizer_dir=tok_dir)
    w.add_document("train", np.asarray(ids[:256]))
    w.add_document("val", np.asarray([], np.int64))
    w.add_document("val", np.asarray(ids))
    w.finish({"sources": ["bench"]})
    return TokenStore.open(root / "tokens")


def make_checkpoint(root: Path, mode: str, ts) -> Path:
    import torch

    from trainer import checkpoint
    from trainer.config import demo
    from trainer.model import GPT

    gcfg = replace(demo(), mode=mode, vocab_size=ts.vocab_size, n_concepts=3072 if mode == "cocomix" else 0
                   ).model_config()
    torch.manual_seed(0)
    model = GPT(gcfg).eval()
    meta = {"model": asdict(gcfg), "train": {"tokens": str(ts.path)}, "tokenizer_fingerprint": ts.tokenizer_fingerprint}
    return checkpoint.save(root / mode, 1, {}, keep=1, final_model=model, meta=meta)


def best_seconds(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed run on a shared machine


def rows_for(mode: str, root: Path, ts, text: str, n_tokens: int) -> list[tuple]:
    import torch
    from lm_eval.api.instance import Instance

    from trainer.data import WindowData
    from trainer.evaluate import eval_loss, eval_windows
    from trainer.harness import CocomixLM

    lm = CocomixLM(checkpoint=str(make_checkpoint(root, mode, ts)), batch_size=BATCH)
    data = WindowData(ts, "val", lm.max_length)
    windows = eval_windows(data.n_windows, data.n_windows)
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    t_eval = best_seconds(lambda: eval_loss(lm.model, data, windows, BATCH, torch.device("cpu")))
    t_adapter = best_seconds(lambda: lm.loglikelihood_rolling(request))
    ratio = t_eval / t_adapter
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    return [(f"{mode} eval", f"{n_tokens / t_eval:,.0f}", "tokens/s", f"`cocomix eval` loop, {n_tokens:,} tokens"),
            (f"{mode} adapter", f"{n_tokens / t_adapter:,.0f}", "tokens/s", "lm-eval loglikelihood_rolling"),
            (f"{mode} adapter / eval", f"{ratio:.2f}", "x", f"target >= {TARGET}x: {verdict}")]


def main(threads: int = 1) -> list[tuple]:
    """Rows (name, value, unit, note) for `make bench`; one thread, as the other benches."""
    import torch
    from transformers import AutoTokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="bench-downstream-"))
    try:
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        text, ids = bench_text(tok, 256)
        ts = make_store(root, ids, tok.eos_token_id, len(tok))
        return [r for mode in ("ntp", "cocomix") for r in rows_for(mode, root, ts, text, len(ids))]
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for row in main():
        print(" | ".join(map(str, row)))
