"""Save and load SAEs: our own format, and the formats users already have.

Each loader maps another library's parameters onto TopKSAE so that `encode` gives that library's
latents (same indices, same values) for the same input:

  cocomix   folder: cfg.json {"format": "cocomix-sae", ...} + sae.safetensors
  openai    file (.pt): openai/sparse_autoencoder state dict (`Autoencoder.from_state_dict`)
  saelens   folder: cfg.json + sae_weights.safetensors (SAELens, v6 and pre-6 config keys)
  sparsify  folder: cfg.json + sae.safetensors (EleutherAI sparsify)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from storage_schemas import UserError, write_json_atomic

from .model import SAEConfig, TopKSAE

FORMAT_NAME, FORMAT_VERSION = "cocomix-sae", 1
SUPPORTED = ("cocomix (cfg.json + sae.safetensors)", "openai sparse_autoencoder state dict (.pt)",
             "SAELens folder (cfg.json + sae_weights.safetensors)", "sparsify folder (cfg.json + sae.safetensors)")
DEFAULT_DENSE_K = 128  # latents kept per token for relu/jumprelu SAEs, which have no k of their own

# transformer_lens hook names (SAELens) -> our locations, as in OpenAI's README
_TL_HOOKS = {"hook_resid_post": "resid_post_mlp", "hook_resid_mid": "resid_post_attn",
             "hook_mlp_out": "resid_delta_mlp", "hook_attn_out": "resid_delta_attn", "mlp.hook_post": "mlp_post_act"}


def _refuse(path, why: str) -> UserError:
    return UserError(f"cannot load an SAE from {path}: {why} (supported: {'; '.join(SUPPORTED)})")


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _refuse(file, f"unreadable JSON ({e})") from None


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return {k: v.float() for k, v in load_file(file).items()}
    except (OSError, SafetensorError) as e:
        raise _refuse(file, f"corrupt safetensors file ({e})") from None


def _folder(path: Path) -> Path:
    """Accept a checkpoint folder or one of its files."""
    if path.is_file() and path.name in ("cfg.json", "sae.safetensors", "sae_weights.safetensors"):
        return path.parent
    return path


def detect_format(path: str | Path) -> str:
    """'cocomix' | 'openai' | 'saelens' | 'sparsify'; UserError listing the supported formats otherwise."""
    path = _folder(Path(path))
    if not path.exists():
        raise _refuse(path, "no such file or folder")
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return "openai"
        raise _refuse(path, f"unknown file type {path.suffix or '(none)'}")
    if not (path / "cfg.json").is_file():
        raise _refuse(path, "the folder has no cfg.json")
    if (path / "sae_weights.safetensors").is_file():
        return "saelens"
    if (path / "sae.safetensors").is_file():
        return "cocomix" if _read_json(path / "cfg.json").get("format") == FORMAT_NAME else "sparsify"
    raise _refuse(path, "the folder has cfg.json but neither sae.safetensors nor sae_weights.safetensors")


def load_sae(path: str | Path, device: str | torch.device = "cpu", k: int | None = None) -> TopKSAE:
    """Load any supported SAE checkpoint as a TopKSAE (float32, eval mode) on `device`.

    k overrides the latents kept per token (needed for relu/jumprelu SAEs, default 128).
    """
    path = _folder(Path(path))
    fmt = detect_format(path)
    loader = {"cocomix": _load_cocomix, "openai": _load_openai, "saelens": _load_saelens,
              "sparsify": _load_sparsify}[fmt]
    cfg, params = loader(path)
    if k is not None:
        cfg = replace(cfg, k=k)
    return _build(path, cfg, params).to(device).eval()


def _build(path: Path, cfg: SAEConfig, params: dict[str, Tensor]) -> TopKSAE:
    """Instantiate and fill a TopKSAE, refusing tensors of the wrong shape."""
    sae = TopKSAE(cfg)
    expected = {name: p.shape for name, p in sae.named_parameters()}
    for name, shape in expected.items():
        if name not in params:
            raise _refuse(path, f"missing tensor {name!r}")
        if params[name].shape != shape:
            raise _refuse(path, f"tensor {name!r} has shape {tuple(params[name].shape)}, expected {tuple(shape)}")
    sae.load_state_dict({n: params[n].float().contiguous() for n in expected})
    return sae


def _config(path: Path, **kw) -> SAEConfig:
    try:
        return SAEConfig(**kw)
    except UserError as e:
        raise _refuse(path, str(e)) from None


# -- our own format ---------------------------------------------------------------------------------


def check_out_dir(out_dir: str | Path) -> None:
    """UserError unless out_dir is free or holds one of our SAE checkpoints: saving replaces the folder,
    which must never be a token store or anything else that happens to be there."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        try:
            ours = json.loads((out_dir / "cfg.json").read_text()).get("format") == FORMAT_NAME
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{out_dir} exists and is not a cocomix SAE checkpoint: choose another --out")


def save_sae(sae: TopKSAE, out_dir: str | Path, meta: dict | None = None) -> None:
    """Write sae.safetensors + cfg.json into out_dir, atomically: built in a temp folder, then swapped in."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in sae.named_parameters()}
    save_file(tensors, tmp / "sae.safetensors")
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": asdict(sae.cfg), "meta": meta or {}}
    (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)  # a directory cannot be replaced in one step when it is not empty
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str | Path) -> dict:
    """The `meta` section of one of our checkpoints (training config, metrics); {} for other formats."""
    path = _folder(Path(path))
    if detect_format(path) != "cocomix":
        return {}
    return _read_json(path / "cfg.json").get("meta", {})


def metrics_folder(path: str | Path) -> Path:
    """The folder of one of our checkpoints, which can store metrics; UserError for other formats."""
    path = _folder(Path(path))
    if (fmt := detect_format(path)) != "cocomix":
        raise UserError(f"{path} is a {fmt} SAE: only cocomix checkpoints store metrics "
                        "(the figures are printed; keep them with --json)")
    return path


def store_metrics(path: str | Path, metrics: dict) -> None:
    """Replace the stored eval metrics of one of our checkpoints. Only cfg.json is rewritten (atomically):
    the weights file is left alone, so label stores made with this SAE keep their fingerprint."""
    path = metrics_folder(path)
    raw = _read_json(path / "cfg.json")
    raw.setdefault("meta", {})["metrics"] = metrics
    write_json_atomic(path / "cfg.json", raw)


def _load_cocomix(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw = _read_json(path / "cfg.json")
    if raw.get("format_version") != FORMAT_VERSION:
        raise _refuse(path, f"cfg.json has format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
    known = {f.name for f in fields(SAEConfig)}
    cfg = _config(path, **{k: v for k, v in raw.get("config", {}).items() if k in known})
    return cfg, _read_safetensors(path / "sae.safetensors")


# -- openai/sparse_autoencoder ---------------------------------------------------------------------


def _load_openai(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    """Mirrors `Autoencoder.from_state_dict`: activation "TopK" means layer-normalised inputs
    (OpenAI's own heuristic), and TopK's k and post-activation come from `activation_state_dict`."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # torch raises many types for corrupt or non-weights pickles
        raise _refuse(path, f"not a readable torch state dict ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(sd, dict) or "encoder.weight" not in sd:
        raise _refuse(path, "not an openai sparse_autoencoder state dict (no 'encoder.weight')")
    act = sd.get("activation", "ReLU")
    act_sd = sd.get("activation_state_dict", {}) or {}
    if act == "TopK":
        if act_sd.get("postact_fn", "ReLU") != "ReLU":
            raise _refuse(path, f"TopK with post-activation {act_sd.get('postact_fn')!r} is not supported (only ReLU)")
        activation, k, normalize = "topk", int(act_sd["k"]), "layer_norm"
    elif act == "ReLU":
        activation, k, normalize = "relu", None, "none"
    else:
        raise _refuse(path, f"activation {act!r} is not supported (TopK or ReLU)")
    n, d = sd["encoder.weight"].shape
    if "decoder.weight" not in sd:
        raise _refuse(path, "missing tensor 'decoder.weight' (tied autoencoders are not supported)")
    params = {"pre_bias": sd["pre_bias"], "W_enc": sd["encoder.weight"], "latent_bias": sd["latent_bias"],
              "W_dec": sd["decoder.weight"].T}  # decoder.weight is (d_in, n_latents)
    cfg = _config(path, d_in=d, n_latents=n, k=k or min(DEFAULT_DENSE_K, n), normalize=normalize,
                  activation=activation, source_format="openai", **_hook_from_openai_name(path.name))
    return cfg, params


def _hook_from_openai_name(name: str) -> dict:
    """OpenAI's blob paths end in <location>/<layer>.pt, a local copy often in <location>_<layer>.pt."""
    m = re.search(r"(resid_post_mlp|resid_post_attn|resid_delta_mlp|resid_delta_attn|mlp_post_act)\D*(\d+)", name)
    return {"hook_location": m.group(1), "hook_layer": int(m.group(2))} if m else {}


# -- SAELens ------------------------------------------------------------------------------------------


def _saelens_cfg(raw: dict) -> dict:
    """Flatten a v6 config (metadata nested) and rename pre-6 keys to their v6 names."""
    cfg = {**raw.get("metadata", {}), **{k: v for k, v in raw.items() if k != "metadata"}}
    for old, new in (("hook_point", "hook_name"), ("hook_point_layer", "hook_layer"),
                     ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    return cfg


def _saelens_activation(path: Path, cfg: dict) -> tuple[str, int | None]:
    arch, fn = cfg.get("architecture", "standard"), cfg.get("activation_fn", "relu")
    if arch == "topk" or (arch == "standard" and fn == "topk"):  # pre-6 TopK: standard + activation_fn topk
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise _refuse(path, "topk SAE config has no k")
        return "topk", int(k)
    if arch in ("standard", "jumprelu") and fn in ("relu", None):
        return ("relu" if arch == "standard" else "jumprelu"), None
    raise _refuse(path, f"SAELens architecture {arch!r} with activation {fn!r} is not supported "
                        "(topk, standard/relu, jumprelu)")


def _saelens_normalize(path: Path, cfg: dict) -> str:
    norm = cfg.get("normalize_activations", "none")
    if norm in (None, False, "none"):
        return "none"
    if norm == "layer_norm":
        return "layer_norm"
    raise _refuse(path, f"normalize_activations={norm!r} needs a dataset scaling factor; fold it into "
                        "the weights first (SAELens fold_activation_norm_scaling_factor) and save again")


def _load_saelens(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    cfg = _saelens_cfg(_read_json(path / "cfg.json"))
    w = _read_safetensors(path / "sae_weights.safetensors")
    activation, k = _saelens_activation(path, cfg)
    normalize = _saelens_normalize(path, cfg)
    if cfg.get("reshape_activations", "none") != "none" or str(cfg.get("hook_name", "")).endswith("_z"):
        raise _refuse(path, "hook_z (per-head attention) SAEs are not supported")
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in w]
    if missing:
        raise _refuse(path, f"missing tensor(s) {', '.join(missing)}")
    W_enc, b_enc, W_dec, b_dec = w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"]  # W_enc stored (d_in, d_sae)
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x @ W_enc + b_enc; ours subtracts pre_bias first, so fold b_dec @ W_enc into the bias
        b_enc = b_enc + W_enc @ b_dec
    scale = w.get("finetuning_scaling_factor", w.get("scaling_factor"))
    if scale is not None:
        W_dec = W_dec * scale[:, None]  # SAELens multiplies the activations by it before decoding
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norm = W_dec.norm(dim=-1)  # SAELens ranks pre * |W_dec| and decodes acts / |W_dec|: fold both
        W_enc, b_enc, W_dec = W_enc * norm[:, None], b_enc * norm, W_dec / norm[:, None]
    params = {"pre_bias": b_dec, "W_enc": W_enc, "latent_bias": b_enc, "W_dec": W_dec}
    if activation == "jumprelu":
        params["threshold"] = w["threshold"] if "threshold" in w else w["log_threshold"].exp()
    n, d = W_dec.shape
    cfg_ = _config(path, d_in=d, n_latents=n, k=k or min(DEFAULT_DENSE_K, n), normalize=normalize,
                   activation=activation, teacher=cfg.get("model_name"), source_format="saelens",
                   **_hook_from_tl_name(cfg.get("hook_name")))
    return cfg_, params


def _hook_from_tl_name(name: str | None) -> dict:
    """'blocks.5.hook_resid_post' -> layer 5, resid_post_mlp; hook_resid_pre of block L is block L-1's output."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name or "")
    if not m:
        return {}
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return {"hook_layer": layer - 1, "hook_location": "resid_post_mlp"} if layer > 0 else {}
    return {"hook_layer": layer, "hook_location": _TL_HOOKS[hook]} if hook in _TL_HOOKS else {}


# -- EleutherAI sparsify ------------------------------------------------------------------------------


def _load_sparsify(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    """sparsify encodes topk(relu(encoder(x - b_dec))); relu before or after topk picks the same values."""
    cfg = _read_json(path / "cfg.json")
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise _refuse(path, f"sparsify {flag}=true is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise _refuse(path, f"sparsify activation {cfg.get('activation')!r} is not supported (topk)")
    w = _read_safetensors(path / "sae.safetensors")
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in w]
    if missing or "d_in" not in cfg or "k" not in cfg:
        raise _refuse(path, f"missing {', '.join(missing) or 'd_in/k in cfg.json'}")
    params = {"pre_bias": w["b_dec"], "W_enc": w["encoder.weight"], "latent_bias": w["encoder.bias"],
              "W_dec": w["W_dec"]}
    n = w["encoder.weight"].shape[0]
    cfg_ = _config(path, d_in=int(cfg["d_in"]), n_latents=n, k=int(cfg["k"]), source_format="sparsify",
                   **_hook_from_module_name(path.name))
    return cfg_, params


def _hook_from_module_name(name: str) -> dict:
    """sparsify names a folder after its hookpoint: 'layers.5' (a block's output), 'h.5.mlp', ..."""
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)(\.mlp)?", name)
    if not m:
        return {}
    return {"hook_layer": int(m.group(1)), "hook_location": "resid_delta_mlp" if m.group(2) else "resid_post_mlp"}


def describe(path: str | Path) -> dict:
    """What `cocomix sae info` prints: format, sizes, normalisation, hook, teacher."""
    fmt = detect_format(path)
    sae = load_sae(path)
    c = sae.cfg
    hook = f"layer {c.hook_layer} {c.hook_location}" if c.hook_layer is not None else "unknown"
    info = {"format": fmt, "source_format": c.source_format, "d_in": c.d_in, "latents": c.n_latents, "k": c.k,
            "activation": c.activation, "normalize": c.normalize, "hook": hook, "teacher": c.teacher or "unknown"}
    metrics = read_meta(path).get("metrics")
    if metrics:
        info["metrics"] = metrics
    return info
