"""TopK sparse autoencoders: model, training, evaluation, hook locations, and other libraries' formats.

    from sae import TopKSAE, SAEConfig, load_sae, save_sae, capture, splice

Names resolve lazily (PEP 562) so that importing `sae.cli`, which `cocomix --help` and every other
command do, does not pay for importing torch and transformers.
"""

from importlib import import_module

_WHERE = {
    "SAEConfig": "model", "TopKSAE": "model", "EncoderOutput": "model", "ForwardOutput": "model",
    "layer_norm_stats": "model", "LN_EPS": "model",
    "load_sae": "formats", "save_sae": "formats", "detect_format": "formats", "describe": "formats",
    "read_meta": "formats", "SUPPORTED": "formats",
    "LOCATIONS": "hooks", "Captured": "hooks", "capture": "hooks", "splice": "hooks", "activations": "hooks",
    "hidden_size": "hooks", "num_layers": "hooks", "check_hook": "hooks", "load_teacher": "hooks",
    "SAETrainConfig": "train", "train_sae": "train",
    "evaluate_sae": "metrics",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sae' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
