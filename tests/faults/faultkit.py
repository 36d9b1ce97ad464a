"""Helpers of the fault suite: run the CLI, check a refusal, snapshot stores, build stores, watch processes.

Imported by the fault tests (`from .faultkit import ...`); fixtures live in conftest.py.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from storage_schemas import LabelSpec, LabelStore, TokenStore

COCOMIX = Path(sys.executable).with_name("cocomix")  # the console script of this environment
WINDOW, N_LATENTS = 16, 96  # the tiny teacher's label grid and the tiny SAE's latents
RUN = ["--window", WINDOW, "--batch-windows", 2, "--chunk-windows", 3, "--threads", 1, "--no-progress"]
TRAIN = ["--preset", "demo", "--set", "block_size=16", "--set", "n_layer=2", "--set", "n_head=2",
         "--set", "n_embd=32", "--set", "batch_size=4", "--set", "k_concept=8", "--set", "device=cpu",
         "--set", "threads=1", "--set", "warmup_steps=2", "--set", "dropout=0.1"]  # dropout: RNG must resume


# -- the command line ------------------------------------------------------------------------------

def cli(*args):
    """`cocomix ARGS` in this process (pipeline.cli.app); stdout and stderr kept apart."""
    from pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def extract_args(world: Path, out: Path, **over) -> list:
    """`cocomix extract` arguments for the tiny world: teacher, SAE, window grid and one thread per worker."""
    args = {"--tokens": world / "tokens", "--teacher": world / "teacher", "--sae": world / "sae_ckpt",
            "--layer": 1, "--out": out, "--workers": 1} | over
    return ["extract", *[x for kv in args.items() for x in kv], *RUN]


def no_traceback(r) -> None:
    assert r.exception is None or isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output, r.output


def refusal(r, code: int = 2, *fragments: str, alone: bool = True) -> str:
    """Assert one `error: ...` line on stderr (its only line unless alone=False, when it must be the
    last: a run's progress lines may come first), the exit code and no traceback; return that line."""
    no_traceback(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == code, (r.exit_code, r.output)
    assert lines and lines[-1].startswith("error: "), r.output
    assert (len(lines) == 1) if alone else not [ln for ln in lines[:-1] if ln.startswith("error")], r.output
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]


# -- stores ----------------------------------------------------------------------------------------

def chunk_bytes(store: Path) -> dict[str, bytes]:
    """Every zarr chunk file of a store (c/<unit>[/0]), by relative path: what 'byte-identical' compares.
    A `.partial` file zarr leaves when its writer is killed mid-write is not a chunk."""
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.glob("*/*/c/**/*"))
            if f.is_file() and f.name.isdigit()}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in folder.rglob("*") if f.is_file()}


def tree(folder: Path) -> set[str]:
    """Every path under folder (files and folders, hidden ones too): what 'nothing half-written' compares."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def unit_chunks(store: Path, split: str, unit: int) -> dict[str, Path]:
    """{array name: chunk file} of one unit (1-D arrays: c/<unit>; 2-D: c/<unit>/0)."""
    files = {}
    for p in store.glob(f"{split}/*/c/{unit}"):
        files[p.parent.parent.name] = p if p.is_file() else p / "0"
    return files


def synthetic_labels(path: Path, tokens: Path, seed: int = 0, id_high: int = N_LATENTS,
                     window: int = WINDOW) -> LabelStore:
    """A complete label store written through the storage API (as extraction writes it, records and a
    consolidated manifest), with random labels: ids below id_high, half the scores positive."""
    ts, rng = TokenStore.open(tokens), np.random.default_rng(seed)
    spec = LabelSpec(token_fingerprint=ts.fingerprint, window=window, k=4, n_latents=N_LATENTS, chunk_windows=3,
                     inputs={"synthetic": seed})
    store = LabelStore.create(path, spec, {s: ts.num_tokens(s) for s in ts.splits})
    for split in ts.splits:
        for unit, a, b in store.units(split):
            n = b - a
            arrays = {"ids": rng.integers(0, id_high, (n, 4)), "scores": rng.standard_normal((n, 4)),
                      "valid": rng.random(n) > 0.1}
            store.write_unit(split, unit, arrays, ts.tokens(split)[a:b], seconds=0.0)
    store.consolidate()
    return LabelStore.open(path)


def enospc(after: int, real):
    """A stand-in for a write function that works `after` times, then fails as a full disk does."""
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return write


# -- processes -------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time) from /proc; OSError when the process is gone (or a zombie)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        raise ProcessLookupError(pid)
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live process below root (Ray's raylet, GCS and workers of a driver)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)] = _stat(int(name))
            except OSError:
                continue
    found = {}
    for pid, (ppid, start) in parents.items():
        p = ppid
        while p > 1 and p in parents and p != root:
            p = parents[p][0]
        if p == root and pid != root:
            found[pid] = start
    return found


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def alive(procs: dict[int, int]) -> dict[int, int]:
    """The processes of {pid: start time} still running (a reused pid has another start time)."""
    out = {}
    for pid, start in procs.items():
        try:
            if _stat(pid)[1] == start:
                out[pid] = start
        except OSError:
            continue
    return out


def reap(procs: dict[int, int], grace: float = 20.0) -> None:
    """End the processes we started whose parent we killed, one by one by pid (Ray's per-node agents
    outlive a killed driver), then wait until they are all gone."""
    for pid in alive(procs):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(procs), grace, f"processes {sorted(alive(procs))} to exit", interval=0.05)


def wait_for(condition, timeout: float, what: str, interval: float = 0.005):
    """Poll condition() until it returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
