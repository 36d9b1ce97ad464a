"""Storage faults in a finished label store: `cocomix shards validate` names each one and exits 1, and
`cocomix train` refuses to start on it (exit 2, one line, no run folder). Rerunning extraction repairs
them: see test_fault_extract.py.

The store here is written through the storage API, as extraction writes it (data, then the record,
then a consolidated manifest), so no teacher or Ray is needed to damage it."""

import shutil

import pytest

from .faultkit import TRAIN, cli, no_traceback, refusal, synthetic_labels, unit_chunks


def truncate(store, world):
    f = unit_chunks(store, "train", 1)["ids"]
    f.write_bytes(f.read_bytes()[:100])
    return [f"{f}: 100 bytes, expected 384 (truncated or foreign)"]


def flip_byte(store, world):
    f = unit_chunks(store, "train", 4)["scores"]
    data = bytearray(f.read_bytes())
    data[10] ^= 0x40
    f.write_bytes(bytes(data))
    return [f"{f}: checksum mismatch (corrupt or rewritten)"]


def delete_chunk(store, world):
    f = unit_chunks(store, "train", 7)["valid"]
    f.unlink()
    return [f"{f}: chunk file missing"]


def record_without_data(store, world):
    files = unit_chunks(store, "val", 2)
    for f in files.values():
        f.unlink()
    assert (store / "units" / "val-000002.json").is_file()
    return [f"{f}: chunk file missing" for f in sorted(files.values())]


def foreign_manifest(store, world):
    """The manifest of another label set over the same tokens, window and shapes: only the records betray it."""
    other = synthetic_labels(store.parent / "other", world / "tokens", seed=1)
    shutil.copyfile(other.path / "manifest.json", store / "manifest.json")
    return [f"{store}/manifest.json: its record of train unit 0 differs from {store}/units/train-000000.json"]


FAULTS = [truncate, flip_byte, delete_chunk, record_without_data, foreign_manifest]


@pytest.fixture
def damaged(request, world, synthetic, tmp_path):
    """(store with one fault, the problems validate must report)."""
    store = shutil.copytree(synthetic, tmp_path / "labels" / "store")
    return store, request.param(store, world)


def train_args(world, labels, out):
    return ["train", *TRAIN, "--tokens", world / "tokens", "--labels", labels, "--out", out,
            "--max-tokens", 2 * 4 * 16, "--set", "eval_windows=0"]


def test_sound_store_validates_and_trains(world, synthetic, tmp_path):
    r = cli("shards", "validate", synthetic, "--tokens", world / "tokens")
    assert r.exit_code == 0 and r.stdout.strip() == "ok", r.output
    r = cli(*train_args(world, synthetic, tmp_path / "run"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()


@pytest.mark.parametrize("damaged", FAULTS, indirect=True, ids=[f.__name__ for f in FAULTS])
def test_validate_names_each_fault(damaged, world):
    store, expected = damaged
    r = cli("shards", "validate", store)
    no_traceback(r)
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()
    for problem in expected:
        assert any(line.startswith(problem) for line in lines), (problem, r.stdout)
    assert r.stderr.strip() == f"{store}: {len(lines)} problem(s)"
    if expected[0].startswith(f"{store}/manifest.json"):  # every unit's record disagrees with that manifest
        assert len(lines) == 124 and all("a manifest from another store?" in line for line in lines)
    else:
        assert len(lines) == len(expected), r.stdout  # the other 123 units are sound


# A flipped byte keeps every size: only checksums see it, and checksumming the whole store is
# `cocomix shards validate`'s job (and extraction's, which repairs it), not a cost every run pays.
STRUCTURAL = [f for f in FAULTS if f is not flip_byte]


@pytest.mark.parametrize("damaged", STRUCTURAL, indirect=True, ids=[f.__name__ for f in STRUCTURAL])
def test_train_refuses_to_start(damaged, world, tmp_path):
    store, expected = damaged
    line = refusal(cli(*train_args(world, store, tmp_path / "run")), 2, f"label store {store} is damaged",
                   "rerun `cocomix extract` to repair it")
    assert expected[0].split(":")[0] in line  # names the damaged file
    assert not (tmp_path / "run").exists()
