"""The offline pipeline: corpus -> token store -> (teacher + SAE) -> label store, and the `cocomix` CLI.

    tokenize.py      TokenizeConfig, tokenize_corpus (and byte-level BPE training)
    teacher.py       teacher loading and checks against a token store
    attribution.py   attribute(): the pure attribution kernel, a batch of windows -> concept labels
    extract.py       ExtractConfig, run_extract(): the Ray job over work units of a label store
    concepts.py      concept statistics and contexts from label shards (polars)
    study.py         StudyConfig, run_study(): every arm x seed on shared label stores, resumable
    tasks.py         the offline downstream tasks (data/tasks) built from the corpus's val documents
    cli*.py          the Typer app (`pipeline.cli:app`) and its command groups

Names are imported lazily so that `import pipeline.cli` (and `cocomix --help`) does not load torch or ray.
"""

import importlib

_WHERE = {"TokenizeConfig": "tokenize", "tokenize_corpus": "tokenize", "attribute": "attribution",
          "Labels": "attribution", "ExtractConfig": "extract", "run_extract": "extract"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.{_WHERE[name]}"), name)
