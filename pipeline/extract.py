"""The extraction job: token store + teacher + SAE -> label store, on a Ray actor pool.

Driver (`run_extract`): open the token store, check the teacher and SAE against it and against each
other (before Ray starts, so user mistakes cost seconds), build the LabelSpec whose fingerprint names
the label set, create or reopen the store, take its lock, and plan the units that have no completion
record. Each unit is one chunk of every array (with --shard-chunks N, one shard of N chunks, written
whole), so exactly one writer touches each chunk (or shard) file and none reads another's.

Several stores from one teacher pass (`run_extracts`, issue 14): one ExtractConfig per store, each
exactly the config of a one-store extraction (so each store's plan and fingerprint are the same as
that extraction's), agreeing on the token store, teacher, window and chunking (SHARED), so that unit u
covers the same rows in every store. The driver takes every store's lock (in path order), and a unit
is labelled when any store lacks it, and written only to the stores that lack it.

Workers (`ExtractWorker`, a plain class that Ray wraps as an actor): one per GPU, or per share of the
CPUs with torch's threads set to match; each loads the teacher and each SAE once, then labels whole
units (a loop of `attribute_many` over batches of windows: one forward and one backward for all its
stores) and writes each store's unit: data first, then that store's completion record.
Units are deterministic, so a unit Ray retries after a worker death, or one rerun after a kill,
writes the same bytes given the same device and --batch-windows; labelled together with other stores
or alone, a store gets the same bytes too (pipeline/attribution.py `attribute_many`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.attribution import SCORE_DEFINITIONS, SELECTIONS, Probe, Selection, attribute_many
from pipeline.teacher import (
    check_teacher,
    context_length,
    load_teacher,
    resolve_teacher,
    structure_model,
    teacher_config,
    teacher_identity,
)
from storage_schemas import LabelSpec, LabelStore, TokenStore, UserError

F16_MAX = float(np.finfo(np.float16).max)
# ExtractConfig fields every store of one extraction shares: the same token store, teacher, window and
# chunking make unit u the same rows in every store; the rest say how the one job runs.
SHARED = ("tokens", "teacher", "window", "chunk_windows", "shard_chunks", "splits", "workers", "batch_windows",
          "address", "device", "threads", "progress")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `cocomix extract` needs."""

    tokens: Path
    """Token store to label."""
    teacher: str
    """Hub name (offline cache) or local folder of a transformers causal LM."""
    sae: Path
    """SAE checkpoint in any format `sae.load_sae` reads."""
    layer: int
    """Teacher block the SAE reads (0-based)."""
    out: Path
    """Label store folder: created, or reopened to resume when it holds the same label set."""
    location: str = "resid_post_mlp"
    """Hook location in the block (sae.LOCATIONS) or a raw module path."""
    window: int | None = None
    """Window length W; None: the teacher's context length, at most 1024."""
    k: int = 4
    """Labels per token."""
    selection: Selection = "signed"
    """Which k active latents become labels, and what their score holds (pipeline/attribution.py): signed
    (largest s = a*<dL/dh, W_dec>, the official code's choice), negated (largest -s), absolute (largest |s|)
    or activation (the SAE's own top-k). Each is its own label set: non-signed ones enter the fingerprint."""
    formats: tuple[str, ...] = ("zarr",)
    codec: Literal["raw", "zstd"] = "raw"
    workers: int = 1
    """Ray actors: one per GPU on CUDA, else each gets an equal share of the cluster's CPUs."""
    batch_windows: int = 8
    """Windows per teacher forward."""
    address: str | None = None
    """Ray cluster address; None: RAY_ADDRESS when set, else a local Ray."""
    store_sae_topk: bool = False
    """Also store the SAE's own top-k code (sae_ids, sae_vals)."""
    teacher_topk: int | None = None
    """Also store the teacher's top-K next-token log-probabilities (KD baseline)."""
    chunk_windows: int = 64
    """Windows per chunk = per work unit (unsharded)."""
    shard_chunks: int = 1
    """Chunks per zarr shard file; > 1: a work unit is one whole shard (shard_chunks x chunk_windows windows),
    written in one go by one worker, so no two workers ever write one file. 1: unsharded, today's layout."""
    splits: tuple[str, ...] | None = None
    """Splits to label; None: all of the token store's."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when this machine has a GPU. On a remote cluster with a GPU-less driver, pass cuda."""
    threads: int | None = None
    """torch threads per CPU worker; None: the worker's share of the cluster's CPUs."""
    progress: bool = True

    def __post_init__(self):
        for name in ("k", "workers", "batch_windows", "chunk_windows", "shard_chunks"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.window is not None and self.window < 2:
            raise UserError(f"--window must be at least 2 (labels need a next token), got {self.window}")
        if self.teacher_topk is not None and self.teacher_topk < 1:
            raise UserError(f"--store-teacher-topk must be at least 1, got {self.teacher_topk}")
        if self.codec not in ("raw", "zstd"):
            raise UserError(f"--codec must be raw or zstd, not {self.codec!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.selection not in SELECTIONS:
            raise UserError(f"--select must be {', '.join(SELECTIONS[:-1])} or {SELECTIONS[-1]}, not {self.selection!r}")


@dataclass(frozen=True)
class UnitJob:
    """What each worker needs to label one store's units (sent to the actors once); a worker of several
    stores gets one per store, the same but for out, sae, layer, location and selection."""

    tokens: str
    out: str
    teacher: str
    sae: str
    layer: int
    location: str
    batch_windows: int
    device: str
    threads: int
    selection: Selection = "signed"


class UnitFailed(Exception):
    """One unit could not be labelled; the message names split, unit and windows."""


class UnitsFailed(Exception):
    """Some units failed while the others finished; a rerun computes only the missing ones."""

    def __init__(self, messages: list[str], total: int):
        self.messages = messages
        super().__init__(f"{len(messages)} of {total} units failed; rerun the same command to finish them")


# -- one unit (pure of Ray) -----------------------------------------------------------------------


def empty_arrays(spec: LabelSpec, rows: int) -> dict[str, np.ndarray]:
    """Zero-filled arrays for a unit: rows no window covers stay invalid with id 0 and score 0."""
    return {n: np.zeros((rows, *shape), dtype) for n, (dtype, shape) in spec.arrays().items()}


def _fill(arrays: dict[str, np.ndarray], labels, a: int, b: int) -> None:
    """Copy a batch's labels into rows [a, b) of the unit's arrays; float16 ones saturate rather than overflow."""
    for name, out in arrays.items():
        x = getattr(labels, name).detach().cpu().numpy().reshape(b - a, *out.shape[1:])
        out[a:b] = np.clip(x, -F16_MAX, F16_MAX) if out.dtype == np.float16 else x


def _one_line(ex: BaseException) -> str:
    text = str(ex).strip()
    return f"{type(ex).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _windows(a: int, b: int) -> str:
    return f"window {a}" if a == b else f"windows {a}..{b}"


class ExtractWorker:
    """Labels and writes whole units of one or more stores; Ray runs one per GPU or CPU share, and it
    works without Ray too.

    The teacher and each SAE are loaded once, in the constructor. jobs: one per store, sharing tokens,
    teacher, batch_windows, device and threads (the driver builds them so).
    """

    def __init__(self, *jobs: UnitJob):
        from transformers.utils import logging as hf_logging

        from sae import load_sae

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in the job's output
        job = jobs[0]
        torch.set_num_threads(job.threads)
        self.batch_windows, self.device = job.batch_windows, torch.device(job.device)
        self.tokens = TokenStore.open(Path(job.tokens))
        self.stores = [LabelStore.open(Path(j.out)) for j in jobs]
        self.store = self.stores[0]
        self.teacher = load_teacher(resolve_teacher(job.teacher), self.device)
        # one module per file, so that the probes of one SAE share its code (attribute_many)
        saes = {path: load_sae(path, self.device) for path in dict.fromkeys(j.sae for j in jobs)}
        self.probes = [Probe(saes[j.sae], j.layer, j.location, s.spec.k, j.selection, s.spec.sae_k, s.spec.teacher_k)
                       for j, s in zip(jobs, self.stores, strict=True)]

    def labels(self, split: str, unit: int, which: Sequence[int]) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        """The unit's arrays for each store in which, and its tokens (rows,): every full window,
        batch_windows at a time, one teacher pass for all those stores.

        Rows after the last full window (the end of a split) stay invalid. A failing batch raises
        UnitFailed naming the split, unit and windows.
        """
        W, bw, probes = self.store.spec.window, self.batch_windows, [self.probes[i] for i in which]
        _, start, stop = self.store.units(split)[unit]  # the same rows in every store (run_extracts checks)
        arrays, parts, n_win = [empty_arrays(self.stores[i].spec, stop - start) for i in which], [], (stop - start) // W
        for b in range(0, n_win, bw):
            e = min(b + bw, n_win)
            try:
                toks = self.tokens.tokens(split)[start + b * W : start + e * W]
                win = torch.from_numpy(toks.astype(np.int64)).view(e - b, W).to(self.device)  # (e-b, W)
                labels = attribute_many(self.teacher, probes, win)
            except Exception as ex:  # anything at all: say where it happened, keep the cause
                where = _windows(start // W + b, start // W + e - 1)
                raise UnitFailed(f"{split} unit {unit}, {where}: {_one_line(ex)}") from ex
            for out, lab in zip(arrays, labels, strict=True):
                _fill(out, lab, b * W, e * W)
            parts.append(toks)
        parts.append(self.tokens.tokens(split)[start + n_win * W : stop])
        return arrays, np.concatenate(parts)

    def label(self, split: str, unit: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The first store's arrays of the unit, and its tokens: what a one-store worker labels."""
        (arrays,), toks = self.labels(split, unit, (0,))
        return arrays, toks

    def run(self, split: str, unit: int, which: Sequence[int] | None = None) -> dict:
        """Label one unit for the stores in which (None: all) and write each store's unit: data first,
        then its completion record. A store written before a failure keeps its unit."""
        t0, which = time.perf_counter(), tuple(range(len(self.stores))) if which is None else tuple(which)
        arrays, toks = self.labels(split, unit, which)
        valid = [self.stores[i].write_unit(split, unit, a, toks, seconds=time.perf_counter() - t0)["valid"]
                 for i, a in zip(which, arrays, strict=True)]
        return {"split": split, "unit": unit, "stores": which, "rows": len(toks), "valid": valid,
                "seconds": round(time.perf_counter() - t0, 3)}


# -- driver ---------------------------------------------------------------------------------------


def resolve_device(cfg: ExtractConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def sae_weights_sha256(sae) -> str:
    """sha256 over the SAE's parameters as loaded: the same SAE in any file format hashes the same."""
    h = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_hook(src, sae_cfg, layer: int, location: str) -> None:
    """sae.check_hook on the meta-device teacher (no weights); on the real one if meta cannot run it."""
    from sae import check_hook

    try:
        check_hook(structure_model(src), sae_cfg, layer, location)
    except UserError:
        raise
    except Exception:  # an architecture whose forward cannot run on meta tensors
        check_hook(load_teacher(src), sae_cfg, layer, location)


def plan(cfg: ExtractConfig, tokens: TokenStore) -> tuple[LabelSpec, dict[str, int]]:
    """Check teacher and SAE against the token store and each other; the spec of the label set.

    Every user mistake raises UserError here, before any store is created or any worker started.
    """
    from sae import load_sae

    splits = list(cfg.splits or tokens.splits)
    split_tokens = {s: tokens.num_tokens(s) for s in splits}  # StoreError names an unknown split
    src = resolve_teacher(cfg.teacher)
    tcfg = teacher_config(src)
    window = cfg.window or min(context_length(tcfg) or 1024, 1024)
    check_teacher(src, tcfg, tokens, splits, window)
    sae = load_sae(cfg.sae)
    if cfg.k > sae.cfg.k:
        raise UserError(f"--topk {cfg.k} exceeds the SAE's {sae.cfg.k} active latents per token; use --topk <= {sae.cfg.k}")
    if cfg.teacher_topk and cfg.teacher_topk > tcfg.vocab_size:
        raise UserError(f"--store-teacher-topk {cfg.teacher_topk} exceeds the teacher's vocabulary ({tcfg.vocab_size})")
    _check_hook(src, sae.cfg, cfg.layer, cfg.location)
    if sae.cfg.hook_layer is not None and (sae.cfg.hook_layer, sae.cfg.hook_location) != (cfg.layer, cfg.location):
        print(f"warning: the SAE was trained on layer {sae.cfg.hook_layer} {sae.cfg.hook_location}, "
              f"extracting at layer {cfg.layer} {cfg.location}", file=sys.stderr)
    inputs = {"teacher": teacher_identity(src),
              "sae": {"weights_sha256": sae_weights_sha256(sae), "config": asdict(sae.cfg)},
              "hook": {"layer": cfg.layer, "location": cfg.location}, "score": SCORE_DEFINITIONS["signed"],
              "precision": "bf16-autocast" if resolve_device(cfg) == "cuda" else "fp32"}
    if cfg.selection != "signed":  # signed keeps exactly the inputs (and fingerprint) stores had before selections
        inputs |= {"score": SCORE_DEFINITIONS[cfg.selection], "selection": cfg.selection}
    spec = LabelSpec(token_fingerprint=tokens.fingerprint, window=window, k=cfg.k, n_latents=sae.cfg.n_latents,
                     inputs=inputs, sae_k=sae.cfg.k if cfg.store_sae_topk else None, teacher_k=cfg.teacher_topk,
                     chunk_windows=cfg.chunk_windows, codec=cfg.codec, formats=tuple(cfg.formats),
                     shard_chunks=cfg.shard_chunks)
    return spec, split_tokens


@contextmanager
def _locked(path: Path, blocking: bool) -> Iterator[None]:
    """flock on path (a folder or a lock file); UserError when another process holds it (non-blocking)."""
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(f"another extraction is writing {path.parent} (it holds {path}); "
                            "wait for it to finish or choose another --out") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def open_store(out: Path, spec: LabelSpec, split_tokens: dict[str, int]) -> LabelStore:
    """Create the store, or reopen it to resume; two first runs racing are serialised on the parent folder."""
    out = Path(out)
    if (out / "manifest.json").is_file():
        old = LabelStore.open(out)
        if old.fingerprint == spec.fingerprint and old.spec != spec:
            raise UserError(f"{out} holds this label set stored with codec {old.spec.codec}, formats "
                            f"{','.join(old.spec.formats)}, {old.spec.chunk_windows} windows per chunk, "
                            f"{old.spec.shard_chunks} chunk(s) per shard; rerun with those options, or convert "
                            "it with `cocomix shards export`")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent.resolve(), blocking=True):
        return LabelStore.create(out, spec, split_tokens)


def _provenance(cfg: ExtractConfig, device: str) -> dict:
    """Informational, outside the fingerprint: where things came from and which versions ran."""
    import ray
    import transformers
    import zarr

    return {"tokens_path": str(Path(cfg.tokens).resolve()), "teacher": cfg.teacher, "sae": str(cfg.sae),
            "device": device, "workers": cfg.workers, "batch_windows": cfg.batch_windows,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "ray": ray.__version__, "zarr": zarr.__version__, "numpy": np.__version__}}


def run_extract(cfg: ExtractConfig) -> dict:
    """Label every missing unit of the label store at cfg.out; a summary dict.

    Raises UserError for bad input (before anything is written), UnitsFailed when some units failed
    (the others are written and recorded; a rerun finishes the rest).
    """
    return run_extracts([cfg])[0]


def run_extracts(cfgs: Sequence[ExtractConfig]) -> list[dict]:
    """Label every unit that any of several label stores lacks, from one teacher pass per batch for
    all of them, and write it to the stores that lack it; a summary dict per store, in cfgs' order.

    cfgs: one per store, each what a one-store extraction of it would take; they agree on SHARED.
    Raises as run_extract; every store is planned (and every mistake found) before any is created.
    """
    check_shared(cfgs)
    tokens = TokenStore.open(cfgs[0].tokens)
    plans = [_plan_named(cfg, tokens, len(cfgs) > 1) for cfg in cfgs]
    stores: list = [None] * len(cfgs)
    # reopen the stores already there first: one holding another label set is refused before any is created
    for i in sorted(range(len(cfgs)), key=lambda i: not Path(cfgs[i].out).exists()):
        stores[i] = open_store(cfgs[i].out, *plans[i])
    with ExitStack() as locks:
        for cfg in sorted(cfgs, key=lambda cfg: Path(cfg.out).resolve()):  # one fixed order for every run
            locks.enter_context(_locked(Path(cfg.out) / ".lock", blocking=False))
        for store in stores:
            recheck_units(store)
        lacking = lacking_units(stores)
        summaries = [{"fingerprint": store.fingerprint, "path": str(cfg.out), "units_run": 0,
                      "units_total": sum(len(store.units(s)) for s in plans[0][1]), "tokens": 0, "seconds": 0.0}
                     for cfg, store in zip(cfgs, stores, strict=True)]
        if not lacking:
            return summaries
        device, writes = resolve_device(cfgs[0]), sorted({i for *_, which in lacking for i in which})
        for i in writes:  # stores with nothing to do keep their manifest untouched
            stores[i].manifest["provenance"] = _provenance(cfgs[i], device)
        t0 = time.perf_counter()
        done, failures = run_units(cfgs, stores, lacking, device)
        seconds = time.perf_counter() - t0
        for i in writes:
            stores[i].consolidate()
            mine = [r for r in done if i in r["stores"]]
            summaries[i] |= {"units_run": len(mine), "tokens": sum(r["rows"] for r in mine), "seconds": seconds}
    if failures:
        raise UnitsFailed(failures, len(lacking))
    return summaries


def check_shared(cfgs: Sequence[ExtractConfig]) -> None:
    """UserError unless the stores have distinct folders and agree on SHARED."""
    if not cfgs:
        raise UserError("no label store to write: give at least one --out")
    outs = [Path(cfg.out).resolve() for cfg in cfgs]
    if dup := next((cfg.out for cfg, out in zip(cfgs, outs, strict=True) if outs.count(out) > 1), None):
        raise UserError(f"--out {dup} is given twice: each label store needs its own folder")
    for name in SHARED:
        if len({getattr(cfg, name) for cfg in cfgs}) > 1:
            raise UserError(f"the stores of one extraction must share {name}; "
                            f"got {', '.join(str(getattr(cfg, name)) for cfg in cfgs)}")


def _plan_named(cfg: ExtractConfig, tokens: TokenStore, several: bool) -> tuple[LabelSpec, dict[str, int]]:
    """plan(cfg), its mistakes naming the store they concern when there are several."""
    if not several:
        return plan(cfg, tokens)
    try:
        return plan(cfg, tokens)
    except UserError as e:
        raise UserError(f"--out {cfg.out}: {e}") from None


def lacking_units(stores: Sequence[LabelStore]) -> list[tuple[str, int, tuple[int, ...]]]:
    """(split, unit, the indices of the stores that lack it) for every unit some store lacks."""
    first, out = stores[0], []
    for split in first.manifest["splits"]:
        for unit, _, _ in first.units(split):
            which = tuple(i for i, store in enumerate(stores) if not store.is_complete(split, unit))
            if which:
                out.append((split, unit, which))
    return out


def recheck_units(store: LabelStore) -> list[tuple[str, int]]:
    """Completed units whose data no longer matches their record (a chunk file truncated, rewritten or
    missing, a record without data): each is named on stderr and its record removed, so that this run
    labels it again. Reads every finished chunk once (checksums), cheap beside labelling it."""
    from storage_schemas import unit_problems

    broken = []
    for split in store.manifest["splits"]:
        for unit, _, _ in store.units(split):
            if store.is_complete(split, unit) and (problems := unit_problems(store, split, unit)):
                print(f"warning: {problems[0]}; labelling {split} unit {unit} again", file=sys.stderr)
                store.record_path(split, unit).unlink()
                broken.append((split, unit))
    return broken


def run_units(cfgs: Sequence[ExtractConfig], stores: Sequence[LabelStore],
              units: list[tuple[str, int, tuple[int, ...]]], device: str) -> tuple[list[dict], list[str]]:
    """Run units (split, unit, stores to write) on a pool of Ray actors, each fed its next unit as soon
    as it is free."""
    import ray
    from tqdm import tqdm

    cfg, store = cfgs[0], stores[0]  # the stores' units cover the same rows
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True)
    try:
        actors = _start_actors(cfgs, device)
        spans = {s: store.units(s) for s in {s for s, *_ in units}}
        desc = f"labels {store.fingerprint[:12]}" if len(stores) == 1 else f"labels of {len(stores)} stores"
        bar = tqdm(total=sum(spans[s][u][2] - spans[s][u][1] for s, u, _ in units), unit="tok", unit_scale=True,
                   disable=not cfg.progress, file=sys.stderr, desc=desc)
        with bar:
            return _schedule(actors, units, bar)
    finally:
        if started:
            ray.shutdown()


def _start_actors(cfgs: Sequence[ExtractConfig], device: str) -> list:
    """cfg.workers actors, each labelling for every store of cfgs."""
    import ray

    cfg = cfgs[0]
    resources = ray.cluster_resources()
    if device == "cuda":
        if cfg.workers > resources.get("GPU", 0):
            raise UserError(f"--workers {cfg.workers} exceeds the cluster's {resources.get('GPU', 0):g} GPUs")
        cpus, threads = 1, cfg.threads or 1
    else:
        if cfg.workers > resources.get("CPU", 0):
            raise UserError(f"--workers {cfg.workers} exceeds the cluster's {resources.get('CPU', 0):g} CPUs")
        cpus = max(1, int(resources["CPU"]) // cfg.workers)
        threads = cfg.threads or cpus
    teacher = str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).is_dir() else cfg.teacher  # workers' cwd differs
    jobs = [UnitJob(tokens=str(Path(cfg.tokens).resolve()), out=str(Path(c.out).resolve()), teacher=teacher,
                    sae=str(Path(c.sae).resolve()), layer=c.layer, location=c.location,
                    batch_windows=cfg.batch_windows, device=device, threads=threads, selection=c.selection)
            for c in cfgs]
    # A dead worker is restarted (teacher and SAE reloaded) and its unit retried: units are idempotent.
    actor = ray.remote(ExtractWorker).options(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0,
                                              max_restarts=2, max_task_retries=2)
    return [actor.remote(*jobs) for _ in range(cfg.workers)]


def _failure(unit: tuple, e: Exception) -> str:
    cause = getattr(e, "cause", None) or e  # ray.get re-raises a worker's exception wrapped in RayTaskError
    if isinstance(cause, UnitFailed | UserError):
        return str(cause)
    return f"{unit[0]} unit {unit[1]}: {_one_line(cause)}"


def _schedule(actors: list, units: list[tuple[str, int, tuple[int, ...]]], bar) -> tuple[list[dict], list[str]]:
    """Feed units to idle actors; a failed unit is reported and the rest go on. Dead actors leave the pool."""
    import ray
    from ray.exceptions import RayActorError

    queue, idle, running = list(reversed(units)), list(actors), {}
    done, failures = [], []
    while queue or running:
        while queue and idle:
            actor, unit = idle.pop(), queue.pop()
            running[actor.run.remote(*unit)] = (actor, unit)
        if not running:  # every actor died: nothing can run the rest
            failures += [f"{s} unit {u}: not run, no live workers left" for s, u, _ in queue]
            break
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, unit = running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as e:
            failures.append(_failure(unit, e))
            continue  # this actor is gone for good (Ray already spent its restarts)
        except Exception as e:
            failures.append(_failure(unit, e))
        else:
            done.append(result)
            bar.update(result["rows"])
            bar.set_postfix(units=f"{len(done)}/{len(units)}")
        idle.append(actor)
    return done, failures
