"""Tokenize stage: text corpus -> token store (DESIGN.md "Stores").

Inputs are `.txt` files (one document each), `.jsonl` / `.jsonl.gz` (one document per line, a
`text` field), `.parquet` (a `text` column), or folders of these (searched recursively, sorted, so
the document order is deterministic; other files in a folder are ignored).

Train/val split: by document, from a hash of the document's key and the seed, never from RNG
order, so adding a file does not move any other document between splits. The key is the
document's `id` field/column when it has one, else `<file>:<line or row>` (`<file>` for .txt),
with `<file>` relative to the input argument. `train_fraction` < 1 keeps only that share of the
train documents, decided by the same hash (the val split does not change, and a larger fraction
keeps a superset): a small train split for multi-epoch, data-limited runs such as `make demo`.

Invalid UTF-8 is refused by default: the error names the file and the byte offset (in the
decompressed stream for .gz) and the line or row. A corpus known to hold a few stray bytes can be
tokenized with `invalid_utf8="replace"` (`--invalid-utf8 replace`): each bad sequence becomes
U+FFFD and one warning per file names its first bad offset. Silently altering training text is
worse than stopping, hence the default.

Each document's ids are followed by the tokenizer's eos id. Encoding uses the Rust tokenizer's
`encode_batch_fast` (no offsets; special tokens are not added) over batches of documents, in
process (already multi-threaded) or over a pool of `workers` processes, order preserved.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from storage_schemas import (
    StoreError,
    TokenStore,
    TokenStoreWriter,
    UserError,
    dtype_for_vocab,
    fingerprint_json,
    sha256_file,
)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
EOS_TOKEN = "<|endoftext|>"
# Files a tokenizer folder is made of; copied from a local folder so that a teacher's folder
# (weights included) does not travel into the store, and tokenizer.json keeps its exact bytes.
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                        "tokenizer.model", "chat_template.jinja")


@dataclass(frozen=True)
class TokenizeConfig:
    """Everything `cocomix tokenize` needs."""

    inputs: tuple[Path, ...]
    """Files or folders of .txt / .jsonl / .jsonl.gz / .parquet."""
    out: Path
    """Token store folder to create."""
    tokenizer: str | None = None
    """Hub name (offline cache) or local folder; ignored when train_vocab is set."""
    train_vocab: int | None = None
    """Train a byte-level BPE with this vocabulary size on the train split."""
    val_fraction: float = 0.03
    train_fraction: float = 1.0
    """Share of the train documents kept (by the split hash); the val split is unchanged."""
    seed: int = 0
    workers: int = 1
    """Encoding processes; 1 encodes in process (the Rust encoder already uses every core)."""
    chunk_tokens: int = 1 << 20
    batch_docs: int = 256
    invalid_utf8: Literal["refuse", "replace"] = "refuse"
    progress: bool = True

    def __post_init__(self):
        if not self.inputs:
            raise UserError("no --input given: pass one or more files or folders")
        if (self.tokenizer is None) == (self.train_vocab is None):
            raise UserError("pass exactly one of --tokenizer NAME|DIR and --train-tokenizer VOCAB")
        if self.train_vocab is not None and not 257 <= self.train_vocab <= 1 << 20:
            raise UserError(f"--train-tokenizer {self.train_vocab}: the vocabulary must be 257..1048576 "
                            "(256 bytes plus the eos token at least)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"--train-fraction {self.train_fraction}: must be in (0, 1]")
        if self.workers < 1 or self.chunk_tokens < 1 or self.batch_docs < 1:
            raise UserError("--workers, --chunk-tokens and the batch size must be positive")
        if self.invalid_utf8 not in ("refuse", "replace"):
            raise UserError(f"--invalid-utf8 {self.invalid_utf8!r}: choose refuse or replace")


# ---------------------------------------------------------------- reading the corpus

def find_sources(inputs: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """(file, name used in document keys) for every input file, folders expanded in sorted order."""
    sources = []
    for arg in map(Path, inputs):
        if not arg.exists():
            raise UserError(f"input {arg} does not exist")
        if arg.is_dir():
            files = sorted(p for p in arg.rglob("*") if p.is_file() and _kind(p))
            if not files:
                raise UserError(f"folder {arg} holds no {'/'.join(SUFFIXES)} files")
            sources += [(p, p.relative_to(arg).as_posix()) for p in files]
        elif _kind(arg):
            sources.append((arg, arg.name))
        else:
            raise UserError(f"input {arg}: unknown file type; use {', '.join(SUFFIXES)} or a folder of them")
    return sources


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def read_documents(path: Path, name: str, invalid_utf8: str = "refuse") -> Iterator[tuple[str, str]]:
    """Yield (key, text) for each document of one input file."""
    kind = _kind(path)
    decoder = _Decoder(path, invalid_utf8, compressed=kind == ".jsonl.gz")
    if kind == ".txt":
        yield name, decoder(path.read_bytes(), 0, "")
    elif kind == ".parquet":
        yield from _read_parquet(path, name, decoder)
    else:
        yield from _read_jsonl(path, name, decoder, gzip.open if kind == ".jsonl.gz" else open)


def _read_jsonl(path: Path, name: str, decoder, opener) -> Iterator[tuple[str, str]]:
    offset = 0
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            line = decoder(raw, start, f" (line {line_no})")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{line_no}: no string 'text' field; every line needs one")
            doc_id = record.get("id")
            yield (str(doc_id) if doc_id is not None else f"{name}:{line_no}"), text


def _read_parquet(path: Path, name: str, decoder) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if "text" not in columns:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(columns)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"] + (["id"] if "id" in columns else [])):
        # Read as bytes so invalid UTF-8 is reported like for the other formats.
        texts = batch.column("text").cast(pa.large_binary()).to_pylist()
        ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
        for raw, doc_id in zip(texts, ids, strict=True):
            if raw is None:
                raise UserError(f"{path}: row {row} has a null 'text'; every row needs one")
            yield (str(doc_id) if doc_id is not None else f"{name}:{row}"), decoder(raw, 0, f" (row {row})")
            row += 1


class _Decoder:
    """UTF-8 decoding with the module's policy: refuse naming file and offset, or replace and warn once."""

    def __init__(self, path: Path, policy: str, compressed: bool):
        self.path, self.policy, self.warned = path, policy, False
        self.where = " of the decompressed data" if compressed else ""

    def __call__(self, raw: bytes, base: int, place: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            at = f"{self.path}: invalid UTF-8 at byte {base + e.start}{self.where}{place}"
            if self.policy == "refuse":
                raise UserError(f"{at}; fix the file or pass --invalid-utf8 replace") from None
            if not self.warned:
                print(f"warning: {at}; replacing invalid bytes with U+FFFD in this file", file=sys.stderr)
                self.warned = True
            return raw.decode("utf-8", errors="replace")


def split_of(key: str, seed: int, val_fraction: float, train_fraction: float = 1.0) -> str | None:
    """'val' for a fixed share of keys, decided by the key and seed alone; 'train' for train_fraction
    of the rest, None (dropped) for the others. The hash u in [0, 1) is cut at val_fraction, then
    at val_fraction + train_fraction * (1 - val_fraction): changing train_fraction never moves a
    document into or out of val."""
    h = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2.0**64
    if u < val_fraction:
        return "val"
    return "train" if train_fraction >= 1.0 or u < val_fraction + train_fraction * (1 - val_fraction) else None


def iter_corpus(cfg: TokenizeConfig, sources: list[tuple[Path, str]]) -> Iterator[tuple[tuple[str, int], str]]:
    """((split, source index), text) for every kept document, in input order."""
    for src, (path, name) in enumerate(sources):
        for key, text in read_documents(path, name, cfg.invalid_utf8):
            if split := split_of(key, cfg.seed, cfg.val_fraction, cfg.train_fraction):
                yield (split, src), text


# ---------------------------------------------------------------- tokenizers

def train_bpe(texts: Iterator[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE (GPT-2 style, `<|endoftext|>` as eos) and save it as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                      unk_token=EOS_TOKEN)
    wrapped.save_pretrained(out_dir)


def load_tokenizer(name: str):
    """A fast transformers tokenizer from a local folder or a hub name (offline cache)."""
    from transformers import AutoTokenizer

    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILE_NAMES):
        raise UserError(f"--tokenizer {name}: the folder holds no tokenizer files ({', '.join(TOKENIZER_FILE_NAMES[:6])})")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer {name!r} ({first}); pass a local folder or a cached hub name") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise UserError(f"tokenizer {name!r} has no fast (Rust) backend; convert it or pass another")
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {name!r} has no eos token; documents cannot be joined without one")
    return tok


def _copy_tokenizer_files(name: str, tok, dest: Path) -> None:
    """The tokenizer's own files (exact bytes when it came from a folder), else save_pretrained."""
    src = Path(name)
    if not src.is_dir():
        try:
            from huggingface_hub import snapshot_download
            src = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not in the cache as a snapshot: fall back to re-serialising
            src = None
    files = [src / f for f in TOKENIZER_FILE_NAMES if src is not None and (src / f).is_file()]
    dest.mkdir(parents=True)
    if files:
        for f in files:
            shutil.copyfile(f, dest / f.name)
    else:
        tok.save_pretrained(dest)


# ---------------------------------------------------------------- encoding

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str, threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read by the Rust pool on first use
    from tokenizers import Tokenizer

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode(tok, texts: list[str], dtype: str) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def _encode_in_worker(args: tuple[list[str], str]) -> list[np.ndarray]:
    return _encode(_WORKER_TOKENIZER, *args)


def _batches(docs: Iterator[tuple[object, str]], size: int) -> Iterator[tuple[list, list[str]]]:
    """(tags, texts) per batch of `size` documents; a tag (split and source) travels with its document."""
    splits, texts = [], []
    for split, text in docs:
        splits.append(split)
        texts.append(text)
        if len(texts) == size:
            yield splits, texts
            splits, texts = [], []
    if texts:
        yield splits, texts


def encode_corpus(docs: Iterator[tuple[str, str]], backend, cfg: TokenizeConfig,
                  dtype: str) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """(splits, ids per document) per batch, in input order; a process pool when cfg.workers > 1."""
    batches = _batches(docs, cfg.batch_docs)
    if cfg.workers == 1:
        for splits, texts in batches:
            yield splits, _encode(backend, texts, dtype)
        return
    pending: list[list[str]] = []

    def feed():  # remembers each batch's splits; only the texts travel to the workers
        for splits, texts in batches:
            pending.append(splits)
            yield texts, dtype

    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    ctx = mp.get_context("spawn")  # fork after the Rust pool started would deadlock it
    with ctx.Pool(cfg.workers, _init_worker, (backend.to_str(), threads)) as pool:
        for ids in pool.imap(_encode_in_worker, feed()):
            yield pending.pop(0), ids


# ---------------------------------------------------------------- the stage

def tokenize_corpus(cfg: TokenizeConfig) -> dict:
    """Build the token store at cfg.out and return its manifest (the existing one when up to date)."""
    sources = find_sources(cfg.inputs)
    out = Path(cfg.out)
    hashes = [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p, _ in sources]
    request = {"sources": [h["sha256"] for h in hashes], "seed": cfg.seed, "val_fraction": cfg.val_fraction,
               "tokenizer": cfg.tokenizer, "train_vocab": cfg.train_vocab, "chunk_tokens": cfg.chunk_tokens,
               "invalid_utf8": cfg.invalid_utf8, "tokenizer_files": _tokenizer_files_hash(cfg.tokenizer)}
    if cfg.train_fraction < 1.0:  # only then, so that stores made before this option stay up to date
        request["train_fraction"] = cfg.train_fraction
    existing = _existing_store(out, fingerprint_json(request))
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tok-", dir=out.parent))
    try:
        tok_dir, tok = _prepare_tokenizer(cfg, sources, work)
        extra = {"sources": hashes, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                 "train_fraction": cfg.train_fraction,
                 "tokenizer": cfg.tokenizer or f"byte-level BPE {cfg.train_vocab} (trained on train split)",
                 "request_fingerprint": fingerprint_json(request), "created_by": "cocomix tokenize"}
        return _write_store(cfg, sources, tok, tok_dir, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenizer_files_hash(name: str | None) -> str | None:
    """A local tokenizer folder's content, so that editing it makes the request differ (a name is its own id)."""
    if name is None or not Path(name).is_dir():
        return None
    return fingerprint_json({f: sha256_file(Path(name, f)) for f in TOKENIZER_FILE_NAMES if Path(name, f).is_file()})


def _existing_store(out: Path, request_fp: str) -> dict | None:
    """The manifest when out already holds this very store; refuse when it holds anything else."""
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None  # an empty folder is as good as none; removed just before the rename
    try:
        manifest = TokenStore.open(out).manifest
    except StoreError:
        raise UserError(f"--out {out} exists and is not a token store; choose another --out or remove it") from None
    if manifest.get("request_fingerprint") != request_fp:
        raise UserError(f"--out {out} holds a different token store (other inputs or settings); "
                        "choose another --out or remove it")
    print(f"{out} is up to date (same inputs and settings); nothing to do", file=sys.stderr)
    return manifest


def _prepare_tokenizer(cfg: TokenizeConfig, sources, work: Path):
    """(folder of tokenizer files for the store, loaded tokenizer); trains one when asked."""
    tok_dir = work / "tokenizer"
    if cfg.train_vocab is not None:
        texts = (text for (split, _), text in iter_corpus(cfg, sources) if split == "train")
        train_bpe(texts, cfg.train_vocab, tok_dir)
        return tok_dir, load_tokenizer(str(tok_dir))
    tok = load_tokenizer(cfg.tokenizer)
    _copy_tokenizer_files(cfg.tokenizer, tok, tok_dir)
    return tok_dir, tok


def _write_store(cfg: TokenizeConfig, sources, tok, tok_dir: Path, extra: dict) -> dict:
    from tqdm import tqdm

    vocab = len(tok)
    dtype = dtype_for_vocab(vocab)
    if cfg.out.is_dir() and not any(cfg.out.iterdir()):
        cfg.out.rmdir()  # the writer renames its temporary folder into place
    writer = TokenStoreWriter(cfg.out, dtype=dtype, eos_id=tok.eos_token_id, vocab_size=vocab,
                              tokenizer_dir=tok_dir, chunk_tokens=cfg.chunk_tokens)
    counts = {"train": 0, "val": 0}
    # documents per split per source, in input order: with doc_offsets this says which source (domain)
    # every token came from, so evaluation can report each domain (TokenStore.token_sources)
    per_source = {"train": [0] * len(sources), "val": [0] * len(sources)}
    try:
        # disable=None: a bar on a terminal only, so logs and pipes stay clean
        bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=None if cfg.progress else True)
        for splits, ids in encode_corpus(iter_corpus(cfg, sources), tok.backend_tokenizer, cfg, dtype):
            for (split, src), doc in zip(splits, ids, strict=True):
                writer.add_document(split, doc)
                counts[split] += 1
                per_source[split][src] += 1
            bar.update(sum(len(d) + 1 for d in ids))
        bar.close()
        _check_splits(counts, cfg)
        return writer.finish(extra | {"source_documents": {k: v for k, v in per_source.items() if counts[k]}})
    except BaseException as e:
        writer.abort()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(cfg.out)  # a full disk: zarr's error names no file, so name the store
        raise


def _check_splits(counts: dict[str, int], cfg: TokenizeConfig) -> None:
    total = counts["train"] + counts["val"]
    if total == 0:
        raise UserError("the corpus is empty: the inputs hold no documents")
    if counts["train"] == 0 and cfg.train_fraction < 1.0:
        raise UserError(f"--train-fraction {cfg.train_fraction} keeps none of the train documents "
                        f"(only {counts['val']} val documents): raise it")
    if counts["train"] == 0 or (cfg.val_fraction > 0 and counts["val"] == 0):
        raise UserError(f"{counts['train']} train and {counts['val']} val documents of {total}: "
                        "one split is empty; change --val-fraction (0 for no val split) or add documents")
