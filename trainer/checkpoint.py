"""Checkpoints of a run: `<out>/checkpoints/step-NNNNNNN/`.

Each holds `state.pt` (model, optimizer, step, data position, RNG states of every rank, config,
fingerprints), written into a temporary folder beside it and renamed into place, so a half-written
checkpoint is never a `step-*` folder and never picked as the latest. The optimizer schedule is a pure
function of the step, so the step is the scheduler state. The final checkpoint also gets
`model.safetensors` + `config.json`, readable without torch.load or the optimizer.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from storage_schemas import UserError, write_json_atomic
from trainer.config import TrainConfig
from trainer.model import GPT, GPTConfig

STEP_DIR = re.compile(r"^step-(\d{7})$")
# Fields a resumed run may change: where things are, and what does not alter the trained weights.
RESUME_FREE = frozenset({"out", "tokens", "labels", "stop_after", "compile", "device", "dtype", "threads",
                         "log_interval", "eval_interval", "eval_windows", "ckpt_interval", "keep_checkpoints"})


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders never match)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(out: Path) -> Path | None:
    """The newest finished checkpoint of a run folder, or None."""
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_meta(model: GPT, cfg: TrainConfig, fingerprints: dict) -> dict:
    """What config.json records: enough to rebuild the model and to know what it was trained on."""
    return {"model": asdict(model.cfg), "train": cfg.to_json(), **fingerprints}


def save(out: Path, step: int, state: dict, keep: int, final_model: GPT | None = None,
         meta: dict | None = None) -> Path:
    """Write state (and, for the final checkpoint, the bare model) as step-NNNNNNN, atomically."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(state, tmp / "state.pt")
        if final_model is not None:
            save_safetensors(final_model, str(tmp / "model.safetensors"))  # handles the tied embedding
            write_json_atomic(tmp / "config.json", meta or {})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as e:  # disk full: drop the partial copy (the previous checkpoint stays the latest)
        shutil.rmtree(tmp, ignore_errors=True)
        e.filename = e.filename or str(final)
        raise
    if final.exists():  # the same step saved again (a stop_after that lands on a checkpoint step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(Path(out), keep)
    return final


def _prune(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; drop temporary folders left by a crashed writer."""
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    for tmp in (out / "checkpoints").glob(".step-*.tmp-*"):
        if not tmp.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def load_state(path: Path) -> dict:
    """state.pt of a checkpoint folder. It holds numpy RNG state, so not weights_only: only load your own."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise UserError(f"{path} is not a checkpoint: {file} does not exist")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign: our writer never leaves one, a partial copy can
        raise _unreadable(file, e) from None


def _unreadable(file: Path, e: Exception) -> UserError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return UserError(f"{file} is not a readable checkpoint ({why}): remove {file.parent} to use the one before it")


def check_resume(cfg: TrainConfig, saved: dict, path: Path) -> None:
    """Refuse to continue a run whose saved config differs in anything that shapes the weights."""
    now = cfg.to_json()
    diff = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:3])
        raise UserError(f"{path} holds a run with a different config ({shown}): "
                        f"use another --out, or remove that folder to start over")


def resolve(path: Path) -> Path:
    """A run folder (-> its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / "state.pt").is_file() or (path / "model.safetensors").is_file():
        return path
    ckpt = latest(path)
    if ckpt is None:
        raise UserError(f"{path} is neither a checkpoint nor a run folder with checkpoints")
    return ckpt


def trained_on(meta: dict, ckpt: Path, key: str = "tokens") -> Path:
    """A store the checkpoint's run recorded (`meta["train"][key]`), found from any working directory.

    Runs record paths as given, often relative to where training ran (`make demo`: out/demo/tokens). Such a
    path is taken as it is when it exists from here, else relative to that directory, which the checkpoint's
    own location tells: <training cwd>/<recorded out>/checkpoints/step-N."""
    recorded = Path(meta["train"][key])
    if recorded.is_absolute() or recorded.exists():
        return recorded
    run, out = Path(ckpt).resolve().parent.parent, Path(meta["train"].get("out") or ".")
    if not out.is_absolute() and out.parts and run.parts[-len(out.parts):] == out.parts:
        return Path(*run.parts[:-len(out.parts)]) / recorded
    return recorded


def load_model(path: Path) -> tuple[GPT, dict]:
    """Model (eval mode, CPU) and its metadata from a checkpoint or run folder: from model.safetensors +
    config.json when the checkpoint has them, else from state.pt."""
    ckpt = resolve(path)
    if (ckpt / "model.safetensors").is_file():
        try:
            meta = json.loads((ckpt / "config.json").read_text())
            model = GPT(GPTConfig(**meta["model"]))
            load_safetensors(model, str(ckpt / "model.safetensors"))
        except Exception as e:  # a truncated or foreign file, as in load_state
            raise _unreadable(ckpt / "model.safetensors", e) from None
        return model.eval(), meta
    state = load_state(ckpt)
    meta = state["meta"]
    model = GPT(GPTConfig(**meta["model"]))
    model.load_state_dict(state["model"])
    return model.eval(), meta
