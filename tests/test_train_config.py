"""TrainConfig: presets build valid students of the paper's sizes, and overrides are typed and checked."""

import pytest
import torch

from storage_schemas import UserError
from trainer.config import PRESETS, TrainConfig, build_config, parse_sets, preset, with_overrides
from trainer.model import GPT


def gpt_params(cfg: TrainConfig, vocab=50257, n_concepts=None) -> int:
    from dataclasses import replace

    cfg = replace(cfg, vocab_size=vocab, n_concepts=n_concepts or cfg.n_concepts)
    with torch.device("meta"):  # shapes only: no memory, no init time
        return GPT(cfg.model_config()).num_params(non_embedding=False)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_a_valid_student(name):
    cfg = preset(name)
    assert gpt_params(cfg, n_concepts=cfg.n_concepts or (3072 if cfg.mode == "cocomix" else 0)) > 0


def test_paper_presets_match_the_paper():
    small, ntp = preset("gpt2-69m"), preset("gpt2-69m-ntp")
    assert (small.n_embd, small.n_layer, small.n_head, small.insert_layer) == (512, 8, 8, 3)
    assert (small.mode, small.n_concepts, small.k_concept, small.concept_lambda) == ("cocomix", 32768, 32, 0.1)
    assert small.tokens_per_step == 512 * 1024 and small.max_steps == 40_000  # 0.5M-token batches, 20B tokens
    assert (small.lr, small.min_lr, small.beta1, small.beta2, small.weight_decay) == (6e-4, 6e-5, 0.9, 0.95, 0.1)
    assert ntp.mode == "ntp" and ntp.n_embd == 624
    assert gpt_params(ntp) == pytest.approx(69e6, rel=0.01)  # "69M" is the NTP model's size
    assert gpt_params(preset("gpt2-386m-ntp")) == pytest.approx(386e6, rel=0.01)
    big = preset("gpt2-1.4b")
    assert big.tokens_per_step == 1024 * 1024 and big.insert_layer == 5 and big.lr == 2e-4
    assert gpt_params(preset("gpt2-1.4b-ntp")) == pytest.approx(1.37e9, rel=0.01)


def test_overrides_are_typed_by_the_fields():
    cfg = with_overrides(preset("demo"), parse_sets(["lr=3e-4", "max_tokens=2e6", "compile=yes", "mode=pause",
                                                     "tokens=/data/t"]))
    assert (cfg.lr, cfg.max_tokens, cfg.compile, cfg.mode, cfg.tokens) == (3e-4, 2_000_000, True, "pause", "/data/t")
    with pytest.raises(UserError, match="max_tokens takes a int, got '1.5'"):
        with_overrides(cfg, {"max_tokens": "1.5"})
    with pytest.raises(UserError, match="unknown config key 'lrr' \\(did you mean 'lr'\\?\\)"):
        with_overrides(cfg, {"lrr": "1"})
    with pytest.raises(UserError, match="mode must be one of ntp, cocomix, pause, kd, got 'nope'"):
        with_overrides(cfg, {"mode": "nope"})
    with pytest.raises(UserError, match="compile takes true or false"):
        with_overrides(cfg, {"compile": "maybe"})
    with pytest.raises(UserError, match="--set takes key=value, got 'lr'"):
        parse_sets(["lr"])


def test_toml_file_names_a_preset_and_cli_overrides_win(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "gpt2-69m"\nlr = 1e-4\nbatch_size = 8\ngrad_accum = 64\n')
    cfg = build_config(None, f, {"lr": "2e-4"})
    assert (cfg.n_embd, cfg.lr, cfg.batch_size, cfg.tokens_per_step) == (512, 2e-4, 8, 512 * 1024)
    plain = tmp_path / "plain.toml"
    plain.write_text("n_layer = 3\ninsert_layer = 2\nmode = 'cocomix'\n")
    assert build_config(None, plain).n_layer == 3  # without a preset: the TrainConfig defaults
    (tmp_path / "bad.toml").write_text("lr = = 1")
    with pytest.raises(UserError, match="bad.toml is not valid TOML"):
        build_config(None, tmp_path / "bad.toml")
    with pytest.raises(UserError, match="unknown preset 'gpt5': choose one of demo-teacher, demo"):
        build_config("gpt5")
    with pytest.raises(UserError, match="give --preset NAME or --config FILE"):
        build_config()


def test_config_refuses_bad_values_with_one_line():
    with pytest.raises(UserError, match="need 0 <= min_lr <= lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(UserError, match="insert_layer 4 is out of range for a 4-layer model: choose 0..3"):
        TrainConfig(mode="cocomix", insert_layer=4)
    with pytest.raises(UserError, match="batch_size must be positive"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="k_concept 64 is larger than n_concepts 32"):
        TrainConfig(mode="cocomix", n_concepts=32, k_concept=64)
