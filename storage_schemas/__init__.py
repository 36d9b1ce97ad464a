"""The on-disk contracts between the pipeline and the trainer.

Token stores (`TokenStore`, `TokenStoreWriter`) hold the corpus; label stores (`LabelStore`, `LabelSpec`)
hold the concept labels aligned 1:1 with a token store. Both are folders of Zarr v3 arrays plus a
versioned manifest.json; raw chunks are read as zero-copy memory maps (`ChunkedArray`).
This package imports nothing else of cocomix.
"""

from .errors import StoreError, UserError
from .io import ChunkedArray, fingerprint_json, sha256_file, write_json_atomic
from .label_store import LabelSpec, LabelStore
from .token_store import TokenStore, TokenStoreWriter, dtype_for_vocab, tokenizer_fingerprint
from .validate import store_info, store_kind, unit_problems, validate_store

__all__ = [
    "ChunkedArray", "LabelSpec", "LabelStore", "StoreError", "TokenStore", "TokenStoreWriter", "UserError",
    "dtype_for_vocab", "fingerprint_json", "sha256_file", "store_info", "store_kind", "tokenizer_fingerprint",
    "unit_problems", "validate_store", "write_json_atomic",
]
