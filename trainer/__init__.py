"""The student trainer: GPT-2 in ntp / cocomix / pause / kd modes, trained on memory-mapped stores.

    model.py       GPT, GPTConfig, ModelOutput, Steering, from_hf / to_hf / export_hf
    losses.py      ntp_loss, concept_loss, kd_loss
    chunked.py     the wide heads' losses in chunks of tokens, recomputed in backward (bounded memory)
    config.py      TrainConfig, presets (PRESETS, preset), build_config (TOML + --set overrides)
    data.py        WindowData (windows + aligned labels), WindowOrder (seeded stream), open_stores (refusals)
    train.py       train(cfg) -> run folder (DDP under torchrun)
    checkpoint.py  save / latest / load_model
    evaluate.py    evaluate(checkpoint, tokens) -> val loss and perplexity
    generate.py    GenerateConfig, generate (sampling, concept steering)
    report.py      compare(run_dirs, out) -> Markdown + plots over seeds, paired CIs (`cocomix compare`)
    scoring.py     batched log-likelihoods and generation on the student's own forward
    harness.py     the lm-evaluation-harness model `cocomix` (`python -m trainer.harness`)
    downstream.py  `cocomix downstream`: the students on lm-eval tasks, and compare's downstream table
    cli.py         `cocomix train | eval | export-hf | compare | generate | downstream` (typer app)

Names are imported lazily so that `import trainer.cli` (and `cocomix --help`) does not load torch.
The trainer never imports pipeline, sae or ray: it never runs a teacher.
"""

import importlib

_WHERE = {
    "GPT": "model", "GPTConfig": "model", "ModelOutput": "model", "Steering": "model", "from_hf": "model",
    "to_hf": "model", "export_hf": "model", "TrainConfig": "config", "PRESETS": "config", "preset": "config",
    "build_config": "config", "WindowData": "data", "WindowOrder": "data", "open_stores": "data",
    "latest": "checkpoint", "load_model": "checkpoint", "GenerateConfig": "generate", "compare": "report",
    "load_run": "report",
}  # train(), evaluate(), generate() share their module's name: import them from their modules
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.{_WHERE[name]}"), name)
