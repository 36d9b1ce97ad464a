"""Bad input to every command: wrong types, missing files, mismatched stores (token store A with labels of
B, another window, another tokenizer), out-of-range concept ids, damaged checkpoints. Each gets one
`error:` line and exit code 2 (validation failures: one line per problem and exit code 1), never a
traceback, and writes nothing: no store is touched and no output or temporary folder is left.

Option-parsing errors (a word where a number goes) are Click's: exit code 2 and its usage block, whose
message names the option."""

import json
import shutil
from types import SimpleNamespace

import pytest
from test_extract_checks import make_token_store

from .faultkit import TRAIN, cli, mtimes, no_traceback, refusal, synthetic_labels, tree

MODEL = ["--set", "eval_windows=0", "--max-tokens", 2 * 4 * 16]


@pytest.fixture(scope="module")
def c(world, synthetic, tmp_path_factory):
    """Paths of the world plus the mismatched stores and runs the cases need."""
    root = tmp_path_factory.mktemp("bad")
    tok_b = shutil.copytree(world / "tokens" / "tokenizer", root / "tokenizer_b")
    spec = json.loads((tok_b / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzz_other"] = 299  # another vocabulary, so another tokenizer fingerprint
    (tok_b / "tokenizer.json").write_text(json.dumps(spec))
    make_token_store(root / "tokens_b", tok_b, n_docs=40, seed=1)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    make_token_store(root / "tokens_a2", world / "tokens" / "tokenizer", n_docs=60, seed=2)  # same one, other text
    synthetic_labels(root / "labels_a2", root / "tokens_a2")
    synthetic_labels(root / "labels_w8", world / "tokens", window=8)
    synthetic_labels(root / "labels_oor", world / "tokens", id_high=140)  # ids up to 139, 96 latents
    for mode in ("ntp", "cocomix"):
        r = cli("train", *TRAIN, "--mode", mode, "--tokens", world / "tokens", "--labels", synthetic,
                "--out", root / mode, *MODEL)
        assert r.exit_code == 0, r.output
    bad = shutil.copytree(root / "ntp", root / "ntp_truncated")
    for f in (bad / "checkpoints").glob("*/*"):
        f.write_bytes(f.read_bytes()[:200])  # a partial copy: every file of every checkpoint cut short
    return SimpleNamespace(root=root, tokens=world / "tokens", teacher=world / "teacher", sae=world / "sae_ckpt",
                           tok=world / "tokens" / "tokenizer", labels=synthetic, corpus=root / "corpus.jsonl",
                           **{p.name: p for p in root.iterdir() if p.is_dir()})


E = "error"  # one error line, exit 2
V = "validate"  # validation problems: exit 1, each problem one stdout line
U = "usage"  # Click's option parsing: exit 2, its usage block names the option
CASES = {
    # tokenize
    "tokenize-missing-input": (E, lambda c, t: ["tokenize", "--input", t / "none.jsonl", "--tokenizer", c.tok, "--out", t / "o"],
                               "input", "none.jsonl does not exist"),
    "tokenize-wrong-input-type": (E, lambda c, t: ["tokenize", "--input", c.tok / "tokenizer.json", "--out", t / "o",
                                                   "--tokenizer", c.tok], "unknown file type"),
    "tokenize-missing-tokenizer": (E, lambda c, t: ["tokenize", "--input", c.corpus, "--out", t / "o",
                                                    "--tokenizer", t / "none"], "cannot load tokenizer"),
    "tokenize-val-fraction": (E, lambda c, t: ["tokenize", "--input", c.corpus, "--tokenizer", c.tok, "--out", t / "o",
                                               "--val-fraction", 2], "--val-fraction 2.0: must be in [0, 1)"),
    "tokenize-val-fraction-type": (U, lambda c, t: ["tokenize", "--input", c.corpus, "--out", t / "o",
                                                    "--val-fraction", "half"], "'--val-fraction'"),
    "tokenize-out-is-label-store": (E, lambda c, t: ["tokenize", "--input", c.corpus, "--tokenizer", c.tok,
                                                     "--out", c.labels], "exists and is not a token store"),
    # sae
    "sae-train-missing-tokens": (E, lambda c, t: ["sae", "train", "--teacher", c.teacher, "--tokens", t / "none",
                                                  "--layer", 1, "--out", t / "s"], "is not a cocomix.token_store"),
    "sae-train-out-is-token-store": (E, lambda c, t: ["sae", "train", "--teacher", c.teacher, "--tokens", c.tokens,
                                                      "--layer", 1, "--out", c.tokens_a2, "--window", 16,
                                                      "--tokens-budget", 512, "--eval-windows", 0],
                                     "exists and is not a cocomix SAE checkpoint"),
    "sae-train-layer-type": (U, lambda c, t: ["sae", "train", "--teacher", c.teacher, "--tokens", c.tokens,
                                              "--layer", "one", "--out", t / "s"], "'--layer'"),
    "sae-info-missing": (E, lambda c, t: ["sae", "info", t / "none"], "cannot load an SAE", "no such file"),
    "sae-info-token-store": (E, lambda c, t: ["sae", "info", c.tokens], "cannot load an SAE", "has no cfg.json"),
    "sae-eval-missing-tokens": (E, lambda c, t: ["sae", "eval", c.sae, "--teacher", c.teacher, "--tokens", t / "none",
                                                 "--layer", 1], "is not a cocomix.token_store"),
    "sae-eval-no-layer": (E, lambda c, t: ["sae", "eval", c.sae, "--teacher", c.teacher, "--tokens", c.tokens],
                          "does not record its hook layer; pass --layer"),
    # extract
    "extract-missing-tokens": (E, lambda c, t: extract(c, t, "--tokens", t / "none"), "is not a cocomix.token_store"),
    "extract-tokens-is-label-store": (E, lambda c, t: extract(c, t, "--tokens", c.labels), "kind='cocomix.label_store'"),
    "extract-window-too-long": (E, lambda c, t: extract(c, t, "--window", 128), "longer than the teacher's context (64)"),
    "extract-other-tokenizer": (E, lambda c, t: extract(c, t, "--tokens", c.tokens_b), "the teacher's tokenizer",
                                "differs from the token store's"),
    "extract-out-other-window": (E, lambda c, t: extract(c, t, "--out", c.labels, "--window", 8),
                                 "holds a different label store"),
    "extract-out-is-token-store": (E, lambda c, t: extract(c, t, "--out", c.tokens_a2), "is not a cocomix.label_store"),
    "extract-batch-windows": (E, lambda c, t: extract(c, t, "--batch-windows", 0), "--batch-windows must be at least 1"),
    "extract-layer-type": (U, lambda c, t: extract(c, t, "--layer", "one"), "'--layer'"),
    # shards
    "shards-info-missing": (E, lambda c, t: ["shards", "info", t / "none"], "is not a cocomix store"),
    "shards-head-n": (E, lambda c, t: ["shards", "head", c.labels, "--n", 0], "--n must be positive"),
    "shards-head-other-tokens": (E, lambda c, t: ["shards", "head", c.labels, "--tokens", c.tokens_a2],
                                 "pass the token store the labels were made from"),
    "shards-validate-other-tokens": (V, lambda c, t: ["shards", "validate", c.labels, "--tokens", c.tokens_a2],
                                     "labels are for token store"),
    "shards-validate-id-range": (V, lambda c, t: ["shards", "validate", c.labels_oor], ">= n_latents 96"),
    "shards-stats-token-store": (E, lambda c, t: ["shards", "stats", c.tokens], "this command needs a label store"),
    "shards-stats-id-range": (E, lambda c, t: ["shards", "stats", c.labels_oor], "a concept id >= n_latents (96)"),
    "shards-export-to": (E, lambda c, t: ["shards", "export", c.labels, "--to", "csv", "--out", t / "e"],
                         "--to 'csv': choose parquet or zarr"),
    "shards-export-out-exists": (E, lambda c, t: ["shards", "export", c.labels, "--to", "zarr", "--out", c.tokens_a2],
                                 "already exists"),
    # concepts
    "concepts-top-missing": (E, lambda c, t: ["concepts", "top", t / "none"], "this command needs a label store"),
    "concepts-top-id-range": (E, lambda c, t: ["concepts", "top", c.labels_oor], "a concept id >= n_latents (96)"),
    "concepts-describe-id": (E, lambda c, t: ["concepts", "describe", c.labels, 500, "--tokens", c.tokens],
                             "concept 500 is out of range"),
    "concepts-describe-other-tokens": (E, lambda c, t: ["concepts", "describe", c.labels, 3, "--tokens", c.tokens_a2],
                                       "pass the token store the labels were made from"),
    "concepts-describe-id-type": (U, lambda c, t: ["concepts", "describe", c.labels, "seven"], "'ID'"),
    # train
    "train-missing-tokens": (E, lambda c, t: train(c, t, "--tokens", t / "none"), "is not a cocomix.token_store"),
    "train-labels-of-other-tokens": (E, lambda c, t: train(c, t, "--labels", c.labels_a2), "was made from token store",
                                     "use the labels of this token store"),
    "train-other-window": (E, lambda c, t: train(c, t, "--labels", c.labels_w8), "set block_size=8"),
    "train-id-range": (E, lambda c, t: train(c, t, "--labels", c.labels_oor), "holds concept id",
                       ">= its 96 latents"),
    "train-set-type": (E, lambda c, t: train(c, t, "--set", "lr=fast"), "lr takes a float, got 'fast'"),
    "train-max-tokens-type": (U, lambda c, t: train(c, t, "--max-tokens", "lots"), "'--max-tokens'"),
    "train-out-is-store": (E, lambda c, t: train(c, t, "--out", c.tokens_a2), "is not a run folder"),
    "train-resume-truncated": (E, lambda c, t: ["train", *TRAIN, "--mode", "ntp", "--tokens", c.tokens, "--out",
                                                c.ntp_truncated, *MODEL], "is not a readable checkpoint"),
    # eval, export-hf, compare, generate
    "eval-missing": (E, lambda c, t: ["eval", t / "none", "--tokens", c.tokens], "neither a checkpoint nor a run folder"),
    "eval-other-tokenizer": (E, lambda c, t: ["eval", c.ntp, "--tokens", c.tokens_b], "was trained with"),
    "eval-batch-size": (E, lambda c, t: ["eval", c.ntp, "--tokens", c.tokens, "--batch-size", 0],
                        "--batch-size must be at least 1"),
    "eval-device": (E, lambda c, t: ["eval", c.ntp, "--tokens", c.tokens, "--device", "tpu"], "is not a torch device"),
    "eval-truncated-checkpoint": (E, lambda c, t: ["eval", c.ntp_truncated, "--tokens", c.tokens],
                                  "is not a readable checkpoint", "to use the one before it"),
    "export-hf-cocomix": (E, lambda c, t: ["export-hf", c.cocomix, "--out", t / "hf"], "is a cocomix model"),
    "export-hf-out-is-token-store": (E, lambda c, t: ["export-hf", c.ntp, "--out", c.tokens_a2],
                                     "is not a transformers model folder"),
    "export-hf-other-tokenizer": (E, lambda c, t: ["export-hf", c.ntp, "--out", t / "hf", "--tokens", c.tokens_b],
                                  "uses another tokenizer"),
    "compare-not-a-run": (E, lambda c, t: ["compare", c.tokens, "--out", t / "cmp"], "is not a training run"),
    "generate-missing": (E, lambda c, t: ["generate", t / "none", "--prompt", "hi"], "neither a checkpoint"),
    "generate-steer-type": (E, lambda c, t: ["generate", c.cocomix, "--prompt", "hi", "--steer", "loud"],
                            "--steer takes ID=SCALE"),
    "generate-missing-tokenizer": (E, lambda c, t: ["generate", c.ntp, "--prompt", "hi", "--tokenizer", t / "none"],
                                   "no tokenizer at"),
    "generate-negative": (E, lambda c, t: ["generate", c.ntp, "--prompt", "hi", "--max-new-tokens", -1],
                          "must not be negative"),
}


def extract(c, t, *over):
    args = {"--tokens": c.tokens, "--teacher": c.teacher, "--sae": c.sae, "--layer": 1, "--window": 16,
            "--out": t / "labels"}
    over_d = dict(zip(over[::2], over[1::2], strict=True))
    return ["extract", *[x for kv in (args | over_d).items() for x in kv], "--no-progress"]


def train(c, t, *over):
    args = {"--tokens": c.tokens, "--labels": c.labels, "--out": t / "run"}
    over_d = dict(zip(over[::2], over[1::2], strict=True))
    return ["train", *TRAIN, *MODEL, *[x for kv in (args | over_d).items() for x in kv]]  # the last option wins


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, c, world, tmp_path):
    kind, args, *fragments = CASES[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    stores = {root: (tree(root), mtimes(root)) for root in (world, c.root)}
    r = cli(*args(c, scratch))
    if kind == E:
        refusal(r, 2, *fragments)
    elif kind == V:
        no_traceback(r)
        assert r.exit_code == 1 and r.stderr.strip().endswith("problem(s)"), r.output
        assert all(fragments[0] in line for line in r.stdout.splitlines()), r.stdout
    else:
        no_traceback(r)
        line = r.stderr.strip()
        assert r.exit_code == 2 and "\n" not in line and line.startswith("error: "), r.output  # one line
        assert f"Invalid value for {fragments[0]}" in line and "--help" in line, r.output
    assert {root: (tree(root), mtimes(root)) for root in stores} == stores  # no store touched
    left = tree(scratch)
    if case == "train-id-range":  # refused at the first batch holding such an id: the run never checkpointed
        assert left == {"run", "run/config.json", "run/metrics.jsonl"}
    else:
        assert left == set(), left
