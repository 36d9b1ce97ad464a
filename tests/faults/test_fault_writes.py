"""A disk that fills up, simulated in-process (any machine; test_fault_extract.py uses a real tiny tmpfs
where one can be mounted): every write goes through zarr's `_put` or `write_json_atomic`, and those
start failing with ENOSPC part-way. Commands exit 1 with one line naming the path; nothing half-written
is left; no label unit is ever recorded complete without its data."""

import json

import pytest
import zarr.storage._local as zarr_local

from pipeline.extract import ExtractWorker, UnitJob
from storage_schemas import LabelSpec, LabelStore, TokenStore, unit_problems

from .faultkit import N_LATENTS, WINDOW, cli, enospc, refusal, tree


def test_tokenize_on_a_full_disk_leaves_nothing(world, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                              for i in range(200)))
    out = tmp_path / "stores" / "tokens"
    out.parent.mkdir()
    args = ["tokenize", "--input", corpus, "--tokenizer", world / "tokens" / "tokenizer", "--out", out,
            "--chunk-tokens", 256]
    monkeypatch.setattr(zarr_local, "_put", enospc(4, zarr_local._put))
    refusal(cli(*args), 1, "No space left on device", str(out))
    assert tree(out.parent) == set()  # neither the store nor its temporary folders
    monkeypatch.undo()
    assert cli(*args).exit_code == 0 and TokenStore.open(out).num_tokens("train") > 0  # room again: it works


def test_export_on_a_full_disk_leaves_nothing(world, synthetic, tmp_path, monkeypatch):
    out = tmp_path / "exports" / "labels"
    out.parent.mkdir()
    monkeypatch.setattr(zarr_local, "_put", enospc(30, zarr_local._put))
    refusal(cli("shards", "export", synthetic, "--to", "zarr", "--codec", "zstd", "--out", out), 1,
            "No space left on device", str(out.parent))
    assert tree(out.parent) == set()


@pytest.fixture
def worker(world, tmp_path):
    """An extraction worker (no Ray) on a fresh label store: what each Ray actor runs."""
    ts = TokenStore.open(world / "tokens")
    spec = LabelSpec(token_fingerprint=ts.fingerprint, window=WINDOW, k=4, n_latents=N_LATENTS, chunk_windows=3)
    LabelStore.create(tmp_path / "labels", spec, {s: ts.num_tokens(s) for s in ts.splits})
    job = UnitJob(tokens=str(world / "tokens"), out=str(tmp_path / "labels"), teacher=str(world / "teacher"),
                  sae=str(world / "sae_ckpt"), layer=1, location="resid_post_mlp", batch_windows=2, device="cpu",
                  threads=1)
    return ExtractWorker(job)


def test_unit_data_write_fails_no_record(worker, monkeypatch):
    worker.run("train", 0)
    monkeypatch.setattr(zarr_local, "_put", enospc(1, zarr_local._put))  # ids fit; scores do not
    with pytest.raises(OSError, match="No space left on device") as e:
        worker.run("train", 1)
    assert e.value.filename == str(worker.store.path / "train")
    monkeypatch.undo()
    store = worker.store
    assert store.is_complete("train", 0) and unit_problems(store, "train", 0) == []
    assert not store.is_complete("train", 1)
    assert unit_problems(store, "train", 1) == [f"{store.record_path('train', 1)}: unit incomplete (no "
                                                "completion record); rerun extraction"]


def test_unit_record_write_fails_no_record(worker, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full)  # the data fit; the completion record does not
    with pytest.raises(OSError, match="No space left on device") as e:
        worker.run("val", 3)
    monkeypatch.undo()
    assert e.value.filename == str(worker.store.record_path("val", 3))
    assert not worker.store.is_complete("val", 3)
    assert sorted(p.name for p in (worker.store.path / "units").iterdir()) == []  # no temporary record left
