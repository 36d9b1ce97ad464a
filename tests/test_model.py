"""The student in ntp mode: parity with transformers' GPT-2 both ways, HF export, config refusals."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from storage_schemas import UserError
from trainer.model import GPT, GPTConfig, export_hf, from_hf, to_hf

TINY = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (biases and LayerNorms too), so parity covers every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _idx(B=2, T=32, V=300, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_from_hf_logits_match_gpt2():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=32,
                                    bos_token_id=None, eos_token_id=None)).eval()
    _perturb(hf)
    ours = from_hf(hf).eval()
    idx = _idx()
    assert_close(ours(idx).logits, hf(idx).logits)
    assert ours.cfg.mode == "ntp" and ours.cfg.block_size == 32


@pytest.mark.parametrize("bias", [True, False])
def test_to_hf_logits_match_ours(bias):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**TINY, bias=bias)).eval()
    _perturb(ours, seed=3)
    hf = to_hf(ours)
    idx = _idx(seed=2)
    assert_close(hf(idx).logits, ours(idx).logits)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied


def test_round_trip_is_identity_on_weights():
    ours = GPT(GPTConfig(**TINY)).eval()
    _perturb(ours, seed=5)
    back = from_hf(to_hf(ours))
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(a, b), k


def test_export_hf_loads_with_auto_classes(tmp_path, tokenizer_dir):
    ours = GPT(GPTConfig(**TINY)).eval()
    _perturb(ours, seed=7)
    out = tmp_path / "teacher"
    export_hf(ours, out, tokenizer_dir, eos_id=0)
    export_hf(ours, out, tokenizer_dir, eos_id=0)  # overwriting a finished export is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temp folders left behind
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = _idx(seed=4)
    assert_close(hf(idx).logits, ours(idx).logits)
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "a truth universally acknowledged"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert hf.config.eos_token_id == 0


def test_export_hf_refusals_leave_nothing(tmp_path):
    ours = GPT(GPTConfig(**TINY))
    with pytest.raises(UserError, match="tokenizer folder .* does not exist"):
        export_hf(ours, tmp_path / "out", tmp_path / "missing")
    cocomix = GPT(GPTConfig(**TINY, mode="cocomix", n_concepts=16, k_concept=4))
    with pytest.raises(UserError, match="only ntp/kd models map onto GPT2LMHeadModel"):
        export_hf(cocomix, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_from_hf_refuses_non_gpt2_variants():
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                    activation_function="relu", bos_token_id=None, eos_token_id=None))
    with pytest.raises(UserError, match="not standard GPT-2 \\(activation relu\\)"):
        from_hf(hf)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mode="cocomix", n_concepts=64, insert_layer=2), "insert_layer 2 is out of range for a 2-layer model: choose 0..1"),
        (dict(mode="cocomix", n_concepts=64, insert_layer=-1), "insert_layer -1 is out of range"),
        (dict(mode="cocomix", n_concepts=16, k_concept=32), "k_concept 32 must be between 1 and n_concepts 16"),
        (dict(mode="cocomix", n_concepts=0), "cocomix mode needs n_concepts > 0"),
        (dict(n_head=3), "n_embd 32 is not divisible by n_head 3"),
        (dict(mode="kd", kd_alpha=1.5), "kd needs 0 <= kd_alpha <= 1"),
        (dict(mode="mixup"), "unknown mode 'mixup'"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")):
        GPTConfig(**{**TINY, **overrides})


def test_too_long_input_is_refused():
    with pytest.raises(UserError, match="sequence length 33 is longer than block_size 32"):
        GPT(GPTConfig(**TINY))(_idx(T=33))


def test_param_groups_decay_matrices_once():
    model = GPT(GPTConfig(**TINY, mode="cocomix", n_concepts=64, k_concept=8))
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied embedding appears once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(False)
    assert model.num_params(False) - model.num_params() == 32 * 32  # the position table


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=8, n_head=4, n_embd=128))
    proj = model.transformer.h[0].mlp.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / 4) < 0.0005  # 1 / sqrt(2 * 8)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_generate_greedy_matches_argmax_and_seeded_sampling_repeats():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    prompt = _idx(B=1, T=4)
    out = model.generate(prompt, 3, temperature=0)
    step = model(prompt).logits[:, -1].argmax(-1)
    assert out.shape == (1, 7) and out[0, 4] == step[0]
    a = model.generate(prompt, 5, generator=torch.Generator().manual_seed(9))
    b = model.generate(prompt, 5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
