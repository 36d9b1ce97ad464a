"""The Ray extraction job end to end: store complete and valid, equal to the kernel, idempotent rerun,
byte-identical resume, the lock, a failing unit isolated, KD arrays that leave the labels alone, and
label selections that are each their own label set."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_attribution import save_teacher, save_tiny_sae, tiny_gpt2, tiny_sae
from test_extract_checks import WINDOW, base_args, cli, make_token_store, refused

from pipeline.attribution import SELECTIONS, attribute
from pipeline.extract import ExtractConfig, plan
from storage_schemas import LabelStore, TokenStore, validate_store
from storage_schemas.io import chunk_file

pytestmark = pytest.mark.slow
LABELS = ("ids", "scores", "valid")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, _temp_dir=tmp,
             log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


RUN = {"--batch-windows": 2, "--chunk-windows": 3, "--threads": 1}  # one thread per worker: identical bits
KD = {"--store-teacher-topk": 5, "--store-sae-topk": None, "--format": "both", "--codec": "zstd"}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer_dir, ray_session):
    """One complete run with two workers, storing every optional array; later tests compare with it."""
    root = tmp_path_factory.mktemp("extract")
    make_token_store(root / "tokens", tokenizer_dir)
    save_teacher(tiny_gpt2(), root / "teacher", tokenizer_dir)
    save_tiny_sae(tiny_sae(normalize="layer_norm"), root / "sae")
    r = cli(*base_args(root, **{"--workers": 2, **RUN, **KD}))
    assert r.exit_code == 0, r.output
    return root


def chunk_bytes(store_dir: Path) -> dict[str, bytes]:
    return {str(f.relative_to(store_dir)): f.read_bytes() for f in sorted(store_dir.glob("*/*/c/**/*"))
            if f.is_file()}


def labels_of(path: Path) -> dict:
    store = LabelStore.open(path)
    return {(s, n): store.array(s, n).read_all() for s in ("train", "val") for n in LABELS}


def test_store_complete_valid_and_equal_to_kernel(job):
    store = LabelStore.open(job / "labels")
    assert store.complete and len(store.manifest["units"]) == sum(len(store.units(s)) for s in ("train", "val"))
    assert validate_store(job / "labels", job / "tokens") == []
    assert store.manifest["provenance"]["workers"] == 2
    assert len(list((job / "labels" / "parquet").glob("*.parquet"))) == len(store.manifest["units"])
    tokens, teacher = TokenStore.open(job / "tokens"), tiny_gpt2()
    from sae import load_sae

    sae = load_sae(job / "sae")
    for split in ("train", "val"):
        toks, n_win = tokens.tokens(split)[:], tokens.num_windows(split, WINDOW)
        win = torch.from_numpy(toks[: n_win * WINDOW].astype(np.int64)).view(n_win, WINDOW)
        ref = attribute(teacher, sae, 1, "resid_post_mlp", win, sae_k=8, teacher_k=5)
        rows = n_win * WINDOW
        assert np.array_equal(store.array(split, "ids")[:rows], ref.ids.flatten(0, 1).numpy())
        np.testing.assert_allclose(store.array(split, "scores")[:rows].astype(np.float32),
                                   ref.scores.flatten(0, 1).numpy(), rtol=1e-3, atol=1e-7)
        assert np.array_equal(store.array(split, "valid")[:rows], ref.valid.flatten().numpy())
        assert np.array_equal(store.array(split, "teacher_ids")[:rows], ref.teacher_ids.flatten(0, 1).numpy())
        assert np.array_equal(store.array(split, "sae_ids")[:rows], ref.sae_ids.flatten(0, 1).numpy())
        assert not store.array(split, "valid")[rows:].any()  # the tail shorter than a window has no labels


def test_rerun_does_nothing_and_touches_nothing(job):
    before = {f: f.stat().st_mtime_ns for f in (job / "labels").rglob("*") if f.is_file()}
    r = cli(*base_args(job, **{"--workers": 2, **RUN, **KD}))
    assert r.exit_code == 0, r.output
    fp = LabelStore.open(job / "labels").fingerprint
    assert f"label store {fp} is complete: nothing to do" in r.output
    assert {f: f.stat().st_mtime_ns for f in (job / "labels").rglob("*") if f.is_file()} == before


def test_second_run_refused_by_the_lock(job):
    with open(job / "labels" / ".lock", "a") as held:  # another extraction holding the store
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = cli(*base_args(job, **{"--workers": 2, **RUN, **KD}))
    assert r.exit_code == 2
    assert r.output.strip().startswith("error: another extraction is writing") and "choose another --out" in r.output


def test_failing_unit_isolated_then_resume_byte_identical(job):
    """A unit that fails leaves no record while the others finish; a unit killed after writing loses
    its record too; the rerun computes exactly those, and the store ends byte-identical."""
    broken = job / "tokens_broken"
    shutil.copytree(job / "tokens", broken)
    chunk = broken / "train" / "tokens" / "c" / "2"  # token rows 128..191: windows 8..11, in units 2 and 3
    good = chunk.read_bytes()
    chunk.write_bytes(good[:10])
    out = job / "plain"
    args = base_args(job, **{"--tokens": broken, "--out": out, **RUN})
    r = cli(*args)
    assert r.exit_code == 1
    assert "error: train unit 2, window 8: StoreError: chunk file" in r.output and "has 10 bytes" in r.output
    assert "error: train unit 3, windows 9..10: StoreError" in r.output
    assert "2 of" in r.output and "units failed; rerun the same command to finish them" in r.output
    store = LabelStore.open(out)
    assert store.missing_units() == [("train", 2), ("train", 3)]
    # as if the job had been killed after writing unit 4 but before its record: remove both
    before = chunk_bytes(out)
    unit4 = {k: v for k, v in before.items() if k.startswith("train/") and k.split("/c/")[1].split("/")[0] == "4"}
    assert len(unit4) == len(LABELS)
    store.record_path("train", 4).unlink()
    for name in LABELS:
        gone = out / "train" / name / "c" / "4"
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    chunk.write_bytes(good)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "in 3 of" in r.output
    assert validate_store(out, job / "tokens") == []
    after = chunk_bytes(out)
    assert {k: after[k] for k in before} == before  # finished units untouched, unit 4 rewritten byte for byte
    # the resumed store holds the same labels as the two-worker run with every optional array stored
    # (so the teacher's top-K, the SAE code, Parquet and zstd changed nothing in the concept labels)
    ref, got = labels_of(job / "labels"), labels_of(out)
    assert all(np.array_equal(ref[key], got[key]) for key in ref)


def test_worker_killed_mid_unit_is_retried_with_same_bytes(job):
    """Ray restarts a killed worker (reloading teacher and SAE) and retries its unit: same bytes."""
    import ray

    from pipeline.extract import ExtractConfig, _start_actors

    out = job / "killed"
    shutil.copytree(job / "plain", out)
    expect = chunk_bytes(out)
    store = LabelStore.open(out)
    store.record_path("train", 0).unlink()
    cfg = ExtractConfig(tokens=job / "tokens", teacher=str(job / "teacher"), sae=job / "sae", layer=1, out=out,
                        window=WINDOW, batch_windows=2, chunk_windows=3, threads=1)
    [actor] = _start_actors([cfg], "cpu")
    first_pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    ref = actor.run.remote("train", 0)
    ray.kill(actor, no_restart=False)  # the worker process dies with the unit in flight; restart allowed
    assert ray.get(ref)["unit"] == 0
    assert ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) != first_pid  # really a new process
    assert store.is_complete("train", 0) and chunk_bytes(out) == expect
    ray.kill(actor)


def test_sharded_extraction_equals_default_and_resumes_byte_identical(job):
    """--shard-chunks 2: a unit is one shard of two chunks (one file per array), written whole by one
    worker; the labels equal the default layout's. A unit killed mid-write (garbage in its shard files,
    no record) and the short last unit, lost too, are labelled again on rerun, byte for byte."""
    out = job / "sharded"
    args = base_args(job, **{"--out": out, "--shard-chunks": 2, **RUN, "--workers": 2})
    r = cli(*args)
    assert r.exit_code == 0, r.output
    store = LabelStore.open(out)
    assert store.spec.shard_chunks == 2 and store.fingerprint == planned(job, None).fingerprint
    assert all(b - a == 2 * 3 * WINDOW for _, a, b in store.units("train")[:-1])
    assert validate_store(out, job / "tokens") == []
    ref, got = labels_of(job / "labels"), labels_of(out)
    assert all(np.array_equal(ref[key], got[key]) for key in ref)
    before, last = chunk_bytes(out), len(store.units("train")) - 1
    for unit in (1, last):
        store.record_path("train", unit).unlink()
        for name in LABELS:
            shard = chunk_file(out / "train" / name, unit, 1 if name == "valid" else 2)
            shard.write_bytes(shard.read_bytes()[:40] + b"killed")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "in 2 of" in r.output and chunk_bytes(out) == before
    assert validate_store(out, job / "tokens") == []


# -- label selections -----------------------------------------------------------------------------

SIGNED_SCORE = ("a_j*<dL/dh, W_dec_j> over the SAE's active latents; "
                "L = sum of next-token CE over positions 0..W-2")  # what every store made before --select hashes


def planned(root: Path, selection: str | None, **over):
    sel = {} if selection is None else {"selection": selection}
    cfg = ExtractConfig(tokens=root / "tokens", teacher=str(root / "teacher"), sae=root / "sae", layer=1,
                        out=root / "unused", window=WINDOW, **sel, **over)
    return plan(cfg, TokenStore.open(root / "tokens"))[0]


def test_each_selection_is_its_own_label_set(job):
    kd = {"store_sae_topk": True, "teacher_topk": 5}  # the job's options (chunking and formats are not hashed)
    specs = {s: planned(job, s, **kd) for s in SELECTIONS}
    assert len({spec.fingerprint for spec in specs.values()}) == 4
    # signed is the default extraction's label set, hashed from exactly the inputs it had before --select
    assert specs["signed"].fingerprint == LabelStore.open(job / "labels").fingerprint
    assert specs["signed"] == planned(job, None, **kd)
    assert set(specs["signed"].inputs) == {"teacher", "sae", "hook", "score", "precision"}
    assert specs["signed"].inputs["score"] == SIGNED_SCORE
    for s in ("negated", "absolute", "activation"):
        assert specs[s].inputs["selection"] == s and specs[s].inputs["score"] != SIGNED_SCORE
        assert {k: v for k, v in specs[s].inputs.items() if k not in ("selection", "score")} == \
            {k: v for k, v in specs["signed"].inputs.items() if k != "score"}
    assert specs["negated"].inputs["score"].startswith("-a_j*<dL/dh, W_dec_j>")


def test_negated_extraction_stores_the_kernels_negated_labels(job):
    """--select reaches the Ray workers: the store holds attribute(selection="negated"), under its own
    fingerprint, recorded in the manifest's inputs (which `cocomix shards info` prints)."""
    out = job / "negated"
    r = cli(*base_args(job, **{"--out": out, "--select": "negated", "--splits": "val", **RUN}))
    assert r.exit_code == 0, r.output
    store = LabelStore.open(out)
    assert store.fingerprint == planned(job, "negated", splits=("val",)).fingerprint
    assert store.spec.inputs["selection"] == "negated"
    from sae import load_sae

    tokens, n_win = TokenStore.open(job / "tokens"), TokenStore.open(job / "tokens").num_windows("val", WINDOW)
    win = torch.from_numpy(tokens.tokens("val")[: n_win * WINDOW].astype(np.int64)).view(n_win, WINDOW)
    ref = attribute(tiny_gpt2(), load_sae(job / "sae"), 1, "resid_post_mlp", win, selection="negated")
    signed = attribute(tiny_gpt2(), load_sae(job / "sae"), 1, "resid_post_mlp", win)
    rows = n_win * WINDOW
    assert np.array_equal(store.array("val", "ids")[:rows], ref.ids.flatten(0, 1).numpy())
    assert not np.array_equal(store.array("val", "ids")[:rows], signed.ids.flatten(0, 1).numpy())
    scores = ref.scores.flatten(0, 1).numpy()  # a worker's one thread sums in another order than this process
    np.testing.assert_allclose(store.array("val", "scores")[:rows].astype(np.float32), scores, rtol=1e-3,
                               atol=1e-5 * np.abs(scores).max())
    assert np.array_equal(store.array("val", "valid")[:rows], ref.valid.flatten().numpy())


def test_bad_select_refused(tmp_path):
    msg = refused(tmp_path, **{"--select": "largest"})
    assert msg == "error: --select must be signed, negated, absolute or activation, not 'largest'"
