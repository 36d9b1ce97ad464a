"""Where an SAE reads a `transformers` causal LM: named hook locations, capture and splice.

Locations follow OpenAI's sparse_autoencoder names, for block `layer` (0-based):
    resid_post_mlp    the block's output (transformer_lens hook_resid_post)
    resid_post_attn   the residual stream between attention and MLP (hook_resid_mid)
    resid_delta_mlp   the MLP's output, before it is added to the residual (hook_mlp_out)
    resid_delta_attn  the attention's output, before it is added (hook_attn_out)
    mlp_post_act      the MLP's hidden activation, input of its output projection (mlp.hook_post)
They are mapped onto GPT-2 (`model.transformer.h`) and Llama-style (`model.model.layers`) blocks.
Anything else is a raw module path whose output is the hidden state, e.g. "transformer.h.{layer}.mlp".

All hooks are plain forward hooks, removed in `finally`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from storage_schemas import UserError

from .model import SAEConfig

LOCATIONS = ("resid_post_mlp", "resid_post_attn", "resid_delta_mlp", "resid_delta_attn", "mlp_post_act")

# child names inside one block: attention, the norm in front of the MLP, the MLP, the MLP's output projection
_GPT2_PARTS = ("attn", "ln_2", "mlp", "c_proj")
_LLAMA_PARTS = ("self_attn", "post_attention_layernorm", "mlp", "down_proj")


@dataclass
class Captured:
    value: Tensor | None = None
    """The hidden state (B, T, d) of the last forward pass."""


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a GPT-2 or Llama-style causal LM."""
    for path in ("transformer.h", "model.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise UserError(f"cannot find the blocks of {type(model).__name__} (expected transformer.h or model.layers); "
                    "give the location as a raw module path instead, e.g. 'gpt_neox.layers.{layer}'")


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _parts(block: nn.Module) -> tuple[str, str, str, str]:
    if hasattr(block, "ln_2"):
        return _GPT2_PARTS
    if hasattr(block, "post_attention_layernorm"):
        return _LLAMA_PARTS
    raise UserError(f"{type(block).__name__} is neither a GPT-2 nor a Llama-style block; "
                    "give the location as a raw module path")


def _check_layer(model: nn.Module, layer: int) -> nn.Module:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise UserError(f"layer {layer} is out of range: the teacher has {n} blocks (0..{n - 1})")
    return blocks(model)[layer]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new: Tensor):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _on_output(module: nn.Module, fn: Callable[[Tensor], Tensor]):
    return module.register_forward_hook(lambda m, args, out: _replace_first(out, fn(_first(out))))


def _on_input(module: nn.Module, fn: Callable[[Tensor], Tensor]):
    """Replace the module's first input (positional, or the `hidden_states` keyword)."""
    def hook(m, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def _intercept(model: nn.Module, layer: int, location: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Run fn on the hidden state at (layer, location) and feed its result to everything downstream."""
    handles = []
    try:
        if location not in LOCATIONS:
            handles.append(_on_output(_raw_module(model, layer, location), fn))
        else:
            handles.extend(_named_hooks(_check_layer(model, layer), location, fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _raw_module(model: nn.Module, layer: int, location: str) -> nn.Module:
    path = location.replace("{layer}", str(layer))
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UserError(f"unknown hook location {location!r}: use one of {', '.join(LOCATIONS)} "
                        f"or a module path of the teacher (no module {path!r})") from None


def _named_hooks(block: nn.Module, location: str, fn: Callable[[Tensor], Tensor]) -> list:
    attn, norm2, mlp, proj = _parts(block)
    if location == "resid_post_mlp":
        return [_on_output(block, fn)]
    if location == "resid_delta_attn":
        return [_on_output(getattr(block, attn), fn)]
    if location == "resid_delta_mlp":
        return [_on_output(getattr(block, mlp), fn)]
    if location == "mlp_post_act":
        return [_on_input(getattr(getattr(block, mlp), proj), fn)]
    return _mid_hooks(getattr(block, norm2), getattr(block, mlp), fn)


def _mid_hooks(norm: nn.Module, mlp: nn.Module, fn: Callable[[Tensor], Tensor]) -> list:
    """resid_post_attn feeds two consumers: the MLP's norm and the residual add after the MLP.

    The norm's input *is* the residual tensor, so we replace it there by h2 = fn(h) and add
    (h2 - h) to the MLP's output: the block's output becomes h2 + mlp(norm(h2)). When fn leaves the
    values unchanged (capture), h2 - h is exactly zero, so the forward is bit-identical, and a
    gradient on h2 collects both paths.
    """
    state: dict[str, Tensor] = {}

    def swap(h: Tensor) -> Tensor:
        state["h"], state["h2"] = h, fn(h)
        return state["h2"]

    def rebase(out: Tensor) -> Tensor:
        return out + (state["h2"] - state["h"])

    return [_on_input(norm, swap), _on_output(mlp, rebase)]


@contextmanager
def capture(model: nn.Module, layer: int, location: str, requires_grad: bool = False) -> Iterator[Captured]:
    """Record the hidden state at (layer, location) of each forward pass in `Captured.value`.

    requires_grad=True substitutes a fresh leaf (same values, detached from everything below) into
    the forward, so torch.autograd.grad(loss, captured.value) is d loss / d h through the layers
    above only: no backward pass through the blocks below.
    """
    cap = Captured()

    def take(h: Tensor) -> Tensor:
        if requires_grad:
            h = h.detach().requires_grad_(True)
        cap.value = h
        return h

    with _intercept(model, layer, location, take):
        yield cap


@contextmanager
def splice(model: nn.Module, layer: int, location: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the hidden state h at (layer, location) by fn(h) for the rest of the forward pass."""
    with _intercept(model, layer, location, fn):
        yield


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activation exists."""


def activations(model: nn.Module, input_ids: Tensor, layer: int, location: str) -> Tensor:
    """Hidden state (B, T, d) at (layer, location) for input_ids (B, T), without running the blocks above.

    Training an SAE never needs the layers above its hook or the output head, so the forward pass
    stops right there (at GPT-2 sizes the 50k-way head alone costs as much as several blocks).
    """
    cap = Captured()

    def stop(h: Tensor) -> Tensor:
        cap.value = h
        raise _Stop

    with torch.no_grad(), _intercept(model, layer, location, stop):
        try:
            model(input_ids=input_ids)
        except _Stop:
            pass
    if cap.value is None:
        raise UserError(f"hook location {location!r} was not reached in a forward pass of the teacher")
    return cap.value


def check_hook(model: nn.Module, sae_cfg: SAEConfig, layer: int, location: str) -> None:
    """UserError unless the SAE can read (layer, location): layer in range, location known, d_in matching.

    The width is measured with a one-token forward pass, which also covers raw module paths.
    """
    if location in LOCATIONS:
        _check_layer(model, layer)
    device = next(model.parameters()).device
    width = activations(model, torch.zeros(1, 1, dtype=torch.long, device=device), layer, location).shape[-1]
    if width != sae_cfg.d_in:
        raise UserError(f"SAE d_in {sae_cfg.d_in} does not match the teacher's width {width} at layer {layer} "
                        f"{location}; use an SAE trained on this teacher, layer and location")


def load_teacher(name_or_dir: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen `transformers` causal LM in eval mode, from a local folder or a cached hub name.
    Weights are upcast to `dtype` (fp32 by default: a folder may be shipped in bf16; autocast does the rest)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        where = "folder" if Path(name_or_dir).exists() else "name (not a local folder, not in the hub cache)"
        raise UserError(f"cannot load teacher {name_or_dir!r} as a transformers causal LM {where}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    model.requires_grad_(False)
    _fuse_gelu(model)
    return model.to(device).eval()


def _fuse_gelu(model: nn.Module) -> None:
    """Swap transformers' `gelu_new` (GPT-2 and kin), a chain of Python-level elementwise ops, for torch's
    tanh GELU: the same formula in one kernel (outputs agree to float rounding), about 8% of an
    extraction step on CPU. Other activations are left alone."""
    from transformers.activations import NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, nn.GELU(approximate="tanh"))


def teacher_config_checks(name_or_dir: str, layer: int, window: int | None = None, location: str | None = None,
                          d_in: int | None = None) -> dict:
    """Cheap checks from config.json alone, before loading any weights: layer range, context length,
    and an SAE's d_in against the hidden size for residual-stream locations."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the teacher config of {name_or_dir!r}: {str(e).splitlines()[0][:200]}") from None
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise UserError(f"layer {layer} is out of range: the teacher has {n_layers} blocks (0..{n_layers - 1})")
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if window is not None and ctx is not None and window > ctx:
        raise UserError(f"window {window} is longer than the teacher's context ({ctx}); use --window <= {ctx}")
    if location is not None and location not in LOCATIONS:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # module names without allocating or loading any weights
            _raw_module(AutoModelForCausalLM.from_config(cfg), layer, location)
    residual = location in LOCATIONS and location != "mlp_post_act"
    if residual and d_in is not None and d_in != cfg.hidden_size:
        raise UserError(f"SAE d_in {d_in} does not match the teacher's hidden size {cfg.hidden_size} "
                        f"at {location}; use an SAE trained on this teacher")
    return {"hidden_size": cfg.hidden_size, "num_layers": n_layers, "context": ctx,
            "vocab_size": getattr(cfg, "vocab_size", None)}
