"""The training loop: one straight `train(cfg)` (STYLE.md), with small helpers around it.

Run folder `<out>/`: config.json (the resolved TrainConfig), metrics.jsonl (one JSON object per log
line: step, tokens, lr, train_loss, ntp_loss, aux_loss, val_loss, val_ppl, val_sources ({source: loss}, the
corpus's domains when the token store knows them), tokens_per_s, elapsed; the val fields are null between evals), run.json (written at the end), checkpoints/step-NNNNNNN/.

Batches: optimizer step s consumes grad_accum micro-batches of batch_size windows, a fixed slice of the
seeded window stream (`trainer.data.micro_batch`). Under torchrun, rank r runs micro-batches
r, r + world, ...; DDP averages their gradients, so 2 processes do the same step as 1 process with the
same grad_accum. Launch: `torchrun --standalone --nproc_per_node 2 -m trainer.train --preset demo ...`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from storage_schemas import UserError, write_json_atomic
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import WindowData, WindowOrder, micro_batch, open_stores, to_device
from trainer.evaluate import val_loss
from trainer.model import GPT


def train(cfg: TrainConfig) -> Path:
    """Train one student as cfg says and return its run folder; resumes from <out>'s latest checkpoint
    when there is one (and returns at once when that run already finished)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with distributed(cfg.device) as (rank, world, device):
        cfg, ts, labels = open_stores(cfg)  # refusals happen here, before any step
        master, out = rank == 0, check_out(cfg, world)
        train_data = WindowData(ts, "train", cfg.block_size, labels, cfg.mode, cfg.concept_positive_only)
        val_data = WindowData(ts, "val", cfg.block_size, by_source=True) if cfg.eval_windows else None
        torch.manual_seed(cfg.seed)
        raw = GPT(cfg.model_config()).to(device)
        torch.manual_seed(cfg.seed + 1 + rank)  # the dropout stream, distinct per rank
        opt = make_optimizer(raw, cfg, device)
        fingerprints = {"token_fingerprint": ts.fingerprint, "tokenizer_fingerprint": ts.tokenizer_fingerprint,
                        "label_fingerprint": labels.fingerprint if labels else None}
        meta = checkpoint.model_meta(raw, cfg, fingerprints)
        state = resume(out, cfg, raw, opt, rank)
        step, elapsed0 = state.get("step", 0), state.get("elapsed", 0.0)
        if master:
            start_files(out, cfg, step)
        model = torch.compile(raw) if cfg.compile else raw
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        order, autocast = WindowOrder(train_data.n_windows, cfg.seed), partial(autocast_ctx, cfg, device)
        stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
        local_accum = cfg.grad_accum // world
        sums = torch.zeros(3, device=device)  # loss, ntp, aux summed since the last log line
        train_time = state.get("train_time", 0.0)  # seconds spent in steps, excluding eval and checkpoints
        t_start, t_log, step_log = time.perf_counter(), time.perf_counter(), step
        evaluate = partial(val_loss, model, val_data, cfg.eval_windows, cfg.batch_size, device, autocast)
        if step == 0 and val_data is not None:
            val = evaluate()  # every rank takes part (the all-reduce)
            if master:
                log_row(out, metrics(cfg, 0, None, val, None, 0.0, names=val_data.source_names))
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=None if master else True)
        while step < stop:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            for m in range(rank, cfg.grad_accum, world):
                batch = to_device(train_data.batch(micro_batch(order, step, m, cfg)), device)
                last_micro = m + world >= cfg.grad_accum
                with ddp.no_sync() if world > 1 and not last_micro else nullcontext():
                    with autocast():
                        o = ddp(batch.pop("idx"), batch.pop("targets"), **batch)
                    (o.loss / local_accum).backward()
                aux = o.aux_loss.detach() if o.aux_loss is not None else torch.zeros((), device=device)
                sums += torch.stack([o.loss.detach(), o.ntp_loss.detach(), aux]).float() / local_accum
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            done, t_step = step == stop, time.perf_counter()
            due = step % cfg.eval_interval == 0 or step == cfg.max_steps
            val = evaluate() if val_data is not None and due else None
            logged = step % cfg.log_interval == 0 or val is not None or done
            if logged:
                if world > 1:
                    dist.all_reduce(sums)
                    sums /= world
                train_time += t_step - t_log
                tok_s = (step - step_log) * cfg.tokens_per_step / max(t_step - t_log, 1e-9)
                row = metrics(cfg, step, sums / (step - step_log), val, tok_s, elapsed0 + t_step - t_start, lr,
                              val_data.source_names if val_data is not None else ())
                sums.zero_()
                step_log = step
                if master:
                    log_row(out, row)
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                    if val is not None:
                        tqdm.write(progress_line(row, cfg.max_steps), file=sys.stderr)
            if step % cfg.ckpt_interval == 0 or done:
                rngs = gather_rng(world)
                if master:
                    state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                             "position": step * cfg.batch_size * cfg.grad_accum, "rng": rngs, "meta": meta,
                             "elapsed": elapsed0 + time.perf_counter() - t_start, "train_time": train_time}
                    final = raw if step == cfg.max_steps else None
                    checkpoint.save(out, step, state, cfg.keep_checkpoints, final, meta)
            if logged:
                t_log = time.perf_counter()  # the next interval starts after eval and checkpoint
        bar.close()
        if master and step == cfg.max_steps:
            write_run_json(out, cfg, raw, fingerprints, world, device, train_time)
        return out


@contextmanager
def distributed(device_name: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device); under torchrun (WORLD_SIZE > 1) a process group: nccl on CUDA, gloo on CPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available: use device=cpu or auto")
    device = torch.device("cuda", local) if device_name == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world, device
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA (dtype auto) or when asked for; fp32 otherwise. A fresh context per use."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (GPT.param_groups); fused kernels on CUDA."""
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine down to min_lr at the last step (nanoGPT's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def check_out(cfg: TrainConfig, world: int) -> Path:
    if not cfg.out:
        raise UserError("no run folder given: pass --out DIR")
    if cfg.grad_accum % world:
        raise UserError(f"grad_accum {cfg.grad_accum} must be a multiple of the {world} processes")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"{out} exists and is not a run folder: choose another --out")
    return out


def resume(out: Path, cfg: TrainConfig, raw: GPT, opt: torch.optim.Optimizer, rank: int) -> dict:
    """Load the latest checkpoint of <out> into model and optimizer; {} for a fresh run."""
    ckpt = checkpoint.latest(out)
    if ckpt is None:
        return {}
    state = checkpoint.load_state(ckpt)
    checkpoint.check_resume(cfg, state["meta"]["train"], out)
    raw.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rngs = state["rng"]
    if rank < len(rngs):
        checkpoint.set_rng_state(rngs[rank])
    return state


def gather_rng(world: int) -> list[dict]:
    """Every rank's RNG state (all ranks must call this), so a resumed DDP run continues each stream."""
    if world == 1:
        return [checkpoint.rng_state()]
    states = [None] * world
    dist.all_gather_object(states, checkpoint.rng_state())
    return states


def start_files(out: Path, cfg: TrainConfig, step: int) -> None:
    """config.json, and metrics.jsonl cut back to the resumed step (lines a crashed run logged after it)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_json())
    log = out / "metrics.jsonl"
    rows = [r for r in log.read_text().splitlines() if _step_of(r) <= step] if log.exists() else []
    tmp = log.with_name(f".{log.name}.tmp")
    tmp.write_text("".join(r + "\n" for r in rows) if step else "")
    os.replace(tmp, log)


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def metrics(cfg: TrainConfig, step: int, train: torch.Tensor | None, val: torch.Tensor | None,
            tok_s: float | None, elapsed: float, lr: float | None = None, names=()) -> dict:
    """One metrics line; the .tolist() here are the loop's only host syncs. val: (1 + S,) from val_loss,
    all evaluated tokens first, then each of the S sources named by `names`."""
    loss, ntp, aux = train.tolist() if train is not None else (None, None, None)
    vals = val.tolist() if val is not None else None
    v = vals[0] if vals is not None else None
    by_source = {n: x for n, x in zip(names, vals[1:], strict=True) if not math.isnan(x)} if vals and names else None
    return {"step": step, "tokens": step * cfg.tokens_per_step, "lr": lr, "train_loss": loss, "ntp_loss": ntp,
            "aux_loss": aux if cfg.mode in ("cocomix", "kd") else None, "val_loss": v,
            "val_ppl": math.exp(v) if v is not None else None, "val_sources": by_source, "tokens_per_s": tok_s,
            "elapsed": round(elapsed, 3)}


def log_row(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def progress_line(row: dict, max_steps: int) -> str:
    return (f"step {row['step']}/{max_steps} | tokens {row['tokens']:,} | train {row['train_loss']:.4f} | "
            f"val {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f}) | {row['tokens_per_s']:,.0f} tok/s")


def write_run_json(out: Path, cfg: TrainConfig, raw: GPT, fingerprints: dict, world: int,
                   device: torch.device, train_time: float) -> None:
    """run.json: what a report needs without reading the metrics (final val loss, tokens/s, params)."""
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if r["val_loss"] is not None]
    last = rows[-1]
    write_json_atomic(out / "run.json", {
        "mode": cfg.mode, "seed": cfg.seed, **fingerprints, "n_params": raw.num_params(non_embedding=False),
        "n_params_non_embedding": raw.num_params(), "steps": cfg.max_steps, "tokens": last["tokens"],
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "final_val_ppl": vals[-1]["val_ppl"] if vals else None,
        "final_val_sources": vals[-1].get("val_sources") if vals else None,
        "tokens_per_s": last["tokens"] / train_time if train_time else None,
        "elapsed": last["elapsed"], "world_size": world, "device": device.type})


if __name__ == "__main__":
    from trainer.cli import main_train

    main_train()
