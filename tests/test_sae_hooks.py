"""Hook locations on tiny GPT-2 and Llama models: each location equals a manual computation from the
block's submodules, gradients through capture(requires_grad=True) equal a full backward, splice works."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sae.hooks import LOCATIONS, activations, capture, check_hook, hidden_size, num_layers, splice
from sae.model import SAEConfig
from storage_schemas import UserError

torch.set_num_threads(1)
V = 64


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=16, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))


def capture_all(model, layer):
    out = {}
    for loc in LOCATIONS:
        with torch.no_grad(), capture(model, layer, loc) as cap:
            model(IDS)
        out[loc] = cap.value
    return out


def gpt2_attention(block, x):
    """GPT-2 causal self-attention written out: c_attn -> heads -> softmax(QK^T/sqrt(d) + mask) V -> c_proj."""
    B, T, C = x.shape
    nh = block.attn.num_heads
    q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    att = q @ k.transpose(-2, -1) / math.sqrt(C // nh)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return block.attn.c_proj(y)


@pytest.mark.parametrize("layer", [0, 2])
def test_gpt2_locations_match_manual_computation(layer):
    model = gpt2()
    got = capture_all(model, layer)
    block = model.transformer.h[layer]
    with torch.no_grad():
        x = model(IDS, output_hidden_states=True).hidden_states[layer]  # the block's input
        attn = gpt2_attention(block, x)
        mid = x + attn
        act = block.mlp.act(block.mlp.c_fc(block.ln_2(mid)))
        mlp = block.mlp.c_proj(act)
    expect = {"resid_delta_attn": attn, "resid_post_attn": mid, "mlp_post_act": act, "resid_delta_mlp": mlp,
              "resid_post_mlp": mid + mlp}
    for loc in LOCATIONS:
        torch.testing.assert_close(got[loc], expect[loc], msg=loc)
    if layer < 2:  # the last entry of hidden_states has ln_f applied; the others are block outputs
        torch.testing.assert_close(got["resid_post_mlp"], model(IDS, output_hidden_states=True).hidden_states[layer + 1])


def test_llama_locations_match_manual_computation():
    model, layer = llama(), 1
    got = capture_all(model, layer)
    block = model.model.layers[layer]
    with torch.no_grad():
        hs = model(IDS, output_hidden_states=True).hidden_states
        x, out = hs[layer], hs[layer + 1]
        mid = x + got["resid_delta_attn"]
        n = block.post_attention_layernorm(mid)
        act = block.mlp.act_fn(block.mlp.gate_proj(n)) * block.mlp.up_proj(n)
        mlp = block.mlp.down_proj(act)
    torch.testing.assert_close(got["resid_post_attn"], mid)
    torch.testing.assert_close(got["mlp_post_act"], act)
    torch.testing.assert_close(got["resid_delta_mlp"], mlp)
    torch.testing.assert_close(got["resid_post_mlp"], out)
    torch.testing.assert_close(mid + mlp, out)  # ties the attention output to the independent hidden_states


def test_raw_module_path_and_early_stop():
    model = gpt2()
    with torch.no_grad(), capture(model, 1, "transformer.h.{layer}.mlp") as raw:
        model(IDS)
    got = capture_all(model, 1)
    torch.testing.assert_close(raw.value, got["resid_delta_mlp"])
    for loc in LOCATIONS:
        torch.testing.assert_close(activations(model, IDS, 1, loc), got[loc])


def reference_grad(model, layer, location):
    """d loss / d h from an ordinary full backward (parameters require grad), via retain_grad on h."""
    block = model.transformer.h[layer] if hasattr(model, "transformer") else model.model.layers[layer]
    norm2 = block.ln_2 if hasattr(block, "ln_2") else block.post_attention_layernorm
    mlp = block.mlp
    proj = mlp.c_proj if hasattr(mlp, "c_proj") else mlp.down_proj
    attn = block.attn if hasattr(block, "attn") else block.self_attn
    seen = {}

    def keep(t):
        t.retain_grad()
        seen["h"] = t

    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    module, pre = {"resid_post_mlp": (block, False), "resid_post_attn": (norm2, True), "mlp_post_act": (proj, True),
                   "resid_delta_mlp": (mlp, False), "resid_delta_attn": (attn, False)}[location]
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(first(out)))
    try:
        model.requires_grad_(True)
        model(IDS, labels=IDS).loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return seen["h"].grad


@pytest.mark.parametrize("build", [gpt2, llama])
@pytest.mark.parametrize("location", LOCATIONS)
def test_capture_requires_grad_equals_full_backward(build, location):
    model, layer = build(), 1
    expect = reference_grad(model, layer, location)
    model.requires_grad_(False)  # as in extraction: frozen teacher, no parameter gradients
    with capture(model, layer, location, requires_grad=True) as cap:
        loss = model(IDS, labels=IDS).loss
    assert cap.value.is_leaf and cap.value.requires_grad
    (grad,) = torch.autograd.grad(loss, cap.value)
    torch.testing.assert_close(grad, expect)


@pytest.mark.parametrize("location", LOCATIONS)
def test_splice_replaces_downstream(location):
    model = gpt2()
    with torch.no_grad():
        clean = model(IDS).logits
        with splice(model, 1, location, lambda h: h):
            same = model(IDS).logits
        with splice(model, 1, location, lambda h: h * 0.5):
            changed = model(IDS).logits
        with splice(model, 1, location, lambda h: h * 0.5), capture(model, 1, location) as cap:
            model(IDS)
    torch.testing.assert_close(same, clean, rtol=0, atol=1e-6)
    assert (changed - clean).abs().max() > 1e-3
    assert cap.value is not None
    # hooks are gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, clean, rtol=0, atol=0)


def test_resid_post_attn_splice_reaches_block_output():
    """Splicing the mid-block residual must also change what the residual add after the MLP sees."""
    model, layer = gpt2(), 0
    block = model.transformer.h[layer]
    with torch.no_grad():
        mid = capture_all(model, layer)["resid_post_attn"]
        with splice(model, layer, "resid_post_attn", torch.zeros_like), capture(model, layer, "resid_post_mlp") as c:
            model(IDS)
        expect = block.mlp(block.ln_2(torch.zeros_like(mid)))  # zero residual + mlp(ln_2(0))
    torch.testing.assert_close(c.value, expect, atol=1e-5, rtol=1e-5)


def test_sizes_and_check_hook_refusals():
    model = gpt2()
    assert (hidden_size(model), num_layers(model)) == (32, 3)
    check_hook(model, SAEConfig(d_in=32, n_latents=8, k=2), 2, "resid_post_mlp")
    check_hook(model, SAEConfig(d_in=128, n_latents=8, k=2), 2, "mlp_post_act")
    with pytest.raises(UserError, match="layer 3 is out of range: the teacher has 3 blocks"):
        check_hook(model, SAEConfig(d_in=32, n_latents=8, k=2), 3, "resid_post_mlp")
    with pytest.raises(UserError, match="d_in 48 does not match the teacher's width 32"):
        check_hook(model, SAEConfig(d_in=48, n_latents=8, k=2), 0, "resid_post_attn")
    with pytest.raises(UserError, match="unknown hook location 'resid_pre'"):
        check_hook(model, SAEConfig(d_in=32, n_latents=8, k=2), 0, "resid_pre")


@pytest.mark.parametrize("build", [gpt2, llama])
def test_check_hook_on_meta_device(build):
    """The extraction driver checks SAE and teacher on a weightless meta-device model."""
    with torch.device("meta"):
        model = build()
    check_hook(model, SAEConfig(d_in=32, n_latents=8, k=2), 2, "resid_post_attn")
    with pytest.raises(UserError, match="d_in 32 does not match the teacher's width"):
        check_hook(model, SAEConfig(d_in=32, n_latents=8, k=2), 2, "mlp_post_act")
