"""The one config of a training run (`TrainConfig`), its presets, and typed overrides (TOML, --set).

Presets are small functions. The paper's settings (Tack et al. 2025, Sec. 4.1; their Hydra configs
`conf/setup/gpt2_*`): GPT-2 students on 1024-token windows, AdamW (0.9, 0.95), weight decay 0.1, cosine
from lr to lr/10, 0.5M-token batches (1M for 1.4B), 20B tokens, teacher GPT-2 124M with a 32k TopK(32)
SAE: C = 32768 concepts, k = 4 labels, k_concept = 32, lambda = 0.1. The NTP counterparts are widened
to the CoCoMix model's parameter count, as the paper does.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

from storage_schemas import UserError

Mode = Literal["ntp", "cocomix", "pause", "kd"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Counters (step, tokens seen) never live here."""

    # --- data -------------------------------------------------------------------------------
    tokens: str = ""
    """Token store folder (`cocomix tokenize`)."""
    labels: str = ""
    """Label store folder (`cocomix extract`); required in cocomix and kd modes."""
    out: str = ""
    """Run folder: config.json, run.json, metrics.jsonl, checkpoints/. Resumed when it holds checkpoints."""
    # --- model ------------------------------------------------------------------------------
    mode: Mode = "ntp"
    """ntp, cocomix (concept prediction + mixing), pause (pause-token baseline) or kd (distillation)."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes the token store's."""
    block_size: int = 256
    """Window length T; must equal the label store's window W (labels live on that grid)."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    """Biases in the blocks' Linear layers and LayerNorms (GPT-2 has them)."""
    n_concepts: int = 0
    """Concept count C (cocomix); 0 takes the label store's SAE latent count."""
    insert_layer: int = 1
    """Concepts are predicted and interleaved before this block (cocomix)."""
    k_concept: int = 32
    """TopK of the concept logits kept for compression (paper: 32)."""
    concept_lambda: float = 0.1
    """Weight of the concept loss (paper: 0.1); 0 mixes without concept prediction (a paper ablation)."""
    concept_mix: bool = True
    """Interleave the compressed concepts (cocomix); false trains concept prediction without mixing
    (the paper's other ablation)."""
    concept_positive_only: bool = True
    """Train only on label slots with a positive score (DESIGN.md, Concept labels, step 6). The score is
    the label selection's key: for the default signed attribution, a latent that raises the teacher's loss."""
    kd_alpha: float = 0.5
    """kd: loss = (1 - kd_alpha) * NTP + kd_alpha * T^2 * KL(teacher || student)."""
    kd_temperature: float = 1.0
    # --- budget and batch -------------------------------------------------------------------
    max_tokens: int = 1_000_000
    """Training tokens; steps = max_tokens // (batch_size * grad_accum * block_size)."""
    batch_size: int = 16
    """Windows per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step across all processes (divided among DDP ranks)."""
    # --- optimizer and schedule -------------------------------------------------------------
    lr: float = 6e-4
    min_lr: float = 6e-5
    """The cosine schedule ends here."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = 0.1
    """On >= 2-D parameters only (GPT.param_groups)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    # --- eval, logging, checkpoints ---------------------------------------------------------
    eval_interval: int = 100
    """Validation loss every this many steps (and at the start and the end)."""
    eval_windows: int = 64
    """Validation windows per eval, spread evenly over the split (the same every time; all of them when
    this is at least the split's window count); 0 disables eval."""
    log_interval: int = 10
    """Steps between metrics lines (the only host syncs of the loop)."""
    ckpt_interval: int = 500
    """Steps between checkpoints; the final step always gets one."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (oldest removed first)."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this step, as an interrupted run would; 0 runs to the end."""
    # --- reproducibility and hardware -------------------------------------------------------
    seed: int = 0
    """Seeds the model init, the window order (per epoch) and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype: auto = bf16 on CUDA, fp32 on CPU. Weights and optimizer state stay fp32."""
    compile: bool = False
    """torch.compile the model."""
    threads: int = 0
    """CPU threads per process (torch.set_num_threads); 0 keeps torch's default."""

    def __post_init__(self):
        positive = ("block_size", "n_layer", "n_head", "n_embd", "max_tokens", "batch_size", "grad_accum",
                    "log_interval", "eval_interval", "ckpt_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "n_concepts", "warmup_steps", "eval_windows", "stop_after", "grad_clip", "threads"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, value, choices in _literal_fields(self):
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.mode == "cocomix" and not 0 <= self.insert_layer < self.n_layer:
            raise UserError(f"insert_layer {self.insert_layer} is out of range for a {self.n_layer}-layer "
                            f"model: choose 0..{self.n_layer - 1}")
        if self.mode == "cocomix" and self.n_concepts and self.k_concept > self.n_concepts:
            raise UserError(f"k_concept {self.k_concept} is larger than n_concepts {self.n_concepts}: lower it")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    @property
    def max_steps(self) -> int:
        return max(1, self.max_tokens // self.tokens_per_step)

    def model_config(self):
        """The GPTConfig of the student (vocab_size and n_concepts must be resolved from the stores)."""
        from trainer.model import GPTConfig

        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         mode=self.mode, n_concepts=self.n_concepts if self.mode == "cocomix" else 0,
                         insert_layer=self.insert_layer, k_concept=self.k_concept,
                         concept_lambda=self.concept_lambda, concept_mix=self.concept_mix,
                         kd_alpha=self.kd_alpha,
                         kd_temperature=self.kd_temperature)

    def to_json(self) -> dict:
        return asdict(self)


def _literal_fields(cfg: TrainConfig):
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(cfg):
        if typing.get_origin(hints[f.name]) is Literal:
            yield f.name, getattr(cfg, f.name), typing.get_args(hints[f.name])


# --- presets -------------------------------------------------------------------------------------

def demo_teacher() -> TrainConfig:
    """The demo's teacher: 4 layers, d 192, context 256, ~3.4M params with an 8k vocabulary.
    A few minutes on 2 CPU cores; trained well past the students' budget so its labels mean something."""
    return TrainConfig(mode="ntp", block_size=256, n_layer=4, n_head=6, n_embd=192, max_tokens=2_000_000,
                       batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_interval=100,
                       eval_windows=64, ckpt_interval=200)


def demo() -> TrainConfig:
    """The demo student (DESIGN.md, measured at CPU scale): 4 layers, d 128, concepts before block 1."""
    return TrainConfig(mode="cocomix", block_size=256, n_layer=4, n_head=4, n_embd=128, insert_layer=1,
                       max_tokens=1_000_000, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                       eval_interval=25, eval_windows=64, ckpt_interval=200)


def demo_ntp_wide() -> TrainConfig:
    """NTP widened to about the demo CoCoMix student's parameter count (3072 concepts, 8k vocabulary)."""
    return replace(demo(), mode="ntp", n_embd=164)  # 2.69M vs 2.66M params


def _paper(mode: Mode, n_embd: int, n_layer: int, n_head: int, insert_layer: int, lr: float, min_lr: float,
           batch_windows: int, warmup: int) -> TrainConfig:
    steps = 40_000 if batch_windows == 512 else 20_000  # 20B tokens either way
    return TrainConfig(mode=mode, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       insert_layer=insert_layer, n_concepts=32768 if mode == "cocomix" else 0, k_concept=32,
                       concept_lambda=0.1, max_tokens=steps * batch_windows * 1024, batch_size=16,
                       grad_accum=batch_windows // 16, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                       eval_interval=1000, eval_windows=1000, log_interval=50, ckpt_interval=2000,
                       keep_checkpoints=3, compile=True)


PRESETS = {
    "demo-teacher": demo_teacher,
    "demo": demo,
    "demo-ntp-wide": demo_ntp_wide,
    "gpt2-69m": lambda: _paper("cocomix", 512, 8, 8, 3, 6e-4, 6e-5, 512, 130),
    "gpt2-69m-ntp": lambda: _paper("ntp", 624, 8, 8, 3, 6e-4, 6e-5, 512, 130),
    "gpt2-386m": lambda: _paper("cocomix", 1024, 24, 16, 5, 3e-4, 3e-5, 512, 130),
    "gpt2-386m-ntp": lambda: _paper("ntp", 1072, 24, 16, 5, 3e-4, 3e-5, 512, 130),
    "gpt2-1.4b": lambda: _paper("cocomix", 2048, 24, 16, 5, 2e-4, 2e-5, 1024, 65),
    "gpt2-1.4b-ntp": lambda: _paper("ntp", 2096, 24, 16, 5, 2e-4, 2e-5, 1024, 65),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# --- overrides -----------------------------------------------------------------------------------

def _parse(name: str, hint, raw):
    """A TOML value or a --set string -> the field's type (int, float, bool, str or a Literal choice)."""
    if typing.get_origin(hint) is Literal:
        return str(raw)  # checked against the choices in __post_init__
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes", "on"):
            return True
        if str(raw).lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{name} takes true or false, got {raw!r}")
    try:
        if hint is int:
            value = float(raw) if isinstance(raw, str) else raw  # "2e6" and "2_000_000" both work
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return hint(raw)
    except (TypeError, ValueError):
        raise UserError(f"{name} takes a {hint.__name__}, got {raw!r}") from None


def with_overrides(cfg: TrainConfig, values: dict) -> TrainConfig:
    """cfg with `values` (field name -> TOML value or string) applied, typed by the dataclass fields."""
    hints = typing.get_type_hints(TrainConfig)
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            raise UserError(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return replace(cfg, **{k: _parse(k, hints[k], v) for k, v in values.items()})


def parse_sets(items: list[str]) -> dict:
    """['lr=3e-4', 'mode=ntp'] -> {'lr': '3e-4', 'mode': 'ntp'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_toml(path: Path) -> tuple[str | None, dict]:
    """A TOML config file -> (its optional `preset` name, the remaining keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    base = data.pop("preset", None)
    return base, data


def build_config(preset_name: str | None = None, config_file: Path | None = None,
                 overrides: dict | None = None) -> TrainConfig:
    """preset, then the TOML file (which may name its own preset), then the overrides."""
    file_values: dict = {}
    if config_file is not None:
        file_preset, file_values = load_toml(config_file)
        preset_name = preset_name or file_preset
    if preset_name is None and config_file is None:
        raise UserError(f"give --preset NAME or --config FILE (presets: {', '.join(PRESETS)})")
    cfg = preset(preset_name) if preset_name else TrainConfig()
    return with_overrides(cfg, {**file_values, **(overrides or {})})  # validated once, on the final values
