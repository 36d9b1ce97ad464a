"""Training data: windows of a token store on the label grid, with their aligned labels.

Window i of a split is tokens[iW : (i+1)W] (offset 0, the grid the labels were extracted on); its
targets are tokens[iW+1 : (i+1)W+1], and the very last target of a split is -1 (ignored). Row j of a
label store labels token j, so window i's labels are rows [iW, (i+1)W) of every label array.

Reads never go through zarr per sample: raw chunks are memory maps, viewed as (windows, W, ...) and
fancy-indexed (one copy into the batch); zstd and Parquet chunks are decoded a chunk at a time by
`storage_schemas` and the decoded chunks are kept up to a memory budget. The window order is a
permutation per epoch drawn from (seed, epoch), so a position in the stream is all a checkpoint needs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch

from storage_schemas import (
    ChunkedArray,
    LabelStore,
    StoreError,
    TokenStore,
    UserError,
    validate_store,
)
from trainer.config import TrainConfig


def take_rows(arr: ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """arr[rows] for any row indices (N,) -> (N, *row_shape); one fancy index per chunk touched."""
    out = np.empty((len(rows), *arr.row_shape), arr.dtype)
    chunks = rows // arr.chunk_rows
    for c in np.unique(chunks):
        sel = chunks == c
        out[sel] = arr.chunk(int(c))[rows[sel] - c * arr.chunk_rows]
    return out


class WindowReader:
    """Whole windows of one chunked array: (B,) window ids -> (B, W, *row_shape)."""

    def __init__(self, arr: ChunkedArray, window: int, cache_bytes: int = 1 << 28):
        self.arr, self.W = arr, window
        self.aligned = arr.chunk_rows % window == 0  # label stores always; token stores when W | chunk
        self.per_chunk = arr.chunk_rows // window
        self._views: OrderedDict[int, np.ndarray] = OrderedDict()
        self._budget, self._decoded = cache_bytes, 0

    def view(self, c: int) -> np.ndarray:
        """Chunk c as (windows, W, *row_shape); memmaps are kept for free, decoded chunks up to the budget."""
        if c in self._views:
            self._views.move_to_end(c)
            return self._views[c]
        chunk = self.arr.chunk(c)
        full = len(chunk) // self.W
        v = chunk[: full * self.W].reshape(full, self.W, *self.arr.row_shape)
        if not isinstance(chunk, np.memmap):
            self._decoded += v.nbytes
            while self._decoded > self._budget and self._views:
                _, old = self._views.popitem(last=False)
                self._decoded -= 0 if isinstance(old, np.memmap) else old.nbytes
        self._views[c] = v
        return v

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        W = self.W
        if not self.aligned:
            rows = (windows[:, None] * W + np.arange(W)).reshape(-1)
            return take_rows(self.arr, rows).reshape(len(windows), W, *self.arr.row_shape)
        chunks, local = np.divmod(windows, self.per_chunk)
        if len(windows) and (chunks == chunks[0]).all():
            return self.view(int(chunks[0]))[local]  # the common case in small stores: one copy
        out = np.empty((len(windows), W, *self.arr.row_shape), self.arr.dtype)
        for j, (c, i) in enumerate(zip(chunks.tolist(), local.tolist(), strict=True)):
            out[j] = self.view(c)[i]
        return out


class WindowData:
    """Batches of windows of one split: tokens, next-token targets and (cocomix / kd) aligned labels."""

    def __init__(self, tokens: TokenStore, split: str, window: int, labels: LabelStore | None = None,
                 mode: str = "ntp", positive_only: bool = True, by_source: bool = False):
        self.split, self.W, self.mode, self.positive_only = split, window, mode, positive_only
        self.tokens = tokens.tokens(split)
        # evaluation reports each source (domain) of the corpus: the source of every token, when known
        self.sources = tokens.token_sources(split) if by_source else None
        self.source_names = tokens.source_names if self.sources is not None else []
        self.n_tokens = len(self.tokens)
        self.n_windows = self.n_tokens // window
        self._tok = WindowReader(self.tokens, window)
        names = {"cocomix": ("ids", "scores", "valid"), "kd": ("teacher_ids", "teacher_logprobs")}
        wanted = names.get(mode, ()) if labels is not None else ()
        self._labels = {n: WindowReader(labels.array(split, n), window) for n in wanted}
        self._label_store = labels

    def batch(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """windows (B,) -> idx, targets (B, W) int64 [+ concept_ids, concept_mask (B, W, k)]
        [+ teacher_ids (B, W, K) int64, teacher_logprobs (B, W, K) float32]."""
        windows = np.asarray(windows, np.int64)
        idx = self._tok(windows).astype(np.int64)
        nxt_pos = (windows + 1) * self.W  # the token after each window; past the split's end: none
        nxt = np.full(len(windows), -1, np.int64)
        inside = nxt_pos < self.n_tokens
        nxt[inside] = take_rows(self.tokens, nxt_pos[inside])
        out = {"idx": idx, "targets": np.concatenate([idx[:, 1:], nxt[:, None]], axis=1)}
        if self.sources is not None:  # the source of each target token (the last target's may be past the end)
            pos = np.minimum(windows[:, None] * self.W + np.arange(1, self.W + 1), self.n_tokens - 1)
            out["target_sources"] = self.sources[pos].astype(np.int64)
        if "ids" in self._labels:
            valid = self._labels["valid"](windows)[:, :, None]  # (B, W, 1)
            scores = self._labels["scores"](windows)
            out["concept_ids"] = self._labels["ids"](windows).astype(np.int64)
            out["concept_mask"] = valid & (scores > 0) if self.positive_only else np.repeat(valid, scores.shape[-1], -1)
            self._check_ids(out["concept_ids"][out["concept_mask"]], windows)
        if "teacher_ids" in self._labels:
            out["teacher_ids"] = self._labels["teacher_ids"](windows).astype(np.int64)
            out["teacher_logprobs"] = self._labels["teacher_logprobs"](windows).astype(np.float32)
        return out

    def _check_ids(self, used: np.ndarray, windows: np.ndarray) -> None:
        """A concept id outside the concept head would crash the step (or assert on CUDA): refuse in one line."""
        n = self._label_store.spec.n_latents
        if used.size and (bad := int(used.max())) >= n:
            raise StoreError(f"label store {self._label_store.path} holds concept id {bad} >= its {n} latents "
                             f"({self.split} windows {windows.min()}..{windows.max()}): run `cocomix shards validate`")


class WindowOrder:
    """The training stream: epoch e visits every window once, in permutation(seed, e).

    Stream position p is window order(p // n)[p % n]; a checkpoint stores p. Under DDP every rank
    computes the same stream and takes its own micro-batches from it (see `micro_batch`)."""

    def __init__(self, n_windows: int, seed: int):
        self.n, self.seed = n_windows, seed
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def take(self, position: int, count: int) -> np.ndarray:
        """Window ids at stream positions [position, position + count), (count,) int64."""
        parts = []
        while count > 0:
            epoch, i = divmod(position, self.n)
            part = self.perm(epoch)[i : i + count]
            parts.append(part)
            position, count = position + len(part), count - len(part)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


def micro_batch(order: WindowOrder, step: int, micro: int, cfg: TrainConfig) -> np.ndarray:
    """Windows of micro-batch `micro` (0 .. grad_accum-1) of optimizer step `step`: a fixed slice of the
    stream, so any split of the micro-batches among ranks sees the same windows as one process."""
    per_step = cfg.batch_size * cfg.grad_accum
    return order.take(step * per_step + micro * cfg.batch_size, cfg.batch_size)


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors on device (pinned, asynchronous copies on CUDA)."""
    cuda = device.type == "cuda"
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    return {k: (t.pin_memory() if cuda else t).to(device, non_blocking=cuda) for k, t in tensors.items()}


# --- opening and checking the stores -----------------------------------------------------------

def open_stores(cfg: TrainConfig) -> tuple[TrainConfig, TokenStore, LabelStore | None]:
    """Open the stores, refuse any mismatch (one line naming both values) and fill vocab_size and
    n_concepts from them. Runs before the model is built, so nothing is trained on bad input."""
    if not cfg.tokens:
        raise UserError("no token store given: pass --tokens DIR (made by `cocomix tokenize`)")
    ts = TokenStore.open(cfg.tokens)
    cfg = _check_tokens(cfg, ts)
    if cfg.mode not in ("cocomix", "kd"):
        return cfg, ts, None
    if not cfg.labels:
        raise UserError(f"{cfg.mode} mode needs concept labels: pass --labels DIR (made by `cocomix extract`)")
    labels = LabelStore.open(cfg.labels)
    _check_labels(cfg, ts, labels)
    if cfg.mode == "cocomix":
        n = labels.spec.n_latents
        if cfg.n_concepts and cfg.n_concepts != n:
            raise UserError(f"n_concepts {cfg.n_concepts} differs from the label store's SAE latents {n}: "
                            f"set n_concepts={n} (or 0 to take it from the store)")
        cfg = replace(cfg, n_concepts=n)
    return cfg, ts, labels


def _check_tokens(cfg: TrainConfig, ts: TokenStore) -> TrainConfig:
    if "train" not in ts.splits:
        raise UserError(f"token store {ts.path} has no train split (it has {', '.join(ts.splits)})")
    if ts.num_windows("train", cfg.block_size) == 0:
        raise UserError(f"the train split of {ts.path} has {ts.num_tokens('train')} tokens, "
                        f"fewer than one window of block_size {cfg.block_size}")
    if cfg.eval_windows and ("val" not in ts.splits or ts.num_windows("val", cfg.block_size) == 0):
        raise UserError(f"token store {ts.path} has no val windows of {cfg.block_size} tokens: "
                        f"set eval_windows=0 to train without validation")
    if cfg.vocab_size and cfg.vocab_size < ts.vocab_size:
        raise UserError(f"vocab_size {cfg.vocab_size} is smaller than the token store's {ts.vocab_size}: "
                        f"set vocab_size=0 to take it from the store")
    return replace(cfg, vocab_size=cfg.vocab_size or ts.vocab_size)


def _check_labels(cfg: TrainConfig, ts: TokenStore, labels: LabelStore) -> None:
    spec = labels.spec
    if spec.token_fingerprint != ts.fingerprint:
        raise UserError(f"label store {labels.path} was made from token store {spec.token_fingerprint[:12]}, "
                        f"but {ts.path} is {ts.fingerprint[:12]}: use the labels of this token store")
    if spec.window != cfg.block_size or spec.offset != 0:
        raise UserError(f"label store {labels.path} has windows of {spec.window} tokens (offset {spec.offset}), "
                        f"block_size is {cfg.block_size}: set block_size={spec.window}")
    if "train" not in labels.manifest["splits"] or labels.num_rows("train") != ts.num_tokens("train"):
        raise UserError(f"label store {labels.path} does not cover the train split of {ts.path}")
    missing = labels.missing_units()
    if missing:
        split, unit = missing[0]
        raise UserError(f"label store {labels.path} is incomplete ({len(missing)} units missing, first "
                        f"{split}-{unit:06d}): finish it with `cocomix extract` before training")
    # cheap: records, chunk files and their sizes, no data read (checksums are `cocomix shards validate`'s job)
    if problems := validate_store(labels.path, checksums=False):
        raise UserError(f"label store {labels.path} is damaged ({len(problems)} problem(s), first: {problems[0]}): "
                        f"rerun `cocomix extract` to repair it")
    if cfg.mode == "kd" and not spec.teacher_k:
        raise UserError(f"kd mode needs the teacher's top-K in the labels, and {labels.path} has none: "
                        f"extract with --store-teacher-topk K")
