"""Loads the jsonl files beside this file for the task YAMLs here (their `custom_dataset`), so that the
tasks load from any working directory and offline: `datasets`' packaged json builder needs no hub.
Written by `python -m pipeline.tasks`."""

from pathlib import Path


def load(data_files: dict, **metadata):
    import datasets

    here = Path(__file__).resolve().parent
    return datasets.load_dataset("json", data_files={split: str(here / name) for split, name in data_files.items()})
