"""The teacher: any `transformers` causal LM, frozen, and the checks that tie it to a token store.

A teacher is a local folder or a hub name resolved in the offline cache (HF_HUB_OFFLINE=1). Checks run
before any unit of work, and are cheap: the driver builds the model on the meta device (no weights),
so a 7B teacher costs no memory there; only the workers load weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from storage_schemas import TokenStore, UserError, sha256_file, tokenizer_fingerprint
from storage_schemas.token_store import TOKENIZER_FILES

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # transformers prefers safetensors when both exist


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's files are on this machine."""

    name: str
    """What the user passed: a folder or a hub name."""
    folder: Path
    """The folder holding config.json and the weights (the hub snapshot for a hub name)."""
    revision: str | None
    """The hub commit of the snapshot; None for a local folder."""


def resolve_teacher(name: str) -> TeacherSource:
    """A local folder as is; a hub name through the offline cache. UserError when neither exists."""
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"teacher folder {name} has no config.json; pass a transformers model folder")
        return TeacherSource(name, Path(name), None)
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # hub errors have many types; all mean "not available offline"
        raise UserError(f"teacher {name!r} is neither a local folder nor a cached hub model "
                        f"({type(e).__name__}); download it first or pass a folder") from None
    return TeacherSource(name, folder, folder.name)


def teacher_config(src: TeacherSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the teacher config in {src.folder}: {str(e).splitlines()[0][:200]}") from None


def structure_model(src: TeacherSource) -> nn.Module:
    """The teacher's modules on the meta device: shapes and hook points, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(teacher_config(src)).eval()


def load_teacher(src: TeacherSource, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """The teacher in eval mode with every parameter frozen (requires_grad False)."""
    from sae.hooks import load_teacher as load

    return load(str(src.folder), device, dtype)


def context_length(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _blob_sha256(f: Path) -> str:
    """A hub cache names LFS blobs by their sha256: reuse it instead of re-reading gigabytes."""
    target = f.resolve()
    return target.name if re.fullmatch(r"[0-9a-f]{64}", target.name) else sha256_file(target)


def teacher_identity(src: TeacherSource) -> dict:
    """What identifies the teacher in a label-set fingerprint: id, revision, config and weights hashes."""
    weights = []
    for pattern in WEIGHT_PATTERNS:
        weights = sorted(src.folder.glob(pattern))
        if weights:
            break
    if not weights:
        raise UserError(f"teacher folder {src.folder} holds no weights ({' or '.join(WEIGHT_PATTERNS)})")
    ident = src.name if src.revision else Path(src.name).resolve().name  # a folder's location is not identity
    return {"id": ident, "revision": src.revision, "config_sha256": sha256_file(src.folder / "config.json"),
            "weights_sha256": {f.name: _blob_sha256(f) for f in weights}}


def max_token_id(tokens: TokenStore, splits: list[str]) -> int:
    """Largest id in the given splits, a memory-mapped chunk at a time."""
    best = -1
    for s in splits:
        arr = tokens.tokens(s)
        for c in range(arr.num_chunks):
            best = max(best, int(np.max(arr.chunk(c), initial=0)))
    return best


def check_teacher(src: TeacherSource, config, tokens: TokenStore, splits: list[str], window: int) -> None:
    """UserError, naming both values, when the teacher cannot label this token store with this window."""
    vocab = int(config.vocab_size)
    # The store's own vocabulary bounds its ids; scan the tokens only when that bound does not settle it.
    if tokens.vocab_size > vocab and (top := max_token_id(tokens, splits)) >= vocab:
        raise UserError(f"token id {top} in {tokens.path} is outside the teacher's vocabulary ({vocab}); "
                        "tokenize with the teacher's tokenizer")
    ctx = context_length(config)
    if ctx is not None and window > ctx:
        raise UserError(f"window {window} is longer than the teacher's context ({ctx}); use --window <= {ctx}")
    if any((src.folder / f).is_file() for f in TOKENIZER_FILES):
        theirs = tokenizer_fingerprint(src.folder)
        if theirs != tokens.tokenizer_fingerprint:
            raise UserError(f"the teacher's tokenizer ({theirs[:12]}) differs from the token store's "
                            f"({tokens.tokenizer_fingerprint[:12]}); tokenize with --tokenizer {src.name}")
