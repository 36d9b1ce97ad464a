"""lm-evaluation-harness adapter: any student (ntp, cocomix, pause, kd) as the harness model `cocomix`.

    python -m trainer.harness --model cocomix --model_args checkpoint=RUN_OR_CKPT,device=cpu \\
        --tasks cocomix_cloze,cocomix_continuation,cocomix_ppl --batch_size 16

lm-eval 0.4.x finds models only in its own table or among classes registered by an import that already
ran: it has no entry-point group. Importing this module registers `cocomix` (for
`lm_eval.simple_evaluate(model="cocomix", ...)` too), and `python -m trainer.harness ARGS` is lm-eval's own
command line after that import, with the shipped offline tasks (data/tasks) on `--include_path` unless one
is given. `lm_eval` itself sees the model where `make setup` installed the hook (trainer/lm_eval_hook.py).

Requests are scored by trainer/scoring.py on the student's own forward, with the tokenizer of the token
store it trained on; long inputs are handled as lm-eval's `hf` model handles them (left truncation for
loglikelihood, its rolling windows for loglikelihood_rolling), so an NTP student scores here exactly what
its GPT2LMHeadModel export scores under `--model hf`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  # fills the registry first: lm-eval only does so while it is empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from storage_schemas import UserError, tokenizer_fingerprint
from trainer.checkpoint import load_model, resolve, trained_on
from trainer.downstream import TASKS_DIR
from trainer.evaluate import torch_device
from trainer.scoring import generate_tokens, score_pairs

DEFAULT_BATCH = 16
SAMPLING_KEYS = {"do_sample", "temperature", "top_k"}  # beyond `until` and `max_gen_toks`


def batch_size_of(value: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval passes ints, digit strings or "auto[:N]"; auto is not probed here: it is the max batch size
    when one is given, else the default."""
    if value is None:
        return DEFAULT_BATCH
    if str(value).startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH)
    if not str(value).isdigit() or int(value) < 1:
        raise UserError(f"batch_size must be a positive integer or auto, got {value!r}")
    return int(value)


def load_tokenizer(meta: dict, folder: str | Path | None, ckpt: Path):
    """The tokenizer the student trained with: `folder`, else its token store's `tokenizer/`; a folder
    whose fingerprint differs from the one the checkpoint recorded is refused."""
    from transformers import AutoTokenizer

    folder = Path(folder) if folder else trained_on(meta, ckpt) / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {folder / 'tokenizer.json'} for {ckpt}: "
                        f"pass tokenizer=DIR (the token store's tokenizer/ folder) in --model_args")
    want = meta.get("tokenizer_fingerprint")
    if want and tokenizer_fingerprint(folder) != want:
        raise UserError(f"tokenizer {folder} is {tokenizer_fingerprint(folder)[:12]}, but {ckpt} was trained "
                        f"with {want[:12]}: pass the tokenizer of the token store it trained on")
    return AutoTokenizer.from_pretrained(folder)


class CocomixLM(TemplateLM):
    """A student checkpoint (or run folder: its latest checkpoint) as an lm-eval model."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str | None = None,
                 max_batch_size: int | None = None, tokenizer: str | None = None, **unused) -> None:
        super().__init__()
        if unused:
            raise UserError(f"unknown --model_args for cocomix: {', '.join(sorted(unused))} "
                            f"(it takes checkpoint, device, batch_size, tokenizer)")
        self.ckpt = resolve(Path(checkpoint))
        model, self.meta = load_model(self.ckpt)
        self._device = torch_device(device, "device", "device=cpu")
        self.model = model.to(self._device).eval()
        self.tokenizer = load_tokenizer(self.meta, tokenizer, self.ckpt)
        self.batch_size = batch_size_of(batch_size, max_batch_size)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CocomixLM:
        """lm-eval's CLI always adds its --device (default cuda:0) to the model arguments: a device in
        --model_args wins over it, and its default falls back to the CPU where there is no CUDA, as lm-eval's
        hf model does; only a device the user names in --model_args is refused when missing."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra["device"] = "cpu"
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CocomixLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's hf model: BOS when the tokenizer has one, else EOS (both are <|endoftext|> here)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.meta.get("tokenizer_fingerprint") or str(self.ckpt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # the token store was encoded without special tokens: score text the way the student read it
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        cfg = self.model.cfg
        return {"checkpoint": str(self.ckpt), "mode": cfg.mode, "block_size": cfg.block_size,
                "n_params": self.model.num_params(), "tokenizer_fingerprint": self.meta.get("tokenizer_fingerprint")}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        results = score_pairs(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size, self._device)
        for (strings, _, _), r in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, r)
        return results

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's own windows (hf model): disjoint, one token of carried context, the first after the prefix."""
        windows = get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole string; all windows of all strings are batched together."""
        per_request = [self.rolling_windows(self.tok_encode(req.args[0])) for req in requests]
        scores = score_pairs(self.model, [w for ws in per_request for w in ws], self.batch_size, self._device)
        totals, at = [], 0
        for req, ws in zip(requests, per_request, strict=True):
            totals.append(sum(lp for lp, _ in scores[at : at + len(ws)]))
            at += len(ws)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut at the first stop string; batched per
        distinct set of generation arguments."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            texts = self._generate([requests[i].args[0] for i in members], requests[members[0]].args[1])
            for i, text in zip(members, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, 256))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_new = int(kwargs.pop("max_gen_toks"))
        if unsupported := sorted(set(kwargs) - SAMPLING_KEYS):
            raise UserError(f"generation options {', '.join(unsupported)} are not supported by the cocomix "
                            f"model (it takes until, max_gen_toks, do_sample, temperature, top_k)")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        ids = [self.tok_encode(c) or [self.prefix_token_id] for c in contexts]

        def done(_: int, gen: list[int]) -> bool:
            text = self.tok_decode(gen, skip_special_tokens=False)
            return gen[-1] == self.eot_token_id or any(s and s in text for s in until)

        texts = []
        for a in range(0, len(ids), self.batch_size):
            gens = generate_tokens(self.model, ids[a : a + self.batch_size], max_new, done, self._device,
                                   temperature, kwargs.get("top_k"))
            texts += [postprocess_generated_text(self.tok_decode(g), until, None) for g in gens]
        return texts


# A lazy entry, so that registering twice (this file run as __main__, then imported) is harmless.
if "cocomix" not in model_registry:
    model_registry.register("cocomix", target="trainer.harness:CocomixLM")


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.harness ARGS`: lm-eval's command line with `cocomix` registered; a user's mistake
    in the cocomix model's arguments is one line and exit code 2."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    names_tasks = args[:1] == ["ls"] or any(a.startswith("--tasks") for a in args)  # run, validate, ls
    if names_tasks and TASKS_DIR.is_dir() and not any(a.startswith("--include_path") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
