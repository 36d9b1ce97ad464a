"""Several label stores from one teacher pass (`cocomix extract` with --out repeated): each store is
byte for byte the store its one-store extraction writes; a rerun repairs only the stores that lack a
unit and touches nothing else; the CLI refuses mismatched or clashing stores with one line."""

import fcntl
import json
import shutil
from pathlib import Path

import pytest
from test_attribution import save_teacher, save_tiny_sae, tiny_gpt2, tiny_sae
from test_extract import chunk_bytes, ray_session  # noqa: F401  (one Ray session for this module)
from test_extract_checks import base_args, cli, make_token_store

from storage_schemas import LabelStore, validate_store

pytestmark = pytest.mark.slow
RUN = {"--batch-windows": 2, "--chunk-windows": 3, "--threads": 1, "--store-teacher-topk": 5,
       "--store-sae-topk": None, "--format": "both"}
# store name -> its pair and options: two layers with two SAEs, then a second selection and a second k
# on the first pair (the last two share its hook and its SAE code)
STORES = {"a1": {"--layer": 1, "--sae": "sae_a", "--select": "signed", "--topk": 4},
          "b2": {"--layer": 2, "--sae": "sae_b", "--select": "signed", "--topk": 4},
          "a1neg": {"--layer": 1, "--sae": "sae_a", "--select": "negated", "--topk": 4},
          "a1k2": {"--layer": 1, "--sae": "sae_a", "--select": "signed", "--topk": 2}}


def multi_args(root: Path, out: Path, names=tuple(STORES)) -> list:
    """One extraction writing the named stores under out, each option repeated once per store, in order."""
    args = base_args(root, **{"--layer": False, "--sae": False, "--out": False, **RUN})
    for name in names:
        opts = STORES[name] | {"--sae": root / STORES[name]["--sae"], "--out": out / name}
        args += [x for k, v in opts.items() for x in (k, v)]
    return args


def single_args(root: Path, out: Path, name: str) -> list:
    return base_args(root, **{**RUN, **STORES[name], "--sae": root / STORES[name]["--sae"], "--out": out / name})


def data_files(store: Path) -> dict[str, bytes]:
    """Every chunk file and Parquet file of a store, by relative path."""
    files = chunk_bytes(store) | {str(f.relative_to(store)): f.read_bytes() for f in (store / "parquet").iterdir()}
    assert len(files) > 2 * len(LabelStore.open(store).manifest["units"])
    return files


def records(store: Path) -> tuple[str, dict]:
    """The manifest's fingerprint and each unit record without its seconds (which timing sets)."""
    m = json.loads((store / "manifest.json").read_text())
    return m["fingerprint"], {u: {k: v for k, v in r.items() if k != "seconds"} for u, r in m["units"].items()}


def mtimes(folder: Path) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for f in folder.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir, ray_session):  # noqa: F811
    """Token store, teacher, two SAEs; the four stores from one extraction, and each from its own."""
    root = tmp_path_factory.mktemp("multi")
    make_token_store(root / "tokens", tokenizer_dir)
    save_teacher(tiny_gpt2(), root / "teacher", tokenizer_dir)
    save_tiny_sae(tiny_sae(normalize="layer_norm"), root / "sae_a")
    save_tiny_sae(tiny_sae(seed=5), root / "sae_b")
    r = cli(*multi_args(root, root / "multi"))
    assert r.exit_code == 0, r.output
    assert [line.split(":")[0] for line in r.output.splitlines()] == [str(root / "multi" / n) for n in STORES]
    for name in STORES:
        r = cli(*single_args(root, root / "single", name))
        assert r.exit_code == 0, r.output
    return root


def test_each_store_is_byte_identical_to_its_single_extraction(world):
    fingerprints = set()
    for name in STORES:
        multi, single = world / "multi" / name, world / "single" / name
        assert validate_store(multi, world / "tokens") == []
        assert data_files(multi) == data_files(single), name
        assert records(multi) == records(single), name
        assert LabelStore.open(multi).spec == LabelStore.open(single).spec
        fingerprints.add(records(multi)[0])
    assert len(fingerprints) == len(STORES)  # four label sets, not one store four times
    spec = LabelStore.open(world / "multi" / "b2").spec
    assert spec.teacher_k == 5 and spec.sae_k == 8 and spec.inputs["hook"]["layer"] == 2  # the shared options in every store


def test_rerun_does_nothing_and_touches_nothing(world):
    before = mtimes(world / "multi")
    r = cli(*multi_args(world, world / "multi"))
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"label store {records(world / 'multi' / n)[0]} is complete: nothing to do"
                                     for n in STORES]
    assert mtimes(world / "multi") == before


def test_rerun_repairs_only_the_store_that_lacks_units(world):
    """b2 lost two units (records gone, one unit's chunk and Parquet files too: a kill before the record);
    the rerun labels them for b2 alone, and a1's files keep their bytes and mtimes."""
    out = world / "repair"
    for name in ("a1", "b2"):
        shutil.copytree(world / "multi" / name, out / name)
    b2 = LabelStore.open(out / "b2")
    for split, unit in (("train", 4), ("val", 0)):
        b2.record_path(split, unit).unlink()
    for f in [*(out / "b2" / "train").glob("*/c/4/**/*"), *(out / "b2" / "train").glob("*/c/4"),
              out / "b2" / "parquet" / "train-000004.parquet"]:
        if f.is_file():
            f.unlink()
    assert b2.missing_units() == [("train", 4), ("val", 0)] and LabelStore.open(out / "a1").complete
    untouched = mtimes(out / "a1")
    r = cli(*multi_args(world, out, names=("a1", "b2")))
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"label store {records(out / 'a1')[0]} is complete: nothing to do"
    assert r.output.splitlines()[1].startswith(f"{out / 'b2'}: labelled") and "in 2 of 14 units" in r.output
    assert mtimes(out / "a1") == untouched
    assert validate_store(out / "b2", world / "tokens") == []
    assert data_files(out / "b2") == data_files(world / "multi" / "b2")
    assert records(out / "b2") == records(world / "multi" / "b2")


def test_a_store_held_by_another_extraction_refuses_the_whole_run(world):
    with open(world / "multi" / "b2" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = cli(*multi_args(world, world / "multi", names=("a1", "b2")))
    assert r.exit_code == 2
    assert r.output.startswith(f"error: another extraction is writing {world / 'multi' / 'b2'}")


# -- refusals: one line, exit 2, no store created ----------------------------------------------------


def refused(root: Path, args: list, outs: list[Path]) -> str:
    r = cli(*args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not any(out.exists() for out in outs)
    return lines[0]


def test_mismatched_counts_refused(world, tmp_path):
    args = multi_args(world, tmp_path, names=("a1", "b2"))
    outs = [tmp_path / "a1", tmp_path / "b2", tmp_path / "c"]
    msg = refused(world, [*args, "--out", outs[2]], outs)
    assert msg == "error: --sae has 2 values for 3 --out; give one --sae for all stores or one per --out, in the same order"
    msg = refused(world, [*args, "--topk", 4], outs[:2])
    assert msg.startswith("error: --topk has 3 values for 2 --out")


def test_an_sae_that_does_not_fit_its_layer_is_refused_naming_its_store(world, tmp_path):
    save_tiny_sae(tiny_sae(d_in=16), tmp_path / "sae16")
    outs = [tmp_path / "ok", tmp_path / "narrow"]
    args = base_args(world, **{"--sae": world / "sae_a", "--out": outs[0], **RUN})
    msg = refused(world, [*args, "--layer", 2, "--sae", tmp_path / "sae16", "--out", outs[1]], outs)
    assert msg.startswith(f"error: --out {outs[1]}: ") and "SAE d_in 16 does not match the teacher's width 32" in msg


def test_one_folder_twice_refused(world, tmp_path):
    args = base_args(world, **{"--sae": world / "sae_a", "--out": tmp_path / "x", **RUN})
    msg = refused(world, [*args, "--select", "negated", "--out", tmp_path / "x"], [tmp_path / "x"])
    assert msg == f"error: --out {tmp_path / 'x'} is given twice: each label store needs its own folder"


def test_a_folder_holding_another_label_set_refused_before_any_store_is_created(world, tmp_path):
    """The new store is listed first, the clashing one (a1's store, asked for negated) second."""
    args = base_args(world, **{"--sae": world / "sae_a", "--out": tmp_path / "new", **RUN})
    r = cli(*args, "--out", world / "multi" / "a1", "--select", "signed", "--select", "negated")
    assert r.exit_code == 2 and "holds a different label store" in r.output, r.output
    assert not (tmp_path / "new").exists()
