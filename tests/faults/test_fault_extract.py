"""Extraction under faults, through `cocomix extract`: a Ray worker SIGKILLed mid-unit, the driver
SIGKILLed mid-run, an exception inside one window, damaged units in a finished store, a foreign manifest,
and a disk that fills up. Every run that finishes ends byte-identical to an uninterrupted run.

One worker thread, fixed --batch-windows and --chunk-windows (faultkit.RUN): units are deterministic."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading

import pytest

from storage_schemas import LabelStore, unit_problems, validate_store

from .faultkit import (
    COCOMIX,
    alive,
    chunk_bytes,
    cli,
    descendants,
    extract_args,
    mtimes,
    no_traceback,
    reap,
    refusal,
    title,
    unit_chunks,
    wait_for,
)

pytestmark = pytest.mark.slow
UNITS = 124  # 103 train + 21 val units of 3 windows of 16 tokens


@pytest.fixture(scope="module")
def reference(world, ray_session, tmp_path_factory):
    """The uninterrupted run every faulty one must equal, byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "labels"
    r = cli(*extract_args(world, out))
    assert r.exit_code == 0, r.output
    assert f"in {UNITS} of {UNITS} units" in r.stdout
    assert validate_store(out, world / "tokens") == []
    return out


def records(out):
    return sorted(p.name for p in (out / "units").glob("*.json")) if (out / "units").is_dir() else []


def test_worker_sigkilled_mid_unit_is_retried(world, reference, tmp_path):
    """A worker process dies while labelling a unit: Ray restarts it and retries the unit; same bytes."""
    out, killed, finished = tmp_path / "labels", {}, threading.Event()

    def busy_worker():  # one of our Ray workers inside ExtractWorker.run, once labelling has begun
        if finished.is_set():
            raise AssertionError("the run finished before a worker could be killed")
        if records(out):
            return next((p for p in descendants(os.getpid()) if title(p) == "ray::ExtractWorker.run"), None)

    def kill_one():
        try:
            pid = wait_for(busy_worker, 180, "a worker labelling a unit", interval=0.01)
            killed["proc"] = {pid: descendants(os.getpid())[pid]}
            os.kill(pid, signal.SIGKILL)
            killed["missing"] = len(LabelStore.open(out).missing_units())
        except BaseException as e:  # surfaced in the test's thread below
            killed["error"] = e

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    r = cli(*extract_args(world, out, **{"--workers": 2}))  # the reference had one: same bytes either way
    finished.set()
    killer.join(timeout=200)
    if "error" in killed:
        raise killed["error"]
    assert killed["missing"] > 0  # it died mid-run, with units still to label
    assert not alive(killed["proc"])
    assert r.exit_code == 0, r.output
    assert f"in {UNITS} of {UNITS} units" in r.stdout  # the killed unit was retried, none lost
    assert chunk_bytes(out) == chunk_bytes(reference)


def test_driver_sigkilled_then_rerun_finishes_the_rest(world, reference, tmp_path):
    """`cocomix extract` killed mid-run (a real process, its own Ray): the rerun labels only the units
    without a record, leaves the finished ones untouched, and ends byte-identical."""
    out, log = tmp_path / "labels", tmp_path / "driver.log"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # its own Ray's files: short (socket paths), removed after
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled",
                                                                         "RAY_TMPDIR": ray_tmp}
    with open(log, "w") as f:
        driver = subprocess.Popen([COCOMIX, *map(str, extract_args(world, out, **{"--address": "local"}))],
                                  cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: records(out) or driver.poll() is not None, 240, "the first finished unit")
        assert driver.poll() is None, log.read_text()
        procs = descendants(driver.pid)  # its raylet, GCS and workers: gone with it, or reaped below
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    reap(procs)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    store = LabelStore.open(out)
    missing, done = store.missing_units(), records(out)
    assert missing and done, log.read_text()  # killed mid-run
    finished = [f"units/{name}" for name in done]
    for name in done:
        split, unit = name.removesuffix(".json").split("-")
        finished += [str(f.relative_to(out)) for f in unit_chunks(out, split, int(unit)).values()]
    before = mtimes(out)
    r = cli(*extract_args(world, out))
    assert r.exit_code == 0, r.output
    assert f"in {len(missing)} of {UNITS} units" in r.stdout
    assert chunk_bytes(out) == chunk_bytes(reference)
    after = mtimes(out)
    assert [after[k] for k in finished] == [before[k] for k in finished]  # finished units not rewritten


def test_exception_in_one_window_fails_that_unit_only(world, reference, tmp_path):
    """A token id the teacher cannot embed, written into the token store after it was made: the unit
    holding that window fails, named with its window; the others finish; the rerun completes it."""
    tokens = shutil.copytree(world / "tokens", tmp_path / "tokens")
    chunk = tokens / "train" / "tokens" / "c" / "2"  # token rows 128..191
    good = chunk.read_bytes()
    bad = bytearray(good)
    bad[4:6] = (65000).to_bytes(2, "little")  # row 130: window 8, alone in unit 2's last batch
    chunk.write_bytes(bytes(bad))
    out = tmp_path / "labels"
    args = extract_args(world, out, **{"--tokens": tokens})
    r = cli(*args)
    no_traceback(r)
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: train unit 2, window 8: IndexError: index out of range in self",
                      f"error: 1 of {UNITS} units failed; rerun the same command to finish them"], r.output
    assert LabelStore.open(out).missing_units() == [("train", 2)]
    chunk.write_bytes(good)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert f"in 1 of {UNITS} units" in r.stdout
    assert chunk_bytes(out) == chunk_bytes(reference)


def test_rerun_repairs_only_the_damaged_units(world, reference, tmp_path):
    """Truncated chunk, flipped byte, missing chunk, record without data: each unit is named, labelled
    again, and nothing else is rewritten."""
    out = shutil.copytree(reference, tmp_path / "labels")
    ids = unit_chunks(out, "train", 1)["ids"]
    ids.write_bytes(ids.read_bytes()[:100])
    scores = unit_chunks(out, "train", 4)["scores"]
    data = bytearray(scores.read_bytes())
    data[10] ^= 0x40
    scores.write_bytes(bytes(data))
    unit_chunks(out, "train", 7)["valid"].unlink()
    for f in unit_chunks(out, "val", 2).values():
        f.unlink()
    damaged = {("train", 1), ("train", 4), ("train", 7), ("val", 2)}
    keep = {k: v for k, v in mtimes(out).items()
            if not any(k.startswith(f"{s}/") and f"/c/{u}" in k or k == f"units/{s}-{u:06d}.json" for s, u in damaged)}
    r = cli(*extract_args(world, out))
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert sorted(line.rsplit(" labelling ", 1)[1] for line in warned) == sorted(
        f"{s} unit {u} again" for s, u in damaged)
    assert any(str(ids) in line and "truncated" in line for line in warned)
    assert any(str(scores) in line and "checksum mismatch" in line for line in warned)
    assert f"in {len(damaged)} of {UNITS} units" in r.stdout
    assert validate_store(out, world / "tokens") == []
    assert chunk_bytes(out) == chunk_bytes(reference)
    after = mtimes(out)
    assert {k: after[k] for k in keep if k != "manifest.json"} == {k: v for k, v in keep.items() if k != "manifest.json"}


def test_foreign_manifest_is_refused_and_nothing_touched(world, reference, synthetic, tmp_path):
    out = shutil.copytree(reference, tmp_path / "labels")
    shutil.copyfile(synthetic / "manifest.json", out / "manifest.json")
    before = {k: (out / k).read_bytes() for k in mtimes(out)}
    refusal(cli(*extract_args(world, out)), 2, f"{out} holds a different label store", "choose another --out")
    assert {k: (out / k).read_bytes() for k in mtimes(out)} == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs: room for the store's metadata and a handful of units."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); "
                    "test_fault_writes.py simulates a full disk in-process")
    yield mnt
    if subprocess.run(["umount", str(mnt)]).returncode:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_records_no_unit_without_its_data(world, reference, tiny_disk, tmp_path):
    out = tiny_disk / "labels"
    r = cli(*extract_args(world, out))
    no_traceback(r)
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), r.output
    full = [line for line in lines if "No space left on device" in line]
    assert full and all(str(out) in line for line in full), r.output  # each names the store's path
    store = LabelStore.open(out)
    finished = [(s, u) for s in ("train", "val") for u, _, _ in store.units(s) if store.is_complete(s, u)]
    assert finished and store.missing_units()  # the disk filled up mid-run
    assert all(unit_problems(store, s, u) == [] for s, u in finished)  # every record has its data
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.suffix == ".partial"]
